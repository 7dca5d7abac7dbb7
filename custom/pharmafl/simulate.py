"""Run a job folder in the real FLARE simulator, one client per prepared site."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pharmafl.aggregation.secure_sum.config import POLICY_FILE, SitePolicy
from pharmafl.errors import UserError
from pharmafl.flare.site_executor import DATA_ENV
from pharmafl.jobs import CLIENT_CONFIG, find_component, prepared_sites, read_json, site_local_dir, write_job_copy
from pharmafl.testing.secure_sum import FAULT_PHASES

# Lines of the simulator's output worth showing live; everything goes to <workspace>/simulate.log.
PROGRESS = re.compile(
    r"Round \d+ (started|finished)|rejected contribution|aggregated \d+ contributions|"
    r"ERROR|Traceback|test fold: mean|unmasked the sum|secure sum round failed|refused|ledger:"
)
FAULTY_SITE = "pharmafl.testing.secure_sum.FaultySecureSumSite"


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
) -> dict:
    """Simulate ``job_dir`` with one client per site folder of ``data_dir``; returns run facts.

    ``faults`` (secure-sum jobs only, for tests and demos) maps a site to ``after-setup``, ``after-upload``,
    ``tampered`` or ``mis-sized`` (optionally ``@ROUND``): that site misbehaves so from round ``fault_round``
    (or ROUND) on.
    Raises UserError with the log location when the run fails.
    """
    sites = prepared_sites(data_dir)
    workspace = Path(workspace).resolve()
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    shutil.copytree(site_local_dir(), workspace / "local")  # the simulator copies it into every site
    SitePolicy(roster=tuple(sites)).write(workspace / "local" / POLICY_FILE)  # the consortium: the prepared sites
    # The simulator empties its workspace (all but local/): the adapted job and the log live outside.
    scratch = Path(tempfile.mkdtemp(prefix="pharmafl-sim-"))
    job = write_job_copy(job_dir, scratch, rounds, len(sites), executor_overrides)
    if faults:
        _inject_faults(job, sites, faults, fault_round)
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
        "--end_run_for_all",
    ]
    scratch_log = scratch / "simulate.log"
    start = time.perf_counter()
    with open(scratch_log, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if not quiet and PROGRESS.search(line):
                print(line.rstrip()[:240], flush=True)
        returncode = process.wait()
    wall = time.perf_counter() - start
    log_path = workspace / "simulate.log"
    shutil.move(scratch_log, log_path)
    shutil.rmtree(scratch, ignore_errors=True)
    run_dir = server_run_dir(workspace)
    results = run_dir / "cross_site_val" / "cross_val_results.json"
    if returncode != 0 or not results.is_file():
        raise UserError(f"the simulator run failed (exit code {returncode}); see {log_path}")
    return {
        "workspace": str(workspace),
        "sites": sites,
        "wall_s": wall,
        "run_dir": str(run_dir),
        "log": str(log_path),
    }


def parse_fault(text: str) -> tuple[str, str]:
    """``SITE:PHASE`` or ``SITE:PHASE@ROUND`` (``--drop``/``--tamper``) as (site, phase[@round])."""
    site, _, spec = text.rpartition(":")
    phase, _, start = spec.partition("@")
    if not site or phase not in FAULT_PHASES or (start and not start.isdigit()):
        raise UserError(f"'{text}' is not SITE:PHASE[@ROUND] with PHASE one of {', '.join(FAULT_PHASES)}")
    return site, spec


def _inject_faults(job: Path, sites: list[str], faults: dict[str, str], fault_round: int) -> None:
    """Swap the job copy's ``secure_sum`` component for the test-only ``FaultySecureSumSite`` with ``faults``."""
    unknown = sorted(set(faults) - set(sites))
    if unknown:
        raise UserError(f"cannot inject faults into {unknown}: the sites are {sites}")
    client = read_json(job / CLIENT_CONFIG)
    try:
        component = find_component(client, "secure_sum")
    except UserError as err:
        raise UserError(f"--drop/--tamper need a secure-sum job (with a 'secure_sum' component): {err}") from err
    component["path"] = FAULTY_SITE
    component.setdefault("args", {}).update(faults=dict(faults), fault_round=fault_round)
    (job / CLIENT_CONFIG).write_text(json.dumps(client, indent=2) + "\n")
