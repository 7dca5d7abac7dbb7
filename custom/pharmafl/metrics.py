"""Classification metrics, one implementation used by executors, baselines and reports."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)


def binary_auc(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC-ROC and AUC-PR (average precision) of one task; y_true is 0/1."""
    return {
        "auc_roc": float(roc_auc_score(y_true, scores)),
        "auc_pr": float(average_precision_score(y_true, scores)),
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
    """Mean AUC-ROC and AUC-PR over evaluated tasks (NaN when none passed the quorum)."""
    if not per_task:
        return {"auc_roc": float("nan"), "auc_pr": float("nan"), "tasks_evaluated": 0}
    return {
        "auc_roc": float(np.mean([m["auc_roc"] for m in per_task.values()])),
        "auc_pr": float(np.mean([m["auc_pr"] for m in per_task.values()])),
        "tasks_evaluated": len(per_task),
    }


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
