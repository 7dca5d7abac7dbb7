"""Mondrian (class-conditional) inductive conformal prediction for binary tasks, as MELLODDY reported it.

Calibrated on one fold (the validation fold) and applied to another (the test fold): at confidence 1 - epsilon a
compound's prediction set holds every class whose p-value exceeds epsilon. *Efficiency* is the share of
single-label (confident) sets, *validity* the share of sets that hold the true label, which the method guarantees
to be at least the confidence per class when calibration and test compounds are exchangeable.
"""

from __future__ import annotations

import numpy as np

CONFIDENCES = (0.8, 0.9)
MIN_CALIBRATION = 5  # labels of each class in the calibration fold before a task is calibrated


def class_p_values(calibration_scores: np.ndarray, calibration_labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p-values (compounds x 2: inactive, active) of each class for ``scores``, one task.

    Nonconformity of class 1 is 1 - p, of class 0 is p; each class is compared with the calibration compounds of
    that class only (Mondrian), p = (#{calibration nonconformity >= test nonconformity} + 1) / (n_class + 1).
    """
    p_values = np.empty((len(scores), 2))
    for cls in (0, 1):
        reference = calibration_scores[calibration_labels == cls]
        reference_alpha = np.sort(reference if cls == 0 else 1.0 - reference)
        alpha = scores if cls == 0 else 1.0 - scores
        at_least = len(reference_alpha) - np.searchsorted(reference_alpha, alpha, side="left")
        p_values[:, cls] = (at_least + 1) / (len(reference_alpha) + 1)
    return p_values


def conformal_summary(
    calibration: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], confidences=CONFIDENCES
) -> dict:
    """Efficiency and validity per confidence over all tasks' labelled test compounds.

    ``calibration`` and ``test``: (labels, scores), compounds x tasks; labels +1 active, -1 inactive, 0 unknown.
    Tasks with fewer than ``MIN_CALIBRATION`` calibration labels of either class are left out (counted).
    """
    cal_labels, cal_scores = calibration
    test_labels, test_scores = test
    sets_single = {c: 0 for c in confidences}
    sets_valid = {c: 0 for c in confidences}
    total, tasks = 0, 0
    for task in range(cal_labels.shape[1]):
        cal_seen, test_seen = cal_labels[:, task] != 0, test_labels[:, task] != 0
        y_cal = (cal_labels[cal_seen, task] > 0).astype(int)
        if min(y_cal.sum(), len(y_cal) - y_cal.sum()) < MIN_CALIBRATION or not test_seen.any():
            continue
        tasks += 1
        y_test = (test_labels[test_seen, task] > 0).astype(int)
        p_values = class_p_values(cal_scores[cal_seen, task], y_cal, test_scores[test_seen, task])
        total += len(y_test)
        for confidence in confidences:
            in_set = p_values > 1.0 - confidence
            sets_single[confidence] += int((in_set.sum(axis=1) == 1).sum())
            sets_valid[confidence] += int(in_set[np.arange(len(y_test)), y_test].sum())
    return {
        "tasks": tasks,
        "labels": total,
        **{
            f"{confidence:g}": {
                "efficiency": sets_single[confidence] / total if total else float("nan"),
                "validity": sets_valid[confidence] / total if total else float("nan"),
            }
            for confidence in confidences
        },
    }
