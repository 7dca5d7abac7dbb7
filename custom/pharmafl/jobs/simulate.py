"""Run a job folder in the real FLARE simulator, one client per prepared site."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pharmafl.core.errors import UserError
from pharmafl.core.outputs import SIMULATE, check_output, write_marker
from pharmafl.core.paths import DATA_ENV, repo_root
from pharmafl.core.progress import PROGRESS_TAG, TASK_FAILED
from pharmafl.jobs import prepared_sites, site_local_dir
from pharmafl.jobs.export import DATA_KINDS, JOBS, JobOptions, export_named, job_name, result_file
from pharmafl.jobs.preflight import check_job_data
from pharmafl.secure_sum.config import POLICY_FILE, SitePolicy
from pharmafl.testing import FAULT_PHASES
from pharmafl.testing.secure_sum import FaultySecureSumSite

# Lines of the simulator's output worth showing live; everything goes to <workspace>/simulate.log.
PROGRESS = re.compile(
    r"Round \d+ (started|finished)|rejected contribution|aggregated \d+ contributions|"
    rf"ERROR|Traceback|test fold: mean|unmasked the sum|secure sum round failed|refused|ledger:|{PROGRESS_TAG}"
)
# FLARE's console line "2026-12-03 09:59:34,490 - ERROR - message" and a site log.txt line
# "... - MultiTaskExecutor - ERROR - [identity=site-2, run=..., task_name=train, ...] - message"
CONSOLE_LINE = re.compile(r"^\S+ \S+ - (?P<level>[A-Z]+) - (?P<message>.*)")
SITE_LOG_LINE = re.compile(r"\[identity=(?P<who>[^,\]]+)[^\]]*\] - (?P<message>.*)")
# A site's task failed: FLARE caught an exception from the executor or a filter, or the executor refused the task.
SITE_ERROR = re.compile(
    rf"Processing error from executor|Processing error from Task Data Filters|Processing error in Task Result Filter|"
    rf"{TASK_FAILED}"
)
MARKER = "local/.pharmafl.json"  # inside local/, the one folder the simulator keeps when it empties its workspace


def server_run_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "server" / "simulate_job"


def run_simulator(
    job_dir: str | Path,
    data_dir: str | Path,
    workspace: str | Path,
    rounds: int | None = None,
    threads: int | None = None,
    executor_overrides: dict | None = None,
    quiet: bool = False,
    faults: dict[str, str] | None = None,
    fault_round: int = 0,
    overwrite: bool = False,
    job_options: JobOptions | None = None,
) -> dict:
    """Simulate a job (its name or exported folder) with one client per site folder of ``data_dir``.

    The run's copy of the job is built by the job's builder with the run's rounds, sites and ``executor_overrides``
    (``--set``). Everything is checked before the workspace is touched: the job, the overrides (typed, then the
    components built), the data against the job (``preflight``), and the workspace itself: a new or empty folder,
    or (with ``overwrite``) an earlier simulator workspace, never one that holds the data or the job.

    ``faults`` (secure-sum jobs only, for tests and demos) maps a site to ``after-setup``, ``after-upload``,
    ``tampered`` or ``mis-sized`` (optionally ``@ROUND``): that site misbehaves so from round ``fault_round``
    (or ROUND) on.
    ``job_options`` passes the rest of a ``JobOptions`` to the builder (an initial model; tests: recorders).
    Raises UserError with the log location when the run fails or a site's task failed.
    """
    if threads is not None and threads <= 0:
        raise UserError(f"--threads must be positive, got {threads}")
    if rounds is not None and rounds <= 0:
        raise UserError(f"--rounds must be positive, got {rounds}")
    sites = prepared_sites(data_dir)
    # The simulator empties its workspace (all but local/): the adapted job and the log live outside.
    scratch = Path(tempfile.mkdtemp(prefix="pharmafl-sim-"))
    try:
        name = job_name(job_dir)  # a folder is compared with its builder's export once, here
        base = job_options or JobOptions()
        options = dataclasses.replace(
            base,
            num_rounds=base.num_rounds if rounds is None else rounds,
            sites=len(sites),
            settings={**base.settings, **(executor_overrides or {})},
            site_component=_faulty_site(name, sites, faults, fault_round, base) if faults else base.site_component,
        )
        job = export_named(name, scratch, options)
        check_job_data(job, data_dir, sites, DATA_KINDS.get(JOBS[name].family))
        replace = check_output(
            workspace, (SIMULATE,), overwrite, "--workspace", reads=[data_dir, job_dir, repo_root()], marker=MARKER
        )
        workspace = Path(workspace).expanduser().resolve()
        if replace:
            shutil.rmtree(workspace)
        workspace.mkdir(parents=True, exist_ok=True)
        shutil.copytree(site_local_dir(), workspace / "local")  # the simulator copies it into every site
        write_marker(workspace, SIMULATE, MARKER)
        SitePolicy(roster=tuple(sites)).write(workspace / "local" / POLICY_FILE)  # the consortium: the sites
        returncode, started_at, wall, log_path = _run(job, data_dir, workspace, sites, threads, quiet, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run_dir = server_run_dir(workspace)
    results = run_dir / result_file(name)
    errors = [(site, message) for site, message in site_errors(workspace, sites) if site not in (faults or {})]
    if errors:
        site, message = errors[0]
        more = f" ({len(errors) - 1} more site errors)" if len(errors) > 1 else ""
        raise UserError(f"{site}: {message}{more}; the run's results are incomplete, see {log_path}")
    if returncode != 0 or not results.is_file():
        raise UserError(f"the simulator run failed (exit code {returncode}); see {log_path}")
    return {
        "workspace": str(workspace),
        "sites": sites,
        "started_at": started_at,  # epoch seconds when the simulator process started
        "wall_s": wall,
        "run_dir": str(run_dir),
        "log": str(log_path),
    }


def _run(
    job: Path, data_dir: str | Path, workspace: Path, sites: list[str], threads: int | None, quiet: bool, scratch: Path
) -> tuple[int, float, float, Path]:
    """The FLARE simulator on ``job``: (exit code, start epoch, wall seconds, log).

    Its output goes to ``<workspace>/simulate.log``, the progress to the console."""
    threads = threads or len(sites)
    env = dict(os.environ)
    env[DATA_ENV] = str(Path(data_dir).resolve())
    # Parallel clients share the cores: give each its share instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // threads)))
    command = [
        sys.executable,
        "-m",
        "nvflare.cli",
        "simulator",
        str(job),
        "-w",
        str(workspace),
        "-c",
        ",".join(sites),
        "-t",
        str(threads),
        "-m",  # FLARE's simulator takes at most 100 clients unless told otherwise (one per hospital: more)
        str(max(100, len(sites))),
        "--end_run_for_all",
    ]
    scratch_log = scratch / "simulate.log"
    started_at, start = time.time(), time.perf_counter()
    with open(scratch_log, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if not quiet and PROGRESS.search(line):
                print(console_line(line), flush=True)
        returncode = process.wait()
    wall = time.perf_counter() - start
    log_path = workspace / "simulate.log"
    shutil.move(scratch_log, log_path)
    return returncode, started_at, wall, log_path


def console_line(line: str) -> str:
    """A simulator output line as a person wants it: the level (unless INFO) and the message, no timestamp."""
    match = CONSOLE_LINE.search(line)
    if not match:
        return line.rstrip()[:240]
    level = "" if match["level"] == "INFO" else f"{match['level']}: "
    return f"{level}{match['message'].strip()}"[:240]


def site_errors(workspace: Path, sites: list[str]) -> list[tuple[str, str]]:
    """(site, message) of every site task that failed (an executor or filter raised, or the executor could not
    run the task), from each site's ``log.txt`` in the simulator workspace."""
    errors = []
    for site in sites:
        path = Path(workspace) / site / "log.txt"
        if not path.is_file():
            continue
        with open(path, errors="replace") as log:
            for line in log:
                match = SITE_LOG_LINE.search(line) if SITE_ERROR.search(line) else None
                if match and match["who"] == site:
                    errors.append((site, match["message"].strip()))
    return errors


def parse_fault(text: str) -> tuple[str, str]:
    """``SITE:PHASE`` or ``SITE:PHASE@ROUND`` (``--drop``/``--tamper``) as (site, phase[@round])."""
    site, _, spec = text.rpartition(":")
    phase, _, start = spec.partition("@")
    if not site or phase not in FAULT_PHASES or (start and not start.isdigit()):
        raise UserError(f"'{text}' is not SITE:PHASE[@ROUND] with PHASE one of {', '.join(FAULT_PHASES)}")
    return site, spec


def _faulty_site(name: str, sites: list[str], faults: dict[str, str], fault_round: int, base=None):
    """The test-only ``FaultySecureSumSite`` with ``faults``, in place of a secure-sum job's site component
    (recording the plaintext uploads when ``base``'s site component did)."""
    unknown = sorted(set(faults) - set(sites))
    if unknown:
        raise UserError(f"cannot inject faults into {unknown}: the sites are {sites}")
    if JOBS[name].secure_sum is None:
        raise UserError(f"--drop/--tamper need a secure-sum job; {name} has no secure sum.")
    record = bool(getattr(base and base.site_component, "record_updates", False))
    return FaultySecureSumSite(faults=dict(faults), fault_round=fault_round, record_updates=record)
