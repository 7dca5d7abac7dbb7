import numpy as np
import pytest

from pharmafl.aggregation.weighted_mean import shapes_of, update_problem, weighted_mean


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    updates = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)} for _ in range(4)]
    weights = [1.0, 2.0, 3.5, 0.5]
    mean = weighted_mean(updates, weights)
    for key in ("a", "b"):
        expected = np.average(np.stack([u[key] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(mean[key], expected, rtol=1e-6)
    assert mean["a"].dtype == np.float32


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([{"a": np.ones(2)}], [0.0])
    with pytest.raises(ValueError):
        weighted_mean([{"a": np.ones(2)}], [1.0, 2.0])


@pytest.mark.parametrize(
    "update, fragment",
    [
        ({}, "empty"),
        ({"a": np.ones(2)}, "missing ['b']"),
        ({"a": np.ones(2), "b": np.ones(3), "c": np.ones(1)}, "unexpected ['c']"),
        ({"a": np.ones(3), "b": np.ones(3)}, "shape (3,)"),
        ({"a": np.array([1.0, np.nan]), "b": np.ones(3)}, "NaN"),
        ({"a": np.array([1.0, np.inf]), "b": np.ones(3)}, "NaN or Inf"),
        ({"a": "text", "b": np.ones(3)}, "not a numeric array"),
    ],
)
def test_update_problem_names_the_defect(update, fragment):
    expected = {"a": (2,), "b": (3,)}
    problem = update_problem(update, expected)
    assert problem is not None and fragment in problem


def test_valid_update_has_no_problem():
    update = {"a": np.ones(2), "b": np.zeros(3)}
    assert update_problem(update, shapes_of(update)) is None
