"""FRA-LoRA: aggregate LoRA factors through the mean of the clients' full updates.

A LoRA module's update is ``B @ A`` with ``B`` (d_out x r) and ``A`` (r x d_in). Averaging ``A`` and ``B``
separately gives ``mean(B) @ mean(A)``, not ``mean(B @ A)`` (FedEx-LoRA, arXiv 2410.09432). FRA-LoRA (Trautmann,
Hales, Volk, arXiv 2501.06332) forms ``M = sum_u w_u B_u A_u / sum_u w_u``, truncates it to rank r by SVD and sends
back ``B' = U_r sqrt(S_r)``, ``A' = sqrt(S_r) V_r^T``.

``M`` has rank <= k = sum_u r_u, so its SVD never needs a d x d matrix: with ``Bw = [w_1 B_1 .. w_n B_n] / sum w``
and ``A_stack = [A_1; ..; A_n]``, ``M = Bw @ A_stack``, and two thin factorisations of those d x k stacks reduce it to
one k x k problem. Two exact ways to do that are implemented:

- ``qr``: thin QR of ``Bw`` and ``A_stack^T``, SVD of the k x k core ``R1 R2^T`` (float64). Robust for any input,
  gives every singular triplet (used for the ``carry`` residual), about 4 d k^2 flops per module.
- ``gram``: the k x k Gram matrices ``Bw^T Bw`` and ``A_stack A_stack^T`` (2 d k^2 flops, in float32 when the clients
  sent float32), a Cholesky factor ``R1`` of the first (pivoted when singular), and the top eigenpairs of the core
  ``R1 G_A R1^T = C C^T`` (for float32 clients: float32 eigenvectors refined by float64 Rayleigh-Ritz). About 5x
  faster than ``qr`` at d = 2560, k = 512. Squaring loses accuracy where the kept singular values are small next to
  ``||Bw|| ||A_stack||`` (cancelling clients, rank-deficient means), so every answer is checked against an error
  estimate and recomputed in float64, then by ``qr``, when the estimate is above ``GRAM_RTOL``; where the last kept
  and first dropped singular values nearly tie (``GAP_FLOOR``), float32 results get a float64 Rayleigh-Ritz step.
  Measured relative error of the rank-r product against the dense float64 reference: ~1e-6 from float32 clients
  (6.5e-6 at worst before that step, 6e-7 after it), ~1e-14 from float64 clients.

When k >= min(d_out, d_in) the d_out x d_in mean is no larger than the core, and it is formed directly.

Everything here is numpy/scipy on arrays and named dicts of arrays; the FLARE aggregator is a thin adapter.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import eigh, lapack

from pharmafl.aggregation.weighted_mean import Dtypes, Shapes, update_problem, weighted_mean

RESIDUAL_POLICIES = ("drop", "carry")
# The Gram path's answer is kept when its error estimate is below this: measured errors on random, shared,
# decaying and cancelling factors stayed within 20x of the estimate, so this keeps them under 1e-5.
GRAM_RTOL = 5e-7
# Extra eigenvectors computed in float32 so that the wanted ones lie in their span before the float64 refinement.
SPARE_VECTORS = 16
# Below this gap between the last kept and the first dropped singular value (relative to the largest), float32
# results are refined in float64.
GAP_FLOOR = 2e-3
# Dense updates larger than this on their short side are truncated through their Gram matrix, not a full SVD.
PARTIAL_SVD_ABOVE = 1024

_LORA_A = re.compile(r"(^|\.)lora_(embedding_)?A(\.|$)")
_LORA_B = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")

Factors = Mapping[str, np.ndarray]
_workspace = threading.local()  # per-thread scratch arrays while _map_modules runs


@dataclass
class FRAResult:
    """The aggregated model update.

    Args:
        factors: the new global LoRA factors (rank ``rank``) and the weighted mean of every other key.
        retained_energy: per LoRA module, sum of kept S^2 / sum of all S^2 of the truncated mean (1.0 if it is zero).
        residual: with ``residual_policy="carry"``, what truncation left out, per module, to pass to the next round.
        paths: per module, which computation produced it (``gram-float32``, ``gram-float64``, ``qr``, ``dense``).
    """

    factors: dict[str, np.ndarray]
    retained_energy: dict[str, float]
    residual: dict[str, np.ndarray] | None
    paths: dict[str, str] = field(default_factory=dict)


@dataclass
class _Truncation:
    U: np.ndarray  # (d_out, rank), float64; columns of zero singular values are zero
    S: np.ndarray  # (rank,), descending, zero-padded
    Vt: np.ndarray  # (rank, d_in)
    total_energy: float  # ||M||_F^2
    path: str
    rest: tuple[np.ndarray, np.ndarray] | np.ndarray | None = None  # M - U S Vt, factored (B, A) or dense


@dataclass
class _Stacks:
    """M = B diag(scale) A: the factors side by side, the weights kept apart so the big arrays are only copied."""

    B: np.ndarray  # (d_out, k)
    A: np.ndarray  # (k, d_in)
    scale: np.ndarray  # (k,) float64: w_u / sum w on client u's columns, 1 on a carried residual's

    def astype(self, dtype: type) -> _Stacks:
        return _Stacks(self.B.astype(dtype), self.A.astype(dtype), self.scale)

    def weighted_B(self) -> np.ndarray:
        return self.B.astype(np.float64) * self.scale


# ---------------------------------------------------------------------------------------------------------------------
# Arrays: one module


def factored_mean_svd(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: Sequence[float], rank: int, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``rank`` SVD (U, S, Vt) of sum_u w_u B_u A_u / sum_u w_u without forming a d_out x d_in matrix.

    Clients may have different ranks r_u. Outputs always have ``rank`` columns: where the mean has fewer nonzero
    singular values, S is zero-padded and the matching columns of U and rows of Vt are zero. ``method`` is
    ``auto`` (Gram with checked accuracy, falling back to QR), ``gram`` (the same) or ``qr``. With ``auto`` and
    k = sum_u r_u >= min(d_out, d_in) the mean is formed after all: it is then no larger than the k x k core.
    """
    _check_rank(rank)
    stacks = _stack(Bs, As, weights)
    if method == "qr":
        result = _qr_truncation(stacks, rank, keep_rest=False)
    elif method in ("auto", "gram"):
        result = _factored_truncation(stacks, rank, keep_rest=False)
    else:
        raise ValueError(f"method must be 'auto', 'gram' or 'qr', not {method!r}")
    return result.U, result.S, result.Vt


def dense_mean_svd(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: Sequence[float], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: form every B_u A_u in float64, average, full SVD, keep the first ``rank`` (zero-padded)."""
    _check_rank(rank)
    total = _total_weight(weights, len(Bs))
    mean = None
    for weight, B, A in zip(weights, Bs, As, strict=True):
        product = (float(weight) / total) * (np.asarray(B, np.float64) @ np.asarray(A, np.float64))
        mean = product if mean is None else mean + product
    U, S, Vt = np.linalg.svd(mean, full_matrices=False)
    return _pad(U[:, :rank], S[:rank], Vt[:rank], rank)


def split_factors(U: np.ndarray, S: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B = U sqrt(S), A = sqrt(S) Vt: the singular values shared evenly so B and A have the same scale."""
    root = np.sqrt(np.maximum(S, 0.0))
    return U * root, root[:, None] * Vt


def _factored_truncation(stacks: _Stacks, rank: int, keep_rest: bool) -> _Truncation:
    d_out, d_in = stacks.B.shape[0], stacks.A.shape[1]
    if keep_rest:  # the residual needs every triplet accurately, which only QR gives
        return _qr_truncation(stacks, rank, keep_rest)
    if stacks.scale.size >= min(d_out, d_in):  # k >= d: the mean itself is no bigger than the k x k core
        return _dense_truncation(stacks.weighted_B() @ stacks.A.astype(np.float64), rank, False, partial_above=0)
    result = _gram_truncation(stacks, rank)
    if result is None and stacks.B.dtype != np.float64:
        result = _gram_truncation(stacks.astype(np.float64), rank)
    return result if result is not None else _qr_truncation(stacks, rank, keep_rest=False)


def _gram_truncation(stacks: _Stacks, rank: int) -> _Truncation | None:
    """Top-``rank`` SVD of B diag(scale) A from the k x k Gram matrices; None when its accuracy is not assured."""
    B, A, scale = stacks.B, stacks.A, stacks.scale
    dtype = B.dtype
    # numpy runs X.T @ X as syrk (half a product's flops); the client weights go on the small matrix.
    gram_B = (B.T @ B).astype(np.float64)
    gram_B *= np.outer(scale, scale)
    gram_A = (A @ A.T).astype(np.float64)
    R1 = _cholesky_factor(gram_B)  # R1^T R1 = gram_B; dependent columns (identical or zero clients) drop out
    d_out, d_in = B.shape[0], A.shape[1]
    if R1.shape[0] == 0:
        return _Truncation(*_pad(np.zeros((d_out, 0)), np.zeros(0), np.zeros((0, d_in)), rank), 0.0, _gram_name(dtype))
    # ||M||_F^2 = trace(G_B G_A); the core R1 G_A R1^T = C C^T (C = R1 R2^T, the QR method's core) has eigenvalues S^2.
    total = float(np.sum(gram_B * gram_A))
    size = R1.shape[0]
    kept = min(rank, size)
    fast = dtype == np.float32
    values, vectors = _core_eigenpairs(R1, gram_A, min(size, kept + (SPARE_VECTORS if fast else 1)), fast)
    values = np.maximum(values, 0.0)
    # Forming the Gram matrices perturbs S^2 by about eps * ||G_B|| ||G_A||; relative to the smallest kept S^2 that
    # estimates the error of the kept triplets (measured errors stay within ~20x of it, hence the margin in GRAM_RTOL).
    smallest = values[kept - 1]
    if not smallest > 0 or np.finfo(dtype).eps * _psd_norm(gram_B) * _psd_norm(gram_A) / smallest > GRAM_RTOL:
        return None
    S = np.sqrt(values)
    gap = (S[kept - 1] - S[kept]) / S[0] if S.size > kept else 1.0
    if fast and gap < GAP_FLOOR:
        # Which of two nearly equal singular values is kept decides the product, and float32 Gram rounding can swap
        # them: measured errors reach 6.5e-6 at gaps of 1e-3 (1e-6 typical). A float64 Rayleigh-Ritz on the span of
        # the kept and the spare vectors only needs that span to hold the top `rank`, which float32 gets right.
        U, S, Vt = _refine_in_float64(stacks, R1, vectors, kept)
        return _Truncation(*_pad(U, S, Vt, rank), total, f"{_gram_name(dtype)}-refined")
    S, vectors = S[:kept], vectors[:, :kept]
    # V = M^T U / S = A^T R1^T X / S and U = M V / S with A V = G_A R1^T X / S: no inverse of R1 (its small pivots
    # carry the rounding) and only two d x k x rank products.
    T = R1.T @ vectors
    V = (A.T @ T.astype(dtype)) / S.astype(dtype)
    U = B @ (scale[:, None] * (gram_A @ T) / S**2).astype(dtype)
    return _Truncation(*_pad(U.astype(np.float64), S, V.T.astype(np.float64), rank), total, _gram_name(dtype))


def _refine_in_float64(
    stacks: _Stacks, R1: np.ndarray, vectors: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-``rank`` SVD of M restricted to the right subspace the core's ``vectors`` span, all in float64."""
    A = stacks.A.astype(np.float64)
    basis, _ = np.linalg.qr(A.T @ (R1.T @ vectors))  # right singular vectors of M span A^T R1^T X
    Q, R = np.linalg.qr(stacks.weighted_B() @ (A @ basis))  # M basis = Q R
    Ur, S, Vrt = np.linalg.svd(R)
    return Q @ Ur[:, :rank], S[:rank], (basis @ Vrt[:rank].T).T


def _core_eigenpairs(R1: np.ndarray, gram_A: np.ndarray, count: int, fast: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenpairs (descending) of the core R1 gram_A R1^T, accurate in float64."""
    size = R1.shape[0]
    if not fast:
        values, vectors = eigh(R1 @ gram_A @ R1.T, subset_by_index=[size - count, size - 1], driver="evr")
        return values[::-1], vectors[:, ::-1]
    # Tridiagonalising the core is the cost, about half in float32. Its top eigenvectors, with spares, span the wanted
    # ones to float32 accuracy; Rayleigh-Ritz on the (never formed) float64 core then gives float64 eigenpairs:
    # measured errors equal the all-float64 path's.
    R1_32 = R1.astype(np.float32)
    _, X = eigh(R1_32 @ gram_A.astype(np.float32) @ R1_32.T, subset_by_index=[size - count, size - 1], driver="evr")
    X, _ = np.linalg.qr(X.astype(np.float64))
    ritz = X.T @ (R1 @ (gram_A @ (R1.T @ X)))
    values, Z = np.linalg.eigh((ritz + ritz.T) / 2)
    return values[::-1], X @ Z[:, ::-1]


def _cholesky_factor(gram: np.ndarray) -> np.ndarray:
    """R (rank x k) with R^T R = gram: plain Cholesky, or pivoted Cholesky when gram is singular."""
    factor, info = lapack.dpotrf(gram, lower=0, clean=1)
    if info == 0:
        return factor
    factor, pivots, rank, _ = lapack.dpstrf(gram, lower=0)
    R = np.zeros((rank, gram.shape[0]))
    R[:, pivots - 1] = np.triu(factor[:rank])
    return R


def _qr_truncation(stacks: _Stacks, rank: int, keep_rest: bool) -> _Truncation:
    """Thin QR of both stacks and SVD of the small core, in float64; optionally the discarded triplets too."""
    Q1, R1 = np.linalg.qr(stacks.weighted_B())
    Q2, R2 = np.linalg.qr(stacks.A.T.astype(np.float64))
    Uc, S, Vct = np.linalg.svd(R1 @ R2.T)
    total = float(np.sum(S**2))
    kept = min(rank, S.size)
    U, Vt = Q1 @ Uc[:, :kept], (Q2 @ Vct[:kept].T).T
    rest = None
    if keep_rest:
        # Triplets at rounding level are not part of M: keeping them would only grow the residual's rank.
        floor = S[0] * max(Q1.shape[0], Q2.shape[0]) * np.finfo(np.float64).eps
        tail = slice(kept, max(kept, int(np.sum(S > floor))))
        rest = ((Q1 @ Uc[:, tail]) * S[tail], (Q2 @ Vct[tail].T).T)
    return _Truncation(*_pad(U, S[:kept], Vt, rank), total, "qr", rest)


def _dense_truncation(M: np.ndarray, rank: int, keep_rest: bool, partial_above: int | None = None) -> _Truncation:
    """Top-``rank`` SVD of a dense d_out x d_in mean; the residual, if asked, is M - U S Vt (dense).

    Past ``partial_above`` (default ``PARTIAL_SVD_ABOVE``) on the short side it goes through the Gram matrix.
    """
    M = np.asarray(M, dtype=np.float64)
    total = float(np.sum(M * M))
    result = None
    if min(M.shape) > (PARTIAL_SVD_ABOVE if partial_above is None else partial_above):
        result = _gram_dense_truncation(M, rank)
    if result is None:
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        result = _pad(U[:, :rank], S[:rank], Vt[:rank], rank)
    U, S, Vt = result
    rest = (M - (U * S) @ Vt) if keep_rest else None
    return _Truncation(U, S, Vt, total, "dense", rest)


def _gram_dense_truncation(M: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Top-``rank`` triplets from the eigenpairs of the smaller Gram matrix: 4x faster than a full SVD at d = 1536.

    None when the kept singular values are too small next to the largest to survive the squaring.
    """
    transpose = M.shape[0] > M.shape[1]
    X = M.T if transpose else M  # the short side goes first: X X^T is min(d_out, d_in) square
    gram = X @ X.T
    n = gram.shape[0]
    kept = min(rank, n)
    values, vectors = eigh(gram, subset_by_index=[n - kept, n - 1], driver="evr")
    values, vectors = values[::-1], vectors[:, ::-1]
    if values[-1] <= 0 or np.finfo(np.float64).eps * values[0] / values[-1] > GRAM_RTOL:
        return None
    S = np.sqrt(values)
    other = (vectors.T @ X) / S[:, None]
    U, Vt = (other.T, vectors.T) if transpose else (vectors, other)
    return _pad(U, S, Vt, rank)


def _psd_norm(gram: np.ndarray, steps: int = 6) -> float:
    """Spectral norm of a symmetric PSD matrix by power iteration: a few percent is all the error estimate needs."""
    x = np.random.default_rng(0).standard_normal(gram.shape[0])
    norm = 0.0
    for _ in range(steps):
        y = gram @ x
        norm = float(np.linalg.norm(y))
        if norm == 0:
            return 0.0
        x = y / norm
    return norm


def _pad(U: np.ndarray, S: np.ndarray, Vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-pad to ``rank`` columns and zero the vectors of zero singular values (their directions are arbitrary)."""
    kept = S.size
    zero = ~(S > 0)
    if np.any(zero):
        U, Vt = U.copy(), Vt.copy()
        U[:, zero], Vt[zero] = 0.0, 0.0
    if kept == rank:
        return U, np.maximum(S, 0.0), Vt
    U_full, S_full, Vt_full = np.zeros((U.shape[0], rank)), np.zeros(rank), np.zeros((rank, Vt.shape[1]))
    U_full[:, :kept], S_full[:kept], Vt_full[:kept] = U, np.maximum(S, 0.0), Vt
    return U_full, S_full, Vt_full


def _gram_name(dtype: np.dtype) -> str:
    return f"gram-{np.dtype(dtype).name}"


def _stack(
    Bs: Sequence[np.ndarray],
    As: Sequence[np.ndarray],
    weights: Sequence[float],
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> _Stacks:
    """The clients' factors side by side, [B_1 .. B_n (, B_extra)] and [A_1; ..; A_n (; A_extra)], and the weights.

    float32 when every factor is float32 (what clients send), float64 otherwise. ``extra`` is added unweighted.
    """
    if not Bs or len(Bs) != len(As):
        raise ValueError("need one A for every B and at least one client")
    total = _total_weight(weights, len(Bs))
    pairs = [(np.asarray(B), np.asarray(A)) for B, A in [*zip(Bs, As, strict=True), *([extra] if extra else [])]]
    d_out, d_in = pairs[0][0].shape[0] if pairs[0][0].ndim else 0, pairs[0][1].shape[-1] if pairs[0][1].ndim else 0
    for index, (B, A) in enumerate(pairs):
        if B.ndim != 2 or A.ndim != 2 or B.shape[0] != d_out or A.shape[1] != d_in or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"factor pair {index} has B {B.shape} and A {A.shape}: expected ({d_out}, r) and (r, {d_in})"
            )
    dtype = np.float32 if all(B.dtype == np.float32 and A.dtype == np.float32 for B, A in pairs) else np.float64
    scales = [float(w) / total for w in weights] + ([1.0] if extra is not None else [])
    scale = np.concatenate([np.full(B.shape[1], s) for (B, _), s in zip(pairs, scales, strict=True)])
    k = scale.size
    B_stack = np.concatenate([B for B, _ in pairs], axis=1, out=_scratch("B", (d_out, k), dtype))
    A_stack = np.concatenate([A for _, A in pairs], axis=0, out=_scratch("A", (k, d_in), dtype))
    return _Stacks(B_stack, A_stack, scale)


def _scratch(slot: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """An array from the calling worker's workspace, reused module after module (fresh if there is none).

    Freshly allocated stacks of ~10 MB cost page faults that serialise across threads and rival the arithmetic.
    """
    arrays = getattr(_workspace, "arrays", None)
    if arrays is None:
        return np.empty(shape, dtype)
    size = int(np.prod(shape))
    flat = arrays.get((slot, np.dtype(dtype)))
    if flat is None or flat.size < size:
        flat = arrays[(slot, np.dtype(dtype))] = np.empty(size, dtype)
    return flat[:size].reshape(shape)


def _total_weight(weights: Sequence[float], count: int) -> float:
    if len(weights) != count:
        raise ValueError(f"need one weight per client: got {len(weights)} weights for {count} clients")
    values = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or not values.sum() > 0:
        raise ValueError("weights must be finite, non-negative and sum to a positive number")
    return float(values.sum())


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, not {rank!r}")


def _check_policy(policy: str) -> None:
    if policy not in RESIDUAL_POLICIES:
        raise ValueError(f"residual_policy must be one of {RESIDUAL_POLICIES}, not {policy!r}")


def _checked_keys(clients: Sequence[Mapping], weights: Sequence[float], rank: int, policy: str) -> list:
    """Check the arguments every whole-model entry point shares; the keys every client must carry."""
    _check_rank(rank)
    _check_policy(policy)
    if not clients:
        raise ValueError("need at least one client's update")
    _total_weight(weights, len(clients))
    keys = list(clients[0])
    for index, client in enumerate(clients[1:], start=1):
        if set(client) != set(keys):
            missing, extra = sorted(set(keys) - set(client)), sorted(set(client) - set(keys))
            raise ValueError(f"client {index} has different keys (missing {missing[:5]}, unexpected {extra[:5]})")
    return keys


# ---------------------------------------------------------------------------------------------------------------------
# Named factors: a whole model


def find_lora_pairs(keys: Sequence[str] | Mapping[str, object]) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) for every LoRA module, matched by name as PEFT writes them.

    ``x.lora_A.weight`` pairs with ``x.lora_B.weight`` (also ``lora_A.<adapter>.weight`` and
    ``lora_embedding_A``); a factor without its partner is an error, not a key to average.
    """
    names = list(keys)
    present = set(names)
    pairs, partnered = [], set()
    for name in names:
        if _LORA_A.search(name):
            partner = _LORA_A.sub(lambda m: f"{m.group(1)}lora_{m.group(2) or ''}B{m.group(3)}", name, count=1)
            if partner not in present:
                raise ValueError(f"'{name}' has no matching '{partner}'")
            pairs.append((name, partner))
            partnered.add(partner)
    orphans = [name for name in names if _LORA_B.search(name) and name not in partnered]
    if orphans:
        raise ValueError(f"lora_B keys without a lora_A partner: {orphans[:5]}")
    return pairs


def module_name(lora_a_key: str) -> str:
    """``x.lora_A.weight`` -> ``x``; ``x.lora_A.default.weight`` -> ``x.default``: the name results are keyed by."""
    name = _LORA_A.sub(lambda m: "." if m.group(1) and m.group(3) else "", lora_a_key, count=1)
    return name.removesuffix(".weight").strip(".") or lora_a_key


def fra_lora_aggregate(
    client_factors: Sequence[Factors],
    weights: Sequence[float],
    rank: int,
    lora_pairs: Sequence[tuple[str, str]] | None = None,
    residual: Mapping[str, np.ndarray] | None = None,
    residual_policy: str = "drop",
    workers: int | None = None,
    dtypes: Dtypes | None = None,
) -> FRAResult:
    """FRA-LoRA over named factors: every LoRA module through its mean full update, every other key averaged.

    Args:
        client_factors: one dict per client of PEFT-style arrays (``..lora_A.weight`` (r_u, d_in),
            ``..lora_B.weight`` (d_out, r_u)), all with the same keys.
        weights: one non-negative weight per client (e.g. its number of training examples).
        rank: rank of the factors sent back (the global adapter's r).
        lora_pairs: (lora_A key, lora_B key) per module; found by name when None.
        residual: what a previous ``carry`` round returned; it is added to this round's mean before truncation.
        residual_policy: ``drop`` (the truncated part is lost, as in the paper) or ``carry`` (return it). A carried
            residual is kept as factors (d_out + d_in) x m, m <= rank of the mean plus the previous residual, minus
            ``rank``; it grows by up to sum_u r_u - rank per round and becomes a dense d_out x d_in array once that
            is smaller, in the clients' dtype.
        workers: threads truncating modules in parallel, each with single-threaded BLAS; None = one per CPU.
        dtypes: the dtype each returned key comes back in (the global model's); a key not named here comes back
            in the first client's dtype. The carried residual of a module takes its B factor's dtype.
    """
    keys = _checked_keys(client_factors, weights, rank, residual_policy)
    pairs = list(lora_pairs) if lora_pairs is not None else find_lora_pairs(keys)
    for a_key, b_key in pairs:
        if a_key not in client_factors[0] or b_key not in client_factors[0]:
            raise ValueError(f"LoRA pair ({a_key!r}, {b_key!r}) is not in the clients' factors")
    modules = {module_name(a_key): (a_key, b_key) for a_key, b_key in pairs}
    if len(modules) != len(pairs):
        raise ValueError("two LoRA pairs map to the same module name")
    residual = dict(residual or {})
    unknown = sorted(set(residual) - {_residual_key(m, part) for m in modules for part in ("B", "A", "")})
    if unknown:
        raise ValueError(f"residual has entries for no LoRA module here: {unknown[:5]}")
    keep_rest = residual_policy == "carry"

    def aggregate_module(module: str) -> _Truncation:
        a_key, b_key = modules[module]
        Bs = [factors[b_key] for factors in client_factors]
        As = [factors[a_key] for factors in client_factors]
        carried = _carried(residual, module)
        if isinstance(carried, np.ndarray):  # a dense residual makes the mean dense too
            stacks = _stack(Bs, As, weights)
            return _dense_truncation(stacks.weighted_B() @ stacks.A.astype(np.float64) + carried, rank, keep_rest)
        return _factored_truncation(_stack(Bs, As, weights, extra=carried), rank, keep_rest)

    results = _map_modules(aggregate_module, list(modules), workers)

    lora_keys = {key for pair in pairs for key in pair}
    others = [key for key in keys if key not in lora_keys]
    averaged = (
        weighted_mean([{key: f[key] for key in others} for f in client_factors], weights, dtypes) if others else {}
    )
    factors, energy, paths, new_residual = {}, {}, {}, {}
    new_factors = {}
    for module, result in results.items():
        a_key, b_key = modules[module]
        B, A = split_factors(result.U, result.S, result.Vt)
        new_factors[b_key] = B.astype(_out_dtype(dtypes, b_key, client_factors[0][b_key]))
        new_factors[a_key] = A.astype(_out_dtype(dtypes, a_key, client_factors[0][a_key]))
        energy[module] = _energy_ratio(result)
        paths[module] = result.path
        if keep_rest:
            new_residual.update(_residual_entries(module, result.rest, new_factors[b_key].dtype))
    for key in keys:  # the clients' key order
        factors[key] = new_factors[key] if key in new_factors else averaged[key]
    return FRAResult(factors, energy, new_residual if keep_rest else None, paths)


def fra_lora_from_deltas(
    client_deltas: Sequence[Factors],
    weights: Sequence[float],
    rank: int,
    delta_keys: Sequence[str] | None = None,
    residual: Mapping[str, np.ndarray] | None = None,
    residual_policy: str = "drop",
    workers: int | None = None,
    dtypes: Dtypes | None = None,
) -> FRAResult:
    """FRA-LoRA for clients that upload each module's full update dW (d_out x d_in) instead of its factors.

    ``delta_keys`` name the dW arrays (default: every key ending in ``.delta``); module ``x``'s ``x.delta`` comes back
    as ``x.lora_B.weight`` and ``x.lora_A.weight`` of rank ``rank``; every other key is averaged. The weighted mean is
    truncated by a full SVD, or through its Gram matrix above ``PARTIAL_SVD_ABOVE`` when that is accurate to
    ``GRAM_RTOL`` (checked; otherwise the full SVD). A carried residual is dense here. ``dtypes`` names the dtype
    of returned keys, as in ``fra_lora_aggregate``; a module's factors default to its delta's dtype.
    """
    keys = _checked_keys(client_deltas, weights, rank, residual_policy)
    delta_keys = [key for key in keys if key.endswith(".delta")] if delta_keys is None else list(delta_keys)
    for key in delta_keys:
        if key not in client_deltas[0] or np.ndim(client_deltas[0][key]) != 2:
            raise ValueError(f"'{key}' is not a 2-D update in the clients' dicts")
    modules = {key.removesuffix(".delta"): key for key in delta_keys}
    residual = dict(residual or {})
    unknown = sorted(set(residual) - {_residual_key(m, "") for m in modules})
    if unknown:
        raise ValueError(f"residual has entries for no module here: {unknown[:5]}")
    keep_rest = residual_policy == "carry"

    def aggregate_module(module: str) -> _Truncation:
        key = modules[module]
        mean = weighted_mean([{key: np.asarray(d[key], np.float64)} for d in client_deltas], weights)[key]
        carried = residual.get(_residual_key(module, ""))
        return _dense_truncation(mean if carried is None else mean + carried, rank, keep_rest)

    results = _map_modules(aggregate_module, list(modules), workers)
    others = [key for key in keys if key not in set(delta_keys)]
    factors = weighted_mean([{key: d[key] for key in others} for d in client_deltas], weights, dtypes) if others else {}
    energy, paths, new_residual = {}, {}, {}
    for module, result in results.items():
        delta = client_deltas[0][modules[module]]
        b_key, a_key = f"{module}.lora_B.weight", f"{module}.lora_A.weight"
        B, A = split_factors(result.U, result.S, result.Vt)
        factors[b_key] = B.astype(_out_dtype(dtypes, b_key, delta))
        factors[a_key] = A.astype(_out_dtype(dtypes, a_key, delta))
        energy[module], paths[module] = _energy_ratio(result), result.path
        if keep_rest:
            new_residual.update(_residual_entries(module, result.rest, factors[b_key].dtype))
    return FRAResult(factors, energy, new_residual if keep_rest else None, paths)


def _map_modules(work: Callable[[str], _Truncation], modules: list[str], workers: int | None) -> dict[str, _Truncation]:
    """Run ``work`` on every module in ``workers`` threads, each with single-threaded BLAS.

    Modules are independent and each is a few BLAS/LAPACK calls that release the GIL: one module per core beats
    one module at a time on all cores, whose small LAPACK calls scale badly. Multi-threaded OpenBLAS also collapses
    when other jobs share the cores (a 1280 x 1280 SVD: 1 s on one thread, 17 s on two, measured), so even one
    worker keeps BLAS to one thread. The limit is process-wide while this runs (threadpoolctl).
    """
    workers = min(workers or os.cpu_count() or 1, len(modules))

    def run(module: str) -> _Truncation:
        if getattr(_workspace, "arrays", None) is None:
            _workspace.arrays = {}
        return work(module)  # nothing returned points into the workspace

    try:
        with _single_threaded_blas():
            if workers <= 1:
                return {module: run(module) for module in modules}
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return dict(zip(modules, pool.map(run, modules), strict=True))
    finally:
        _workspace.arrays = None  # the pool's threads are gone; this frees the calling thread's


def _single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # only speed depends on it
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _residual_key(module: str, part: str) -> str:
    return f"{module}.residual_{part}" if part else f"{module}.residual"


def _carried(residual: Mapping[str, np.ndarray], module: str) -> tuple[np.ndarray, np.ndarray] | np.ndarray | None:
    if _residual_key(module, "") in residual:
        return np.asarray(residual[_residual_key(module, "")], dtype=np.float64)
    if _residual_key(module, "B") in residual or _residual_key(module, "A") in residual:
        return residual[_residual_key(module, "B")], residual[_residual_key(module, "A")]
    return None


def _residual_entries(module: str, rest, dtype: np.dtype) -> dict[str, np.ndarray]:
    if isinstance(rest, np.ndarray):
        return {_residual_key(module, ""): rest.astype(dtype)}
    B_rest, A_rest = rest
    d_out, d_in = B_rest.shape[0], A_rest.shape[1]
    if B_rest.shape[1] * (d_out + d_in) >= d_out * d_in:  # the factors no longer save memory
        return {_residual_key(module, ""): (B_rest @ A_rest).astype(dtype)}
    return {_residual_key(module, "B"): B_rest.astype(dtype), _residual_key(module, "A"): A_rest.astype(dtype)}


def _energy_ratio(result: _Truncation) -> float:
    if not result.total_energy > 0:
        return 1.0
    return float(np.clip(np.sum(result.S**2) / result.total_energy, 0.0, 1.0))


def _float_dtype(array: np.ndarray) -> np.dtype:
    return array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)


def _out_dtype(dtypes: Dtypes | None, key: str, client_array: np.ndarray) -> np.dtype:
    """The dtype ``key`` is returned in: the one ``dtypes`` names, else the (float) dtype of the client's array."""
    return np.dtype(dtypes[key]) if dtypes and key in dtypes else _float_dtype(client_array)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and the naive baseline


def check_lora_update(update: Mapping[str, object], expected_shapes: Shapes | None, rank: int | None) -> str | None:
    """Why a client's LoRA factors cannot be aggregated (None if they can): rank, pairing, keys, shapes, NaN/Inf.

    A client's rank may be anything from 1 to ``rank`` (sites of different ranks); its factors' other dimension must
    be the expected one."""
    if not isinstance(update, Mapping) or not update:
        return update_problem(update, expected_shapes)
    try:
        pairs = find_lora_pairs(list(update))
    except ValueError as error:
        return str(error)
    for a_key, b_key in pairs:
        A, B = update[a_key], update[b_key]
        if not isinstance(A, np.ndarray) or not isinstance(B, np.ndarray):
            continue  # update_problem names it below
        if A.ndim != 2 or B.ndim != 2:
            return f"'{a_key}' and '{b_key}' must be 2-D, got shapes {A.shape} and {B.shape}"
        if A.shape[0] != B.shape[1]:
            return f"'{a_key}' has rank {A.shape[0]} but '{b_key}' has rank {B.shape[1]}"
        if rank is not None and not 1 <= A.shape[0] <= rank:
            return f"'{a_key}' has LoRA rank {A.shape[0]}, expected 1 to {rank} (the global adapter's)"
    if expected_shapes is not None:  # a site may train a lower rank than the global adapter's: its own sets the shape
        expected_shapes = dict(expected_shapes)
        for a_key, b_key in pairs:
            A, B = update[a_key], update[b_key]
            if isinstance(A, np.ndarray) and isinstance(B, np.ndarray) and {a_key, b_key} <= set(expected_shapes):
                expected_shapes[a_key] = (A.shape[0], tuple(expected_shapes[a_key])[-1])
                expected_shapes[b_key] = (tuple(expected_shapes[b_key])[0], B.shape[1])
    return update_problem(update, expected_shapes)


def leading_components(factors: Factors, rank: int, lora_pairs: Sequence[tuple[str, str]] | None = None) -> dict:
    """A rank-``rank`` site's share of global LoRA factors: the first ``rank`` columns of each B and rows of each A.

    FRA-LoRA's factors are U sqrt(S) and sqrt(S) V^T with S descending, so this is the best rank-``rank``
    approximation of the global update (Eckart-Young): the factorisation FRA-LoRA owes a site of that rank. For
    separately averaged factors, which have no such order, it is HetLoRA's truncation. Factors of rank ``rank`` or
    less, and every other key, pass through unchanged.
    """
    _check_rank(rank)
    out = dict(factors)
    for a_key, b_key in lora_pairs if lora_pairs is not None else find_lora_pairs(factors):
        A, B = np.asarray(factors[a_key]), np.asarray(factors[b_key])
        if A.shape[0] > rank:
            out[a_key], out[b_key] = A[:rank].copy(), B[:, :rank].copy()
    return out


def padded_to_rank(factors: Factors, rank: int, lora_pairs: Sequence[tuple[str, str]] | None = None) -> dict:
    """Every LoRA pair zero-padded to rank ``rank`` (B's extra columns, A's extra rows): B A is unchanged, and sites
    of different ranks get the equal shapes that averaging A and B separately needs (HetLoRA's zero-padding)."""
    _check_rank(rank)
    out = dict(factors)
    for a_key, b_key in lora_pairs if lora_pairs is not None else find_lora_pairs(factors):
        A, B = np.asarray(factors[a_key]), np.asarray(factors[b_key])
        if A.shape[0] > rank:
            raise ValueError(f"'{a_key}' has rank {A.shape[0]}, more than the {rank} to pad to")
        if A.shape[0] < rank:
            out[a_key] = np.concatenate([A, np.zeros((rank - A.shape[0], A.shape[1]), A.dtype)], axis=0)
            out[b_key] = np.concatenate([B, np.zeros((B.shape[0], rank - B.shape[1]), B.dtype)], axis=1)
    return out


def naive_factor_average(client_factors: Sequence[Factors], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """The baseline FRA-LoRA replaces: A and B averaged separately (NVFLARE's llm_hf example, Flower's FlowerTune)."""
    return weighted_mean(client_factors, weights)


def product_error(
    factors_mean: Factors,
    client_factors: Sequence[Factors],
    weights: Sequence[float],
    lora_pairs: Sequence[tuple[str, str]] | None = None,
) -> float:
    """||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F over all LoRA modules together (float64, dense).

    0 when the clients agree; the systematic error of averaging factors separately when they do not.
    """
    pairs = list(lora_pairs) if lora_pairs is not None else find_lora_pairs(list(factors_mean))
    total = _total_weight(weights, len(client_factors))
    error, norm = 0.0, 0.0
    for a_key, b_key in pairs:
        true_mean = sum(
            (float(w) / total) * (np.asarray(f[b_key], np.float64) @ np.asarray(f[a_key], np.float64))
            for w, f in zip(weights, client_factors, strict=True)
        )
        approx = np.asarray(factors_mean[b_key], np.float64) @ np.asarray(factors_mean[a_key], np.float64)
        error += float(np.sum((approx - true_mean) ** 2))
        norm += float(np.sum(true_mean**2))
    if norm == 0:
        return 0.0 if error == 0 else float("inf")
    return float(np.sqrt(error / norm))
