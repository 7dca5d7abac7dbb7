"""Membership inference: does a trained model, or one site's update, reveal which compounds it was trained on?

Three attacks, all plain numpy/scipy/scikit-learn over arrays the caller computed:

- ``loss_attack_scores``: the LOSS baseline (Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting", CSF 2018): a low loss on a sample means "member".
- ``rmia_scores``: RMIA, offline (Zarifzadeh, Liu, Shokri, "Low-Cost High-Power Membership Inference
  Attacks", ICML 2024): the target model's likelihood ratio for x against reference models, compared pairwise with
  the same ratio on population samples z.
- ``bit_presence_scores``: the update-level attack a server can run on a multi-task trunk update. The trunk's input
  layer is an embedding over fingerprint bits trained with lazy (sparse) Adam, so a site's update is non-zero only
  in the rows of the bits its training compounds contain; a compound all of whose on-bits are non-zero rows is a
  candidate member.

``attack_metrics`` turns any attack's scores into AUC and TPR at low FPR, with stratified bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.metrics import roc_auc_score, roc_curve

from pharmafl.core.errors import InputError

# Probabilities are clipped to at least this before any ratio is formed, so a zero never divides.
PROB_FLOOR = 1e-12
# Bootstrap resamples are processed in chunks of about this many (resample x sample) cells, bounding memory.
BOOTSTRAP_CHUNK_CELLS = 4_000_000


def loss_attack_scores(target_loss: np.ndarray) -> np.ndarray:
    """Membership scores of the LOSS attack (Yeom et al., CSF 2018): ``-loss``, higher means "member".

    Args:
        target_loss: the target model's per-sample loss on the candidate samples, shape (n,); for a classifier,
            the cross-entropy of the true label(s). Must be finite (clip probabilities before taking logs).

    Returns:
        float64 scores, shape (n,).
    """
    loss = _finite_vector(target_loss, "target_loss")
    return -loss


def rmia_scores(
    target_probs: np.ndarray,
    reference_probs: np.ndarray,
    population_target_probs: np.ndarray,
    population_reference_probs: np.ndarray,
    offline_a: float = 0.33,
    gamma: float = 1.0,
) -> np.ndarray:
    """Membership scores of offline RMIA (Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks").

    Zarifzadeh, Liu, Shokri, ICML 2024 (PMLR 235), arXiv 2312.03262.

    For a sample s, ``Pr(s|θ)`` is the target model's probability of s's true label(s) (for several labels, their
    product), and ``Pr(s)`` its mean over reference models. Offline, every reference model is OUT (trained on
    population data that never held the targets), so ``Pr(s)`` is corrected with the paper's linear approximation
    ``Pr(s) = ((1 + a) Pr_OUT(s) + (1 - a)) / 2``. The score of a target x is the fraction of population samples z
    that x dominates: ``(Pr(x|θ) / Pr(x)) / (Pr(z|θ) / Pr(z)) > gamma``.

    Args:
        target_probs: ``Pr(x|θ)`` for the n candidate samples, shape (n,), in [0, 1].
        reference_probs: the k reference models' probabilities of the candidates' true labels, shape (k, n).
        population_target_probs: ``Pr(z|θ)`` for the m population samples, shape (m,); these must not be in the
            target's or the reference models' training data.
        population_reference_probs: the same k reference models on the population samples, shape (k, m).
        offline_a: the offline approximation's ``a`` in [0, 1]; 1 uses the OUT mean unchanged. The paper tunes it
            by attacking one reference model with the others.
        gamma: the pairwise likelihood-ratio threshold, > 0.

    Returns:
        float64 scores in [0, 1], shape (n,); higher means "member".
    """
    if not 0.0 <= offline_a <= 1.0:
        raise InputError(f"offline_a must lie in [0, 1], got {offline_a}.")
    if not (np.isfinite(gamma) and gamma > 0):
        raise InputError(f"gamma must be a positive number, got {gamma}.")
    x_target = _probabilities(target_probs, "target_probs", ndim=1)
    x_refs = _probabilities(reference_probs, "reference_probs", ndim=2)
    z_target = _probabilities(population_target_probs, "population_target_probs", ndim=1)
    z_refs = _probabilities(population_reference_probs, "population_reference_probs", ndim=2)
    if x_refs.shape[1] != x_target.shape[0]:
        raise InputError(
            f"reference_probs must have shape (k, {x_target.shape[0]}) to match target_probs, got {x_refs.shape}."
        )
    if z_refs.shape[1] != z_target.shape[0]:
        raise InputError(
            f"population_reference_probs must have shape (k, {z_target.shape[0]}) to match population_target_probs, "
            f"got {z_refs.shape}."
        )
    if x_refs.shape[0] != z_refs.shape[0]:
        raise InputError(
            f"reference_probs and population_reference_probs must come from the same reference models, got "
            f"{x_refs.shape[0]} and {z_refs.shape[0]} rows."
        )

    x_ratio = _likelihood_ratio(x_target, x_refs, offline_a)
    z_ratio = np.sort(_likelihood_ratio(z_target, z_refs, offline_a))
    # ratio_x / ratio_z > gamma  <=>  ratio_z < ratio_x / gamma (all ratios are positive)
    dominated = np.searchsorted(z_ratio, x_ratio / gamma, side="left")
    return dominated / z_ratio.size


def attack_metrics(
    scores: np.ndarray,
    is_member: np.ndarray,
    fprs: Sequence[float] = (0.001, 0.01),
    n_bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """AUC and TPR at fixed FPRs of a membership attack, each with a stratified percentile bootstrap interval.

    TPR at FPR t is the largest TPR of the ROC curve at a point with FPR <= t. It is only as fine as
    ``fpr_resolution = 1 / n_non_members``: TPR at 0.1% FPR means something only with >= 1000 non-members, and its
    interval is wide until there are several thousand. Bootstrap resamples draw members and non-members separately
    (the class sizes stay fixed) and are scored with a vectorised rank computation equal to scikit-learn's.

    Args:
        scores: attack scores, shape (n,), higher means "member"; finite.
        is_member: the truth, shape (n,), boolean (or 0/1).
        fprs: the false-positive rates at which to report TPR, each in (0, 1).
        n_bootstrap: bootstrap resamples; 0 skips the intervals (their keys hold None).
        seed: seed of the bootstrap's generator.
        confidence: the intervals' coverage, in (0, 1).

    Returns:
        ``auc``, ``auc_ci`` ([lo, hi]), for each t ``tpr_at_fpr_{t:g}`` and ``tpr_at_fpr_{t:g}_ci``, plus
        ``n_members``, ``n_non_members``, ``fpr_resolution``, ``n_bootstrap`` and ``confidence``.
    """
    s = _finite_vector(scores, "scores")
    member = _binary_vector(is_member, "is_member")
    if member.shape != s.shape:
        raise InputError(f"is_member must have the same shape as scores {s.shape}, got {member.shape}.")
    n_members = int(member.sum())
    n_non_members = int(member.size - n_members)
    if n_members == 0 or n_non_members == 0:
        raise InputError(
            f"attack_metrics needs both members and non-members, got {n_members} members and {n_non_members} "
            "non-members."
        )
    fprs = [float(t) for t in fprs]
    if not all(0.0 < t < 1.0 for t in fprs):
        raise InputError(f"every FPR must lie in (0, 1), got {fprs}.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise InputError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}.")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}.")

    fpr_curve, tpr_curve, _ = roc_curve(member, s, drop_intermediate=False)
    result: dict = {"auc": float(roc_auc_score(member, s))}
    tpr_keys = [f"tpr_at_fpr_{t:g}" for t in fprs]
    for key, t in zip(tpr_keys, fprs, strict=True):
        result[key] = float(tpr_curve[fpr_curve <= t].max())

    pos, neg = s[member], s[~member]
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        aucs, tprs = [], []
        chunk = max(1, BOOTSTRAP_CHUNK_CELLS // member.size)
        for start in range(0, n_bootstrap, chunk):
            size = min(chunk, n_bootstrap - start)
            auc_b, tpr_b = _weighted_auc_and_tprs(
                pos, neg, _resample_counts(rng, size, pos.size), _resample_counts(rng, size, neg.size), fprs
            )
            aucs.append(auc_b)
            tprs.append(tpr_b)
        auc_boot, tpr_boot = np.concatenate(aucs), np.concatenate(tprs)
        q = [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)]
        result["auc_ci"] = [float(v) for v in np.percentile(auc_boot, q)]
        for j, key in enumerate(tpr_keys):
            result[f"{key}_ci"] = [float(v) for v in np.percentile(tpr_boot[:, j], q)]
    else:
        result["auc_ci"] = None
        for key in tpr_keys:
            result[f"{key}_ci"] = None

    result.update(
        n_members=n_members,
        n_non_members=n_non_members,
        fpr_resolution=1.0 / n_non_members,
        n_bootstrap=int(n_bootstrap),
        confidence=float(confidence),
    )
    return result


def bit_presence_scores(update_rows_nonzero: np.ndarray, X_csr) -> np.ndarray:
    """Score candidate compounds by the fraction of their fingerprint on-bits whose trunk-update row is non-zero.

    Lazy (sparse) Adam touches only the embedding rows of bits present in the batch, so every compound a site trained
    on in the round scores 1.0 against that site's update; a compound that shares few bits with the site's data
    scores low. Against a securely aggregated update (the union of several sites' rows) non-members score higher and
    the attack weakens.

    Args:
        update_rows_nonzero: boolean mask over the n_features embedding rows, True where the update's row is non-zero
            (see ``nonzero_rows``), shape (n_features,).
        X_csr: candidate compounds' fingerprints, rows = compounds, shape (n_compounds, n_features); a scipy sparse
            matrix (any stored non-zero counts as an on-bit) or a dense 2-D array.

    Returns:
        float64 scores in [0, 1], shape (n_compounds,); a compound with no on-bits scores 0.0.
    """
    mask = _binary_vector(update_rows_nonzero, "update_rows_nonzero")
    if sparse.issparse(X_csr):
        X = sparse.csr_array(X_csr, dtype=np.float64, copy=True)
    else:
        dense = np.asarray(X_csr)
        if dense.ndim != 2:
            raise InputError(f"X_csr must be a 2-D fingerprint matrix, got shape {dense.shape}.")
        X = sparse.csr_array(dense, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != mask.size:
        raise InputError(f"X_csr must have {mask.size} columns, one per update row, got shape {X.shape}.")
    if not np.all(np.isfinite(X.data)):
        raise InputError("X_csr holds non-finite values; fingerprints must be binary.")
    X.data = (X.data != 0).astype(np.float64)
    on_bits = np.asarray(X.sum(axis=1)).ravel()
    hits = X @ mask.astype(np.float64)
    scores = np.zeros(X.shape[0], dtype=np.float64)
    np.divide(hits, on_bits, out=scores, where=on_bits > 0)
    return scores


def nonzero_rows(weight_update: np.ndarray, atol: float = 0.0) -> np.ndarray:
    """The boolean mask of rows of a 2-D update with any entry of absolute value above ``atol``.

    Args:
        weight_update: a 2-D array, e.g. the trunk embedding's update (n_features x hidden); finite.
        atol: entries with ``|value| <= atol`` count as zero (>= 0).

    Returns:
        bool array, shape (n_rows,).
    """
    update = np.asarray(weight_update)
    if update.ndim != 2:
        raise InputError(f"weight_update must be a 2-D array, got shape {update.shape}.")
    if not (np.isfinite(atol) and atol >= 0):
        raise InputError(f"atol must be a non-negative number, got {atol}.")
    if not np.all(np.isfinite(update)):
        raise InputError("weight_update holds non-finite values.")
    return np.any(np.abs(update) > atol, axis=1)


def _finite_vector(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{name} must be a 1-D array, got shape {array.shape}.")
    if array.size == 0:
        raise InputError(f"{name} is empty.")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} holds non-finite values.")
    return array


def _binary_vector(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"{name} must be a 1-D array, got shape {array.shape}.")
    if array.dtype != np.bool_:
        if not np.all(np.isin(array, (0, 1))):
            raise InputError(f"{name} must be boolean (or 0/1).")
        array = array.astype(np.bool_)
    return array


def _probabilities(values: np.ndarray, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise InputError(f"{name} must be a {ndim}-D array, got shape {array.shape}.")
    if array.size == 0:
        raise InputError(f"{name} is empty, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} holds non-finite values.")
    if array.min() < 0.0 or array.max() > 1.0:
        raise InputError(f"{name} must hold probabilities in [0, 1], got values in [{array.min()}, {array.max()}].")
    return array


def _likelihood_ratio(target: np.ndarray, references: np.ndarray, offline_a: float) -> np.ndarray:
    """``Pr(s|θ) / Pr(s)`` with the offline correction of the reference mean, both clipped away from 0."""
    marginal = ((1.0 + offline_a) * references.mean(axis=0) + (1.0 - offline_a)) / 2.0
    return np.maximum(target, PROB_FLOOR) / np.maximum(marginal, PROB_FLOOR)


def _resample_counts(rng: np.random.Generator, n_resamples: int, n: int) -> np.ndarray:
    """How often each of n samples is drawn in each of n_resamples bootstrap resamples, shape (n_resamples, n)."""
    draws = rng.integers(0, n, size=(n_resamples, n)) + n * np.arange(n_resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def _weighted_auc_and_tprs(
    pos: np.ndarray, neg: np.ndarray, pos_weights: np.ndarray, neg_weights: np.ndarray, fprs: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """AUC and TPR at each FPR for B weightings of the same samples, in O(B n) after one O(n log n) sort.

    ``pos_weights`` (B, n_pos) and ``neg_weights`` (B, n_neg) are per-sample counts (a bootstrap resample, or ones for
    the plain statistic); each row must sum to the class size. Ties count half in the AUC and, as in
    ``sklearn.metrics.roc_curve``, thresholds are the samples' scores with "member" meaning score >= threshold.
    Returns AUCs (B,) and TPRs (B, len(fprs)).
    """
    n_pos, n_neg = pos.size, neg.size
    n_resamples = pos_weights.shape[0]
    neg_order = np.argsort(neg, kind="stable")
    neg_sorted = neg[neg_order]
    # cum_neg[b, i]: weight of the i lowest non-member scores
    cum_neg = np.zeros((n_resamples, n_neg + 1))
    np.cumsum(neg_weights[:, neg_order], axis=1, out=cum_neg[:, 1:])
    below = cum_neg[:, np.searchsorted(neg_sorted, pos, side="left")]
    at_or_below = cum_neg[:, np.searchsorted(neg_sorted, pos, side="right")]
    aucs = np.einsum("bi,bi->b", pos_weights, below + at_or_below) / (2.0 * n_pos * n_neg)

    # For FPR <= t the lowest admissible threshold lies just above v*, the largest distinct non-member score with
    # weight(non-members >= v*) / n_neg > t; the TPR is then the weight of members scoring above v*.
    neg_desc = neg_sorted[::-1]
    starts = np.flatnonzero(np.r_[True, neg_desc[1:] != neg_desc[:-1]])
    distinct_desc = neg_desc[starts]
    # at_or_above[b, g]: weight of non-members scoring >= distinct_desc[g]; rises along g to n_neg
    at_or_above = np.cumsum(np.add.reduceat(neg_weights[:, neg_order[::-1]], starts, axis=1), axis=1)
    pos_order = np.argsort(pos, kind="stable")
    pos_sorted = pos[pos_order]
    cum_pos = np.zeros((n_resamples, n_pos + 1))
    np.cumsum(pos_weights[:, pos_order], axis=1, out=cum_pos[:, 1:])
    rows = np.arange(n_resamples)
    tprs = np.empty((n_resamples, len(fprs)))
    for j, t in enumerate(fprs):
        # t < 1 and the last column is n_neg, so some group is never admissible and v* exists
        cut = distinct_desc[np.sum(at_or_above / n_neg <= t, axis=1)]
        tprs[:, j] = (n_pos - cum_pos[rows, np.searchsorted(pos_sorted, cut, side="right")]) / n_pos
    return aucs, tprs
