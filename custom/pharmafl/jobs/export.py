"""The exported job folders and the builders they come from (``pharmafl.flare.job_builders``).

A folder under ``jobs/`` is exactly what its builder exports: ``pharmafl jobs export`` rewrites them, a test fails
when one differs, and a run (``pharmafl simulate``, the experiments, the POC benchmark) exports its own copy with
its settings instead of editing JSON.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pharmafl.core.errors import UserError
from pharmafl.core.paths import jobs_dir
from pharmafl.flare.job_builders import DATA_KINDS, JOBS, JobOptions, export_job, result_file

__all__ = [
    "DATA_KINDS",
    "JOBS",
    "JobOptions",
    "result_file",
    "differences",
    "export_all",
    "export_named",
    "export_run_job",
    "job_name",
]


def differences(name: str, folder: str | Path) -> list[str]:
    """The files (relative paths) in which ``folder`` differs from what job ``name``'s builder exports."""
    with tempfile.TemporaryDirectory(prefix="pharmafl-job-") as scratch:
        built = export_job(name, scratch)
        return _tree_differences(built, Path(folder))


def _tree_differences(a: Path, b: Path) -> list[str]:
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {
        p.relative_to(b) for p in b.rglob("*") if p.is_file()
    }
    return sorted(
        str(f)
        for f in files
        if not ((a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes())
    )


def job_name(job: str | Path) -> str:
    """The builder name of a job given by name (``multitask_fedavg``) or by its exported folder.

    A folder must be one of pharmafl's jobs, unchanged: a run rebuilds it from its builder with the run's
    settings, so an edit to the JSON would be silently lost.
    """
    path = Path(job)
    if str(job) in JOBS and not path.is_dir():
        return str(job)
    if not path.is_dir():
        raise UserError(f"Job folder '{job}' does not exist; pharmafl's jobs are: {', '.join(JOBS)}.")
    if path.name not in JOBS:
        raise UserError(
            f"'{job}' is not one of pharmafl's jobs ({', '.join(JOBS)}); run other FLARE jobs with `nvflare simulator`."
        )
    changed = differences(path.name, path)
    if changed:
        raise UserError(
            f"'{job}' differs from what its builder exports ({', '.join(changed)}): change the job in "
            "pharmafl/flare/job_builders.py and run `pharmafl jobs export`, or run it with `nvflare simulator`."
        )
    return path.name


def export_run_job(job: str | Path, out_root: str | Path, options: JobOptions | None = None) -> Path:
    """A run's copy of ``job`` (name or folder, checked by ``job_name``) under ``out_root``, built with ``options``."""
    return export_named(job_name(job), out_root, options)


def export_named(name: str, out_root: str | Path, options: JobOptions | None = None) -> Path:
    """Job ``name`` (already resolved by ``job_name``) exported to ``out_root/name``, replacing what is there."""
    if (Path(out_root) / name).exists():
        shutil.rmtree(Path(out_root) / name)
    return export_job(name, out_root, options)


def export_all(out_root: str | Path | None = None) -> list[Path]:
    """Export every job to ``out_root`` (default: the package's ``jobs/`` folder), replacing what is there."""
    root = Path(out_root) if out_root is not None else jobs_dir()
    return [export_named(name, root) for name in JOBS]
