"""Classification metrics, one implementation used by executors, baselines and reports."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    matthews_corrcoef,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

CALIBRATION_PRIOR = 0.1  # SparseChem's calibrated AUC-PR: precision as if 10% of the compounds were active


def _ranking_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """True- and false-positive counts at each distinct score, highest first (None without both classes)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    hits, scores_sorted = y_true[order], scores[order]
    # one point per distinct score: the last position of each tie block
    last = np.r_[np.flatnonzero(np.diff(scores_sorted)), len(scores_sorted) - 1]
    true_positives = np.cumsum(hits)[last]
    false_positives = last + 1 - true_positives
    if true_positives[-1] == 0 or false_positives[-1] == 0:
        return None
    return true_positives, false_positives


def _average_precision(tpr: np.ndarray, precision: np.ndarray) -> float:
    return float(np.sum(np.diff(np.r_[0.0, tpr]) * precision))


def calibrated_auc_pr(y_true: np.ndarray, scores: np.ndarray, prior: float = CALIBRATION_PRIOR) -> float:
    """Average precision with calibrated precision (Siblini et al. 2020, as SparseChem reports it).

    Precision at each threshold is recomputed as if the positives were a ``prior`` share of the compounds,
    prior * TPR / (prior * TPR + (1 - prior) * FPR), so tasks with different active rates compare.
    """
    return binary_auc(y_true, scores, prior)["auc_pr_cal"]


def binary_auc(y_true: np.ndarray, scores: np.ndarray, prior: float = CALIBRATION_PRIOR) -> dict[str, float]:
    """AUC-ROC, AUC-PR (average precision), calibrated AUC-PR and Brier score of one task; y_true is 0/1.

    One sort per task gives all three curves; AUC-ROC and AUC-PR equal scikit-learn's
    ``roc_auc_score`` and ``average_precision_score`` (ties included) at a fraction of their
    per-call cost, which dominated per-round scoring over hundreds of tasks.
    """
    scores = np.asarray(scores, dtype=float)
    brier = float(np.mean((scores - np.asarray(y_true, dtype=float)) ** 2))
    curve = _ranking_curve(y_true, scores)
    if curve is None:
        return {"auc_roc": float("nan"), "auc_pr": float("nan"), "auc_pr_cal": float("nan"), "brier": brier}
    true_positives, false_positives = curve
    tpr, fpr = true_positives / true_positives[-1], false_positives / false_positives[-1]
    return {
        "auc_roc": float(np.trapezoid(np.r_[0.0, tpr], np.r_[0.0, fpr])),
        "auc_pr": _average_precision(tpr, true_positives / (true_positives + false_positives)),
        "auc_pr_cal": _average_precision(tpr, prior * tpr / (prior * tpr + (1 - prior) * fpr)),
        "brier": brier,
    }


def per_task_auc(
    labels: np.ndarray, scores: np.ndarray, task_ids: list[str], min_actives: int, min_inactives: int
) -> dict[str, dict[str, float]]:
    """Per-task AUCs over the observed labels (+1 active, -1 inactive, 0 unobserved).

    Only tasks with at least ``min_actives`` actives and ``min_inactives`` inactives are evaluated
    (the evaluation quorum), so a handful of labels never produces a misleading AUC.
    """
    results: dict[str, dict[str, float]] = {}
    for column, task_id in enumerate(task_ids):
        observed = labels[:, column] != 0
        y_true = (labels[observed, column] > 0).astype(np.int8)
        actives = int(y_true.sum())
        if actives < min_actives or len(y_true) - actives < min_inactives:
            continue
        results[task_id] = binary_auc(y_true, scores[observed, column])
    return results


def summarize(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Means over the evaluated tasks of AUC-ROC, AUC-PR, calibrated AUC-PR and Brier (NaN when none passed)."""
    names = ("auc_roc", "auc_pr", "auc_pr_cal", "brier")
    if not per_task:
        return {**dict.fromkeys(names, float("nan")), "tasks_evaluated": 0}
    means = {name: float(np.nanmean([m.get(name, np.nan) for m in per_task.values()])) for name in names}
    return {**means, "tasks_evaluated": len(per_task)}


def regression_metrics(y_true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """R² (1 - residual / total sum of squares; NaN when the values do not vary) and RMSE of one task."""
    y_true, predicted = np.asarray(y_true, dtype=float), np.asarray(predicted, dtype=float)
    residual = float(np.sum((y_true - predicted) ** 2))
    total = float(np.sum((y_true - y_true.mean()) ** 2))
    return {"r2": 1.0 - residual / total if total > 0 else float("nan"), "rmse": float(np.sqrt(residual / len(y_true)))}


def token_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Binary metrics over residues: accuracy, precision, recall, F1, MCC at ``threshold``, and AUC-ROC.

    Undefined ratios count as 0 (sklearn ``zero_division=0``); AUC-ROC is NaN when only one class is present.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if y_true.shape != scores.shape:
        raise ValueError(f"got {y_true.size} labels but {scores.size} scores")
    y_pred = (scores >= threshold).astype(int)
    auc = float(roc_auc_score(y_true, scores)) if len(np.unique(y_true)) == 2 else float("nan")
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if y_true.size else float("nan"),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)) if y_true.size else 0.0,
        "auc_roc": auc,
    }


def validation_threshold(y_val: np.ndarray, scores_val: np.ndarray) -> float:
    """The score threshold with the highest F1 on a validation set (0.5 when it has no positive)."""
    y_val = np.asarray(y_val).astype(int).ravel()
    if not y_val.any():
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y_val, np.asarray(scores_val, dtype=float).ravel())
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], np.finfo(float).tiny)
    return float(thresholds[int(np.argmax(f1))])


def ranked_metrics(
    y_val: np.ndarray, scores_val: np.ndarray, y_test: np.ndarray, scores_test: np.ndarray
) -> dict[str, float]:
    """Test AUPRC and AUROC (threshold-free), and F1 and MCC at the threshold chosen on validation (best F1)."""
    y_test = np.asarray(y_test).astype(int).ravel()
    scores_test = np.asarray(scores_test, dtype=float).ravel()
    threshold = validation_threshold(y_val, scores_val)
    two_classes = len(np.unique(y_test)) == 2
    at = token_metrics(y_test, scores_test, threshold)
    return {
        "auprc": float(average_precision_score(y_test, scores_test)) if two_classes else float("nan"),
        "auroc": at["auc_roc"],
        "threshold": threshold,
        "f1": at["f1"],
        "mcc": at["mcc"],
    }


def mean_std(values) -> dict:
    """Mean and sample standard deviation over seeds of the finite values (None and NaN left out): ``mean``,
    ``std`` (0 for one value), ``n`` and the ``values`` themselves; NaN mean and std when none is left."""
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not kept:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "values": []}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return {"mean": float(np.mean(kept)), "std": std, "n": len(kept), "values": kept}
