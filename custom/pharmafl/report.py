"""``pharmafl report``: the report of a finished run, by the use case that ran it."""

from __future__ import annotations

from pathlib import Path

from pharmafl.binding_sites.report import is_esm_run, write_binding_sites_report
from pharmafl.clinical.report import is_eicu_run, write_eicu_report, write_statistics_report
from pharmafl.clinical.statistics import is_statistics_run
from pharmafl.core.report import find_server_run_dir
from pharmafl.multitask.report import write_multitask_report


def write_report(workspace: str | Path, baselines: str | Path | list | None = None) -> tuple[dict, str]:
    """Write ``WORKSPACE/report/`` for a multi-task, ESM-2 LoRA or eICU run (told apart by its validation results),
    or for a federated statistics run.

    ``baselines``: output folder(s) of ``pharmafl baseline`` (one for a multi-task run; centralized and/or local
    for an ESM-2 or eICU run).
    """
    folders = [] if baselines is None else [baselines] if isinstance(baselines, (str, Path)) else list(baselines)
    if is_statistics_run(workspace):
        return write_statistics_report(workspace)
    run_dir = find_server_run_dir(workspace)
    if is_esm_run(run_dir):
        return write_binding_sites_report(workspace, folders)
    if is_eicu_run(run_dir):
        return write_eicu_report(workspace, folders)
    return write_multitask_report(workspace, folders)
