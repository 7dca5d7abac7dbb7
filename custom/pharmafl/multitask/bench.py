"""Benchmarks printing JSON: ``pharmafl bench trunk``."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from pharmafl.core.machine import describe_machine
from pharmafl.core.paths import default_chem_input, job_dir
from pharmafl.jobs import prepared_sites
from pharmafl.jobs.simulate import run_simulator
from pharmafl.multitask.baseline import job_train_config, train_site_alone
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.train import MultiTaskTrainer

DEFAULT_JOB = job_dir("multitask_fedavg")


_ROUND_LINE = re.compile(r"^(\S+ \S+) - ScatterAndGather - .* Round (\d+) (started|finished)\.")


def simulator_phases(server_log: Path, started: float, wall_s: float) -> dict:
    """Where a simulator run's wall time went, in seconds, from the timestamps of the server log's round lines.

    ``start_up_s``: command start until round 0 starts (the simulator, the client processes and their
    imports are counted in round 0 only where they overlap it); ``first_round_s``: round 0, which
    also loads each site's data and builds its trainer; ``round_s``: the mean later round (scatter,
    local training and scoring, upload, aggregation); ``end_s``: the last round's end until the
    command returns (final validation, saving, shutdown).
    """
    marks: dict[tuple[int, str], float] = {}
    for line in server_log.read_text(errors="replace").splitlines():
        match = _ROUND_LINE.match(line)
        if match:
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            marks.setdefault((int(match[2]), match[3]), when)
    last = max((r for r, phase in marks if phase == "finished"), default=None)
    if last is None or (0, "started") not in marks or (0, "finished") not in marks:
        return {}
    later = [marks[(r, "finished")] - marks[(r, "started")] for r in range(1, last + 1) if (r, "started") in marks]
    return {
        "start_up_s": marks[(0, "started")] - started,
        "first_round_s": marks[(0, "finished")] - marks[(0, "started")],
        "round_s": sum(later) / len(later) if later else None,
        "end_s": started + wall_s - marks[(last, "finished")],
    }


def default_bench_data(workdir: Path) -> Path:
    """ChEMBL prepared for 3 partners once under ``workdir`` (reused by later runs)."""
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    out = workdir / "chembl-3"
    if not (out / "summary.json").is_file():
        prepare_chem(default_chem_input(), str(out), PrepareConfig(sites=["site-1", "site-2", "site-3"]))
    return out


def bench_trunk(data_dir: str | None, rounds: int = 3, workdir: str = "runs/bench") -> dict:
    """Local training throughput, and simulator wall time over the same local work done without FLARE."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else default_bench_data(work)
    config, trunk, _ = job_train_config(DEFAULT_JOB)
    sites = prepared_sites(data)

    compounds, seconds = 0, 0.0
    for site in sites:
        trainer = MultiTaskTrainer(load_site(str(data / site)), config, trunk)
        trainer.train(epochs=1)  # warm-up: allocator and Adam state
        start = time.perf_counter()
        trainer.train(epochs=1)
        seconds += time.perf_counter() - start
        compounds += len(trainer.train_rows)

    # The same work as the federated run (per-round scoring, rounds x local epochs), without FLARE.
    start = time.perf_counter()
    for site in sites:
        train_site_alone(data / site, config, trunk, rounds, progress=lambda _: None)
    local_s = time.perf_counter() - start
    # As `pharmafl simulate` runs it: all clients in parallel. (With fewer threads than clients FLARE's
    # simulator starts a new client process for every task, which measures process start-up, not FLARE.)
    parallel = run_simulator(DEFAULT_JOB, data, work / "ws", rounds, threads=len(sites), quiet=True, overwrite=True)
    return {
        "benchmark": "trunk",
        "compounds_per_s": compounds / seconds,
        "federated_overhead": parallel["wall_s"] / local_s,
        "local_s": local_s,
        "local_round_s": local_s / rounds,
        "simulator_s": parallel["wall_s"],
        "simulator_phases": simulator_phases(
            Path(parallel["workspace"]) / "server" / "log.txt", parallel["started_at"], parallel["wall_s"]
        ),
        "rounds": rounds,
        "sites": len(sites),
        "train_compounds": compounds,
        "hidden_sizes": list(trunk.hidden_sizes),
        "batch_size": config.batch_size,
        "machine": describe_machine(),
    }


def job_overhead(data_dir: str | None, rounds: int = 3, workdir: str = "runs/bench", repeats: int = 2) -> dict:
    """Simulator wall time of ``multitask_secure`` over ``multitask_fedavg`` on the same data and rounds.

    The two jobs alternate ``repeats`` times (fedavg, secure, fedavg, secure, ...) so that a busy spell of the
    machine weighs on both; ``ratio`` is total secure time over total fedavg time, ``ratios`` each pair's.

    Args:
        data_dir: prepared chem data (default: ChEMBL for 3 partners, prepared once under ``workdir``).
        rounds: rounds of both jobs.
        workdir: scratch folder for the data and the two workspaces.
        repeats: pairs of runs.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else default_bench_data(work)
    walls: dict[str, list[float]] = {"multitask_fedavg": [], "multitask_secure": []}
    for _ in range(repeats):
        for name in walls:
            result = run_simulator(job_dir(name), data, work / f"ws-{name}", rounds, quiet=True, overwrite=True)
            walls[name].append(result["wall_s"])
    fedavg, secure = walls["multitask_fedavg"], walls["multitask_secure"]
    return {
        "fedavg_s": fedavg,
        "secure_s": secure,
        "ratio": sum(secure) / sum(fedavg),
        "ratios": [s / f for s, f in zip(secure, fedavg, strict=True)],
        "rounds": rounds,
        "data": str(data),
    }


def bench_dp(data_dir: str | None, steps: int = 30, workdir: str = "runs/bench", repeats: int = 3) -> dict:
    """DP-SGD step time against the plain step of the multi-task trainer, side by side on the same site.

    Plain: lazy Adam over the batch's rows. DP-SGD: per-compound norms from the layers' hooks (no per-compound
    gradient is materialised; a dense one of the 32,000 x 400 input layer would be 51 MB per compound), a second
    backward pass for the clipped sum, dense noise on every weight and dense Adam. The two alternate ``repeats``
    times, ``steps`` steps each, and the ratio of their medians is reported.
    """
    from pharmafl.privacy.dp_sgd import DPConfig

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data_path = Path(data_dir) if data_dir else default_bench_data(work)
    config, trunk, _ = job_train_config(DEFAULT_JOB)
    site = prepared_sites(data_path)[0]
    data = load_site(str(data_path / site))
    plain = MultiTaskTrainer(data, config, trunk)
    private = MultiTaskTrainer(data, config, trunk, DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    times: dict[str, list[float]] = {"plain": [], "dp_sgd": []}
    batches = -(-len(plain.train_rows) // config.batch_size)
    for trainer in (plain, private):  # warm-up: allocator and Adam state
        trainer.train(epochs=1, should_stop=_after(min(5, batches)))
    for _ in range(repeats):
        for name, trainer in (("plain", plain), ("dp_sgd", private)):
            start = time.perf_counter()
            done = trainer.train(epochs=1, should_stop=_after(min(steps, batches)))
            times[name].append((time.perf_counter() - start) / done)
    plain_s, dp_s = (sorted(times[k])[len(times[k]) // 2] for k in ("plain", "dp_sgd"))
    return {
        "benchmark": "dp",
        "site": site,
        "train_compounds": int(len(plain.train_rows)),
        "batch_size": config.batch_size,
        "hidden_sizes": list(trunk.hidden_sizes),
        "n_features": trunk.n_features,
        "plain_step_s": plain_s,
        "dp_sgd_step_s": dp_s,
        "dp_over_plain": dp_s / plain_s,
        "step_times_s": times,
        "machine": describe_machine(),
    }


def _after(steps: int):
    """A should_stop callback that stops a training call after ``steps`` steps."""
    calls = iter(range(steps + 1))
    return lambda: next(calls, steps) >= steps
