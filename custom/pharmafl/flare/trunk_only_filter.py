"""Task-result filter that lets only shared trunk parameters and aggregate metrics leave a site."""

from __future__ import annotations

import json
import numbers
import os

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from pharmafl.core.report import SITE_METRICS_FILE
from pharmafl.multitask.model import TRUNK_PREFIX

# The aggregate metrics the multi-task executor reports (``pharmafl.core.metrics.summarize``) and the metric set
# nesting them (``validation``); names, not structure, decide, because a task id can key a scalar as well.
AGGREGATE_METRICS = (
    "auc_roc",
    "auc_pr",
    "auc_pr_cal",
    "brier",
    "tasks_evaluated",
    "validation",
    "regression",
    "r2",
    "rmse",
)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real)


def split_metrics(metrics: dict, names: tuple[str, ...] | list[str]) -> tuple[dict, int]:
    """(what may leave the site, how many entries were removed).

    Kept: a numeric scalar under one of ``names``, or a dict under one of ``names`` whose entries are such
    scalars (one level). Everything else (per-task dicts keyed by task ids, lists, strings, deeper nesting)
    is removed; a removed nested entry counts once.
    """
    kept, removed = {}, 0
    for key, value in metrics.items():
        if key not in names:
            removed += 1
        elif _is_number(value):
            kept[key] = value
        elif isinstance(value, dict):
            inner = {k: v for k, v in value.items() if k in names and _is_number(v)}
            removed += len(value) - len(inner)
            kept[key] = inner
        else:
            removed += 1
    return kept, removed


class TrunkOnlyFilter(DXOFilter):
    def __init__(self, allowed_prefix: str = TRUNK_PREFIX, metric_names: list[str] | None = None):
        """Let only the trunk and aggregate metrics leave the site; log (and for metrics, keep) what was removed.

        WEIGHTS / WEIGHT_DIFF: every entry whose name does not start with ``allowed_prefix`` is removed.
        METRICS: only ``split_metrics`` survives (numeric scalars and one level of dicts of them, under
        ``metric_names``), so per-task results keyed by the partner's task ids stay home. When anything is
        removed, the full result is written to ``<run dir>/site_metrics.json`` (one file per job, the latest
        METRICS result; ``pharmafl report`` reads it from a simulator workspace), and the log gives a count,
        not names.

        Args:
            allowed_prefix: name prefix of the parameters that may leave the site (default ``trunk.``).
            metric_names: metric (and metric-set) names that may leave the site (default ``AGGREGATE_METRICS``).
        """
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF, DataKind.METRICS]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        if not isinstance(allowed_prefix, str) or not allowed_prefix:
            raise ValueError("allowed_prefix must be a non-empty string")
        names = list(AGGREGATE_METRICS if metric_names is None else metric_names)
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError("metric_names must be a list of non-empty strings")
        self.allowed_prefix = allowed_prefix
        self.metric_names = metric_names  # as given: FLARE's Job API exports a component from its attributes
        self.allowed_metrics = tuple(names)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == DataKind.METRICS:
            return self._filter_metrics(dxo, fl_ctx)
        removed = sorted(name for name in dxo.data if not name.startswith(self.allowed_prefix))
        if not removed:
            return None
        for name in removed:
            del dxo.data[name]
        self.log_info(
            fl_ctx,
            f"TrunkOnlyFilter removed {len(removed)} non-trunk entries before the result left the site: {removed}",
        )
        return dxo

    def _filter_metrics(self, dxo: DXO, fl_ctx: FLContext) -> DXO | None:
        kept, removed = split_metrics(dxo.data, self.allowed_metrics)
        if not removed:
            return None
        path = self._save_site_metrics(dxo.data, fl_ctx)
        where = f"kept at the site in {path}" if path else "NOT kept (no run folder)"
        self.log_info(fl_ctx, f"TrunkOnlyFilter removed {removed} non-aggregate metric entries ({where})")
        dxo.data = kept
        return dxo

    def _save_site_metrics(self, metrics: dict, fl_ctx: FLContext) -> str:
        engine = fl_ctx.get_engine()
        if engine is None or not fl_ctx.get_job_id():
            return ""
        run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        path = os.path.join(run_dir, SITE_METRICS_FILE)
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        return path
