"""Benchmark of the consortium on one machine: POC up, one multi-task job, POC down, in wall time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pharmafl.consortium.approval import add_entries, job_entries
from pharmafl.consortium.poc import POC_ENV, poc_down, poc_up
from pharmafl.consortium.submit import submit_job
from pharmafl.jobs.export import JobOptions, export_run_job


def bench_poc(
    data_dir: str | None = None,
    rounds: int = 2,
    workdir: str = "runs/bench",
    port: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time ``poc up``, a ``rounds``-round ``multitask_fedavg`` submitted as the lead, and ``poc down``.

    Runs in its own POC workspace and HOME under ``workdir`` (a POC the user runs elsewhere is not
    touched). The job copy with ``rounds`` rounds is a new version of the job, so the benchmark
    approves it at every site, as the site admins would.

    Args:
        data_dir: prepared data (default: ChEMBL for 3 partners, prepared once under ``workdir``).
        rounds: FedAvg rounds of the job.
        workdir: scratch folder.
        port: server FL port (default: the project's 8002).
        progress: callback for progress lines.
    """
    from pharmafl.core.machine import describe_machine
    from pharmafl.multitask.bench import default_bench_data

    work = Path(workdir).resolve()
    data = Path(data_dir) if data_dir else default_bench_data(work)
    saved = {key: os.environ.get(key) for key in (POC_ENV, "HOME")}
    os.environ[POC_ENV] = str(work / "poc")
    os.environ["HOME"] = str(work / "poc_home")
    try:
        start = time.perf_counter()
        info = poc_up(data_dir=data, port=port)
        up_s = time.perf_counter() - start
        job = export_run_job("multitask_fedavg", work / "poc_job", JobOptions(rounds, len(info["sites"])))
        kits = Path(info["admin_kits"][next(iter(info["admin_kits"]))]).parent
        for site in info["sites"]:
            add_entries(kits / site / "local" / "approved_jobs.json", job_entries(job))
        job_start = time.perf_counter()
        result = submit_job(
            job, wait=True, out_dir=work / "poc_results", record_file=work / "poc_submissions.jsonl", progress=progress
        )
        job_s = time.perf_counter() - job_start
        down_start = time.perf_counter()
        poc_down(quiet=True)
        down_s = time.perf_counter() - down_start
    finally:
        poc_down(quiet=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {
        "benchmark": "poc",
        "machine": describe_machine(),
        "data": str(data),
        "sites": info["sites"],
        "rounds": rounds,
        "status": result["status"],
        "poc_up_s": round(up_s, 1),
        "job_s": round(job_s, 1),
        "poc_down_s": round(down_s, 1),
        "total_s": round(up_s + job_s + down_s, 1),
    }
