import numpy as np
import pytest
from scipy import sparse
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score, roc_curve

from pharmafl.core.errors import InputError
from pharmafl.privacy.membership import (
    _resample_counts,
    _weighted_auc_and_tprs,
    attack_metrics,
    bit_presence_scores,
    loss_attack_scores,
    nonzero_rows,
    rmia_scores,
)

N_FEATURES = 10
N_CANDIDATES = 2000  # members and non-members each
N_REFERENCES = 4


def true_label_probs(model, X, y):
    return model.predict_proba(X)[np.arange(len(y)), y]


def cross_entropy(probs):
    return -np.log(np.clip(probs, 1e-7, 1.0))


def forest(X, y, seed):
    # no bootstrap, unlimited depth: every tree fits every training point, so members get probability 1
    return RandomForestClassifier(n_estimators=20, bootstrap=False, random_state=seed).fit(X, y)


@pytest.fixture(scope="module")
def world():
    """Gaussian features with random binary labels: nothing to learn, so any signal is memorisation.

    Members and non-members come from the same distribution; reference models and population samples are disjoint
    from both and from each other.
    """
    rng = np.random.default_rng(0)

    def draw(n):
        return rng.standard_normal((n, N_FEATURES)), rng.integers(0, 2, n)

    members, non_members, population = draw(N_CANDIDATES), draw(N_CANDIDATES), draw(N_CANDIDATES)
    references = [forest(*draw(N_CANDIDATES), seed=10 + i) for i in range(N_REFERENCES)]
    X = np.vstack([members[0], non_members[0]])
    y = np.concatenate([members[1], non_members[1]])
    is_member = np.arange(2 * N_CANDIDATES) < N_CANDIDATES
    return {
        "members": members,
        "unseen": draw(N_CANDIDATES),
        "X": X,
        "y": y,
        "is_member": is_member,
        "reference_probs": np.stack([true_label_probs(m, X, y) for m in references]),
        "population": population,
        "population_reference_probs": np.stack([true_label_probs(m, *population) for m in references]),
    }


def attack(world, target):
    target_probs = true_label_probs(target, world["X"], world["y"])
    loss = loss_attack_scores(cross_entropy(target_probs))
    rmia = rmia_scores(
        target_probs,
        world["reference_probs"],
        true_label_probs(target, *world["population"]),
        world["population_reference_probs"],
    )
    return loss, rmia


def test_memorising_model_is_detected_by_both_attacks(world):
    loss, rmia = attack(world, forest(*world["members"], seed=1))
    for scores in (loss, rmia):
        metrics = attack_metrics(scores, world["is_member"], n_bootstrap=50)
        assert metrics["auc"] > 0.9
        assert metrics["tpr_at_fpr_0.01"] > 0.1
        assert metrics["auc_ci"][0] > 0.85


def test_model_that_never_saw_the_members_gives_chance_auc(world):
    loss, rmia = attack(world, forest(*world["unseen"], seed=1))
    for scores in (loss, rmia):
        metrics = attack_metrics(scores, world["is_member"])
        assert abs(metrics["auc"] - 0.5) < 0.05
        assert metrics["auc_ci"][0] <= 0.5 <= metrics["auc_ci"][1]


def test_loss_scores_are_negated_losses_and_reject_nan():
    assert np.array_equal(loss_attack_scores(np.array([0.1, 2.0])), [-0.1, -2.0])
    with pytest.raises(InputError, match="non-finite"):
        loss_attack_scores(np.array([0.1, np.nan]))


def test_rmia_matches_hand_computation_with_offline_correction():
    target = np.array([0.9, 0.2])
    refs = np.array([[0.5, 0.4], [0.3, 0.4]])  # OUT mean 0.4 for both targets
    pop_target = np.array([0.5, 0.8, 0.1])
    pop_refs = np.array([[0.6, 0.2, 0.1], [0.2, 0.2, 0.1]])  # OUT means 0.4, 0.2, 0.1

    # a = 0.5: Pr(x) = (1.5 * 0.4 + 0.5) / 2 = 0.55, ratios x = 0.9/0.55 = 1.636, 0.2/0.55 = 0.364;
    # Pr(z) = 0.55, 0.4, 0.325, ratios z = 0.909, 2.0, 0.308.
    # gamma 1: x0 beats 0.909 and 0.308, x1 beats 0.308 only.
    assert np.allclose(rmia_scores(target, refs, pop_target, pop_refs, offline_a=0.5, gamma=1.0), [2 / 3, 1 / 3])
    # gamma 2: x0 / z > 2 only against 0.308 (5.3; 1.636 / 0.909 = 1.8), x1 never (0.364 / 0.308 = 1.18).
    assert np.allclose(rmia_scores(target, refs, pop_target, pop_refs, offline_a=0.5, gamma=2.0), [1 / 3, 0.0])
    # a = 1 (no correction): ratios x = 2.25, 0.5; z = 1.25, 4.0, 1.0: x1 now beats nothing.
    assert np.allclose(rmia_scores(target, refs, pop_target, pop_refs, offline_a=1.0, gamma=1.0), [2 / 3, 0.0])


def test_rmia_survives_zero_probabilities():
    scores = rmia_scores(np.array([0.0, 1.0]), np.zeros((2, 2)), np.array([0.0, 0.5]), np.zeros((2, 2)), offline_a=1)
    assert np.all(np.isfinite(scores))
    assert scores[1] == 1.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.ones(3) / 2, np.ones((2, 4)) / 2, np.ones(5) / 2, np.ones((2, 5)) / 2), "reference_probs must have shape"),
        ((np.ones(3) / 2, np.ones((2, 3)) / 2, np.ones(5) / 2, np.ones((3, 5)) / 2), "same reference models"),
        ((np.ones(3) / 2, np.ones((2, 3)) / 2, np.ones(5) / 2, np.ones((2, 4)) / 2), "population_reference_probs"),
        ((np.array([0.5, 1.5]), np.ones((2, 2)) / 2, np.ones(5) / 2, np.ones((2, 5)) / 2), r"in \[0, 1\]"),
        ((np.array([0.5, np.nan]), np.ones((2, 2)) / 2, np.ones(5) / 2, np.ones((2, 5)) / 2), "non-finite"),
        ((np.ones(3) / 2, np.ones((2, 3)) / 2, np.ones(0), np.ones((2, 0))), "empty"),
    ],
)
def test_rmia_rejects_bad_inputs(args, match):
    with pytest.raises(InputError, match=match):
        rmia_scores(*args)


def test_attack_metrics_auc_and_tpr_match_sklearn_on_tied_scores():
    rng = np.random.default_rng(1)
    is_member = rng.random(3000) < 0.3
    scores = np.round(rng.standard_normal(3000) + is_member, 1)  # rounding makes ties
    metrics = attack_metrics(scores, is_member, fprs=(0.01, 0.1), n_bootstrap=0)
    assert metrics["auc"] == pytest.approx(roc_auc_score(is_member, scores))
    assert metrics["auc_ci"] is None

    # the vectorised statistic used on resamples equals sklearn on the unweighted data
    pos, neg = scores[is_member], scores[~is_member]
    aucs, tprs = _weighted_auc_and_tprs(pos, neg, np.ones((1, pos.size)), np.ones((1, neg.size)), (0.01, 0.1))
    fpr, tpr, _ = roc_curve(is_member, scores)
    assert aucs[0] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)
    assert np.allclose(tprs[0], [tpr[fpr <= t].max() for t in (0.01, 0.1)])
    assert np.allclose(tprs[0], [metrics["tpr_at_fpr_0.01"], metrics["tpr_at_fpr_0.1"]])


def test_bootstrap_statistic_equals_sklearn_on_each_explicit_resample():
    rng = np.random.default_rng(2)
    pos, neg = np.round(rng.standard_normal(80) + 1, 1), np.round(rng.standard_normal(120), 1)
    pos_counts, neg_counts = _resample_counts(rng, 5, pos.size), _resample_counts(rng, 5, neg.size)
    assert np.all(pos_counts.sum(axis=1) == pos.size)
    aucs, tprs = _weighted_auc_and_tprs(pos, neg, pos_counts, neg_counts, (0.05,))
    for b in range(5):
        resampled = np.concatenate(
            [np.repeat(pos, pos_counts[b].astype(int)), np.repeat(neg, neg_counts[b].astype(int))]
        )
        truth = np.arange(resampled.size) < pos.size
        fpr, tpr, _ = roc_curve(truth, resampled)
        assert aucs[b] == pytest.approx(roc_auc_score(truth, resampled), abs=1e-12)
        assert tprs[b, 0] == pytest.approx(tpr[fpr <= 0.05].max())


def test_tpr_at_fpr_on_a_constructed_example():
    non_members = np.arange(1000.0)  # scores 0..999
    # 30 members above every non-member, 20 between 998 and 999, 10 between 990 and 991, 40 below everything
    members = np.repeat([2000.0, 998.5, 990.5, -1.0], [30, 20, 10, 40])
    scores = np.concatenate([members, non_members])
    is_member = np.arange(scores.size) < members.size
    metrics = attack_metrics(scores, is_member)
    # FPR <= 0.1%: one false positive allowed (999), threshold above 998 -> 50 members
    assert metrics["tpr_at_fpr_0.001"] == pytest.approx(0.5)
    # FPR <= 1%: ten false positives allowed (990..999), threshold above 989 -> 60 members
    assert metrics["tpr_at_fpr_0.01"] == pytest.approx(0.6)
    assert metrics["fpr_resolution"] == pytest.approx(0.001)
    assert (metrics["n_members"], metrics["n_non_members"]) == (100, 1000)


def test_bootstrap_intervals_bracket_the_estimates_and_are_seeded():
    rng = np.random.default_rng(3)
    is_member = rng.random(4000) < 0.5
    scores = rng.standard_normal(4000) + 0.5 * is_member
    metrics = attack_metrics(scores, is_member, seed=7)
    for key in ("auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"):
        lo, hi = metrics[f"{key}_ci"]
        assert lo <= metrics[key] <= hi
    assert metrics["auc_ci"][1] - metrics["auc_ci"][0] < 0.08
    assert attack_metrics(scores, is_member, seed=7) == metrics
    assert attack_metrics(scores, is_member, seed=8)["auc_ci"] != metrics["auc_ci"]


def test_attack_metrics_rejects_bad_inputs():
    scores = np.array([0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="both members and non-members"):
        attack_metrics(scores, np.ones(3, dtype=bool))
    with pytest.raises(InputError, match="same shape as scores"):
        attack_metrics(scores, np.array([True, False]))
    with pytest.raises(InputError, match="boolean"):
        attack_metrics(scores, np.array([0, 1, 2]))
    with pytest.raises(InputError, match=r"FPR must lie in \(0, 1\)"):
        attack_metrics(scores, np.array([True, False, True]), fprs=(0.0,))


def test_bit_presence_scores_constructed_example():
    # compound 0: bits {0, 1}; compound 1: bits {1, 2, 3, 4}; compound 2: no bits
    X = sparse.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]))
    mask = np.array([True, True, True, False, False, False])
    assert np.allclose(bit_presence_scores(mask, X), [1.0, 0.5, 0.0])
    with pytest.raises(InputError, match="6 columns"):
        bit_presence_scores(mask, X[:, :5])


def test_nonzero_rows_respects_atol():
    update = np.array([[0.0, 0.0], [0.0, 1e-9], [-0.5, 0.0]])
    assert np.array_equal(nonzero_rows(update), [False, True, True])
    assert np.array_equal(nonzero_rows(update, atol=1e-6), [False, False, True])
    with pytest.raises(InputError, match="2-D"):
        nonzero_rows(np.zeros(3))


def lazy_adam_trunk_update(rng, X, compounds, hidden=8):
    """The embedding update lazy Adam leaves: non-zero exactly in the rows of bits the compounds contain."""
    touched = np.asarray(X[compounds].sum(axis=0)).ravel() > 0
    return rng.standard_normal((X.shape[1], hidden)) * touched[:, None]


def test_site_update_reveals_its_members_and_secure_aggregation_blurs_them():
    rng = np.random.default_rng(4)
    n_compounds, n_features, bits_per_compound = 1500, 4096, 30
    rows = np.repeat(np.arange(n_compounds), bits_per_compound)
    cols = np.concatenate([rng.choice(n_features, bits_per_compound, replace=False) for _ in range(n_compounds)])
    X = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n_compounds, n_features))
    sites = np.arange(500).reshape(10, 50)  # ten sites of 50 compounds; compounds 500.. are nobody's
    is_member = np.zeros(n_compounds, dtype=bool)
    is_member[sites[0]] = True

    one_site = bit_presence_scores(nonzero_rows(lazy_adam_trunk_update(rng, X, sites[0])), X)
    assert np.all(one_site[sites[0]] == 1.0)
    # the other sites' compounds are not members of site 0: score only the truth (site 0) against outsiders
    candidates = np.concatenate([sites[0], np.arange(500, n_compounds)])
    single_auc = attack_metrics(one_site[candidates], is_member[candidates], n_bootstrap=0)["auc"]

    aggregate = bit_presence_scores(nonzero_rows(lazy_adam_trunk_update(rng, X, sites.ravel())), X)
    assert np.all(aggregate[sites.ravel()] == 1.0)
    aggregate_auc = attack_metrics(aggregate[candidates], is_member[candidates], n_bootstrap=0)["auc"]
    assert single_auc > 0.99
    assert aggregate_auc < single_auc - 0.05
