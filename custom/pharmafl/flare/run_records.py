"""Records a server component keeps in its run folder: one JSON object per line, appended."""

from __future__ import annotations

import json
import os
import time

from nvflare.apis.fl_context import FLContext


def run_dir_of(fl_ctx: FLContext) -> str | None:
    """The job's run folder, or None without a workspace (unit tests with a bare engine)."""
    engine, job_id = fl_ctx.get_engine(), fl_ctx.get_job_id()
    if engine is None or job_id is None:
        return None
    try:
        return engine.get_workspace().get_run_dir(job_id)
    except Exception:  # a mocked engine without a workspace
        return None


def append_run_record(fl_ctx: FLContext, filename: str, **fields) -> None:
    """Append ``{"time": ..., **fields}`` as one line to ``<run_dir>/<filename>`` (nothing without a run folder)."""
    run_dir = run_dir_of(fl_ctx)
    if run_dir:
        with open(os.path.join(run_dir, filename), "a") as f:
            f.write(json.dumps({"time": time.time(), **fields}, default=str) + "\n")
