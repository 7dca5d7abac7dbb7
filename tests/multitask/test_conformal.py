"""Mondrian inductive conformal prediction: valid at the nominal confidence on exchangeable data, and efficient
in proportion to how well the scores separate the classes."""

import numpy as np
import pytest

from pharmafl.multitask.conformal import class_p_values, conformal_summary


def _task(rng, n, separation):
    labels = np.where(rng.random(n) < 0.3, 1, -1)
    scores = 1 / (1 + np.exp(-(separation * (labels > 0) - separation / 2 + rng.normal(0, 1, n))))
    return labels, scores


def _summary(separation):
    rng = np.random.default_rng(0)
    columns = [(_task(rng, 4000, separation), _task(rng, 4000, separation)) for _ in range(3)]
    calibration = tuple(np.stack([c[0][i] for c in columns], axis=1) for i in (0, 1))
    test = tuple(np.stack([c[1][i] for c in columns], axis=1) for i in (0, 1))
    return conformal_summary(calibration, test)


@pytest.mark.parametrize("separation", [0.5, 3.0])
def test_validity_is_the_confidence_on_exchangeable_data(separation):
    summary = _summary(separation)
    assert summary["tasks"] == 3 and summary["labels"] == 12000
    for level in ("0.8", "0.9"):
        assert summary[level]["validity"] == pytest.approx(float(level), abs=0.02)


def test_separated_scores_give_more_confident_sets():
    assert _summary(3.0)["0.8"]["efficiency"] > _summary(0.5)["0.8"]["efficiency"] + 0.2


def test_p_values_count_the_calibration_compounds_of_the_same_class():
    calibration_scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    calibration_labels = np.array([0, 0, 0, 1, 1, 1])
    p = class_p_values(calibration_scores, calibration_labels, np.array([0.25]))
    # inactive: nonconformity p = 0.25; calibration inactives 0.1, 0.2, 0.3 -> one at least as large
    # active: nonconformity 1 - p = 0.75; calibration actives 0.3, 0.2, 0.1 -> none at least as large
    assert p[0].tolist() == pytest.approx([(1 + 1) / 4, (0 + 1) / 4])


def test_tasks_with_too_few_calibration_labels_are_left_out():
    labels = np.array([[1], [-1], [1], [0]])
    scores = np.array([[0.9], [0.1], [0.8], [0.5]])
    assert conformal_summary((labels, scores), (labels, scores))["tasks"] == 0
