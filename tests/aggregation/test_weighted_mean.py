import numpy as np
import pytest
import torch

from pharmafl.aggregation.weighted_mean import (
    range_problem,
    shapes_of,
    update_problem,
    weight_problem,
    weighted_mean,
)


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
    with pytest.raises(ValueError):
        weighted_mean([{"a": np.ones(2)}, {"a": np.ones(2)}], [float("inf"), 1.0])
    with pytest.raises(ValueError):
        weighted_mean([{"a": np.ones(2)}, {"a": np.ones(2)}], [-1.0, 2.0])


@pytest.mark.parametrize(
    "update, fragment",
    [
        ({}, "empty"),
        ({"a": np.ones(2)}, "missing ['b']"),
        ({"a": np.ones(2), "b": np.ones(3), "c": np.ones(1)}, "unexpected ['c']"),
        ({"a": np.ones(3), "b": np.ones(3)}, "shape (3,)"),
        ({"a": np.array([1.0, np.nan]), "b": np.ones(3)}, "NaN"),
        ({"a": np.array([1.0, np.inf]), "b": np.ones(3)}, "NaN or Inf"),
        ({"a": "text", "b": np.ones(3)}, "not a numpy float array"),
        ({"a": np.ones(2, dtype=bool), "b": np.ones(3)}, "dtype bool"),
        ({"a": np.ones(2, dtype=np.int8), "b": np.ones(3)}, "dtype int8"),
        ({"a": np.ones(2, dtype=np.uint8), "b": np.ones(3)}, "dtype uint8"),
        ({"a": np.ones(2, dtype=np.int64), "b": np.ones(3)}, "dtype int64"),
        ({"a": np.ones(2, dtype=np.complex64), "b": np.ones(3)}, "dtype complex64"),
        ({"a": np.array([1.0, 2.0], dtype=object), "b": np.ones(3)}, "dtype object"),
        ({"a": torch.ones(2), "b": np.ones(3)}, "torch.Tensor, not a numpy float array"),
        ({"a": np.ma.masked_array(np.ones(2), mask=[True, False]), "b": np.ones(3)}, "MaskedArray"),
        ({1: np.ones(2), "b": np.ones(3)}, "not strings"),
    ],
)
def test_update_problem_names_the_defect(update, fragment):
    expected = {"a": (2,), "b": (3,)}
    problem = update_problem(update, expected)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_valid_update_has_no_problem(dtype):
    update = {"a": np.ones(2, dtype=dtype), "b": np.zeros(3, dtype=dtype)}
    assert update_problem(update, shapes_of(update)) is None


@pytest.mark.parametrize(
    "weight", [True, np.bool_(False), 0, -1.0, float("nan"), float("inf"), 1e308, 10**400, "5", None, 2j, 1e6 + 1]
)
def test_weight_problem_refuses_what_is_not_a_positive_real_up_to_the_cap(weight):
    assert "invalid weight" in weight_problem(weight, 1e6)


@pytest.mark.parametrize("weight", [1, 1e6, 0.5, np.int32(3), np.float16(2.0), np.uint64(10)])
def test_weight_problem_accepts_positive_reals_and_numpy_scalars(weight):
    assert weight_problem(weight, 1e6) is None


def test_float16_updates_are_accumulated_in_float64_and_returned_in_the_requested_dtype():
    updates = [{"a": np.full(3, 60000.0, dtype=np.float16)}, {"a": np.full(3, 1.0, dtype=np.float16)}]
    mean = weighted_mean(updates, [1e6, 1.0], dtypes={"a": np.dtype(np.float32)})
    assert mean["a"].dtype == np.float32
    np.testing.assert_allclose(mean["a"], (1e6 * 60000.0 + 1.0) / (1e6 + 1), rtol=1e-6)
    assert weighted_mean(updates, [1.0, 1.0])["a"].dtype == np.float16  # no dtype asked: the first update's


def test_weighted_mean_of_extreme_finite_values_does_not_overflow():
    big = np.finfo(np.float64).max * 0.75  # two of them sum past the largest float64
    mean = weighted_mean([{"a": np.full(2, big)}, {"a": np.full(2, big)}], [1.0, 1.0])
    np.testing.assert_allclose(mean["a"], big)


def test_range_problem_names_values_the_target_dtype_cannot_hold():
    assert "float32 range" in range_problem({"a": np.array([1e39])}, {"a": np.dtype(np.float32)})
    assert "float16 range" in range_problem({"a": np.array([7e4], np.float32)}, {"a": np.dtype(np.float16)})
    assert range_problem({"a": np.array([1e38])}, {"a": np.dtype(np.float32)}) is None
    assert range_problem({"a": np.array([1e300])}, {}) is None  # no target named: nothing to overflow
