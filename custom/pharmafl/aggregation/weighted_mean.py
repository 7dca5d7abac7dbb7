"""Weighted mean of model updates and the checks that keep a bad contribution out of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(np.shape(value)) for name, value in weights.items()}


def update_problem(update: Mapping[str, object], expected: Shapes | None) -> str | None:
    """Why ``update`` cannot be aggregated (None if it can): keys, shapes, dtype, NaN/Inf."""
    if not isinstance(update, Mapping) or not update:
        return "the update is empty or not a dict of arrays"
    if expected is not None:
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        if missing or extra:
            return f"keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})"
    for name, value in update.items():
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
            return f"'{name}' is not a numeric array ({type(value).__name__})"
        if expected is not None and tuple(value.shape) != tuple(expected[name]):
            return f"'{name}' has shape {tuple(value.shape)}, expected {tuple(expected[name])}"
        if not np.all(np.isfinite(value)):
            return f"'{name}' contains NaN or Inf"
    return None


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Sum_i w_i x_i / sum_i w_i, per key, accumulated in float64 and returned in the inputs' dtype."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(np.sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    result = {}
    for name, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc += float(weight) * update[name]
        result[name] = (acc / total).astype(first.dtype, copy=False)
    return result
