"""Weighted mean of model updates and the checks that keep a bad contribution out of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]
Dtypes = Mapping[str, np.dtype]
# What an update may carry: a float16 update is exact in float64, an int or bool array is not a model update.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def shapes_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(np.shape(value)) for name, value in weights.items()}


def dtypes_of(weights: Mapping[str, object]) -> dict[str, np.dtype]:
    """The dtype of every float array in ``weights`` (other entries are left out)."""
    return {
        name: value.dtype
        for name, value in weights.items()
        if isinstance(value, np.ndarray) and value.dtype in FLOAT_DTYPES
    }


def update_problem(update: Mapping[str, object], expected: Shapes | None) -> str | None:
    """Why ``update`` cannot be aggregated (None if it can): keys, shapes, dtype, NaN/Inf.

    Args:
        update: a client's named arrays; only plain float16/float32/float64 numpy arrays are accepted.
        expected: the shapes every key must have (also the exact key set), or None to skip that check.
    """
    if not isinstance(update, Mapping) or not update:
        return "the update is empty or not a dict of arrays"
    if not all(isinstance(name, str) for name in update):
        return "the update has keys that are not strings"
    if expected is not None:
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        if missing or extra:
            return f"keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})"
    for name, value in update.items():
        problem = array_problem(name, value)
        if problem:
            return problem
        if expected is not None and tuple(value.shape) != tuple(expected[name]):
            return f"'{name}' has shape {tuple(value.shape)}, expected {tuple(expected[name])}"
    return None


def array_problem(name: str, value: object) -> str | None:
    """Why ``value`` is not a usable array (None if it is): a plain float16/32/64 numpy array without NaN/Inf."""
    if type(value) is not np.ndarray:  # subclasses (masked arrays, matrices) can change what arithmetic means
        return f"'{name}' is a {type(value).__module__}.{type(value).__name__}, not a numpy float array"
    if value.dtype not in FLOAT_DTYPES:
        return f"'{name}' has dtype {value.dtype}; only float16, float32 and float64 arrays are accepted"
    if not np.all(np.isfinite(value)):
        return f"'{name}' contains NaN or Inf"
    return None


def range_problem(update: Mapping[str, np.ndarray], dtypes: Dtypes) -> str | None:
    """Why ``update`` would overflow the dtypes it is returned in (None if it fits).

    A mean of values that fit a dtype fits it too, so checking every contribution keeps Inf out of the result.

    Args:
        update: a client's checked arrays.
        dtypes: the dtype each key is returned in (keys not named here are not checked).
    """
    for name, value in update.items():
        dtype = dtypes.get(name)
        if dtype is None or value.size == 0 or np.finfo(dtype).bits >= np.finfo(value.dtype).bits:
            continue
        if float(np.max(np.abs(value))) > float(np.finfo(dtype).max):
            return f"'{name}' has values beyond the {np.dtype(dtype).name} range of the global model"
    return None


def weight_problem(weight: object, max_weight: float) -> str | None:
    """Why ``weight`` cannot weigh a contribution (None if it can): a real number in (0, max_weight], not a bool."""
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, float, np.integer, np.floating)):
        return f"invalid weight {weight!r}: not a real number"
    value = weight.item() if isinstance(weight, np.generic) else weight  # compare as Python numbers, not float16
    if not 0 < value <= max_weight:  # NaN fails every comparison; a huge int is compared exactly
        return f"invalid weight {weight!r}: must be in (0, {max_weight:g}]"
    return None


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], dtypes: Dtypes | None = None
) -> dict[str, np.ndarray]:
    """Sum_i w_i x_i / sum_i w_i per key, accumulated in float64.

    Args:
        updates: one dict of arrays per client, all with the first one's keys.
        weights: one finite non-negative weight per update, summing to a positive number.
        dtypes: the dtype each key is returned in; a key not named here comes back in the first update's dtype.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    values = np.asarray(weights, dtype=np.float64)
    total = float(np.sum(values))
    if not np.all(np.isfinite(values)) or np.any(values < 0) or not total > 0:
        raise ValueError("weights must be finite, non-negative and sum to a positive number")
    dtypes = dtypes or {}
    result = {}
    for name, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        scratch = np.empty(first.shape, dtype=np.float64)  # one buffer per key: no temporaries per client
        for update, weight in zip(updates, values, strict=True):
            # Normalised weights keep every partial sum within the inputs' range: no overflow before the cast.
            np.multiply(update[name], weight / total, out=scratch, dtype=np.float64)
            acc += scratch
        result[name] = acc.astype(dtypes.get(name, first.dtype), copy=False)
    return result
