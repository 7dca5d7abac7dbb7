"""Benchmarks printing JSON: ``pharmafl bench trunk``."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from pharmafl.baseline import job_train_config, train_site_alone
from pharmafl.chem.dataset import load_site
from pharmafl.jobs import prepared_sites, repo_root
from pharmafl.simulate import run_simulator
from pharmafl.training.multitask import MultiTaskTrainer

DEFAULT_JOB = repo_root() / "jobs" / "multitask_fedavg"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def default_bench_data(workdir: Path) -> Path:
    """ChEMBL prepared for 3 partners once under ``workdir`` (reused by later runs)."""
    from pharmafl.chem.prepare import PrepareConfig, prepare_chem
    from pharmafl.cli import _default_chem_input

    out = workdir / "chembl-3"
    if not (out / "summary.json").is_file():
        prepare_chem(_default_chem_input(), str(out), PrepareConfig(sites=["site-1", "site-2", "site-3"]))
    return out


def bench_trunk(data_dir: str | None, rounds: int = 3, workdir: str = "runs/bench") -> dict:
    """Local training throughput, and simulator wall time over the same local work done without FLARE."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else default_bench_data(work)
    config, hidden_sizes, _ = job_train_config(DEFAULT_JOB)
    sites = prepared_sites(data)

    compounds, seconds = 0, 0.0
    for site in sites:
        trainer = MultiTaskTrainer(load_site(str(data / site)), config, hidden_sizes)
        trainer.train(epochs=1)  # warm-up: allocator and Adam state
        start = time.perf_counter()
        trainer.train(epochs=1)
        seconds += time.perf_counter() - start
        compounds += len(trainer.train_rows)

    # The same work as the federated run (per-round scoring, rounds x local epochs), without FLARE.
    start = time.perf_counter()
    for site in sites:
        train_site_alone(data / site, config, hidden_sizes, rounds, progress=lambda _: None)
    local_s = time.perf_counter() - start
    sequential = run_simulator(DEFAULT_JOB, data, work / "ws-sequential", rounds, threads=1, quiet=True, overwrite=True)
    parallel = run_simulator(
        DEFAULT_JOB, data, work / "ws-parallel", rounds, threads=len(sites), quiet=True, overwrite=True
    )
    return {
        "benchmark": "trunk",
        "compounds_per_s": compounds / seconds,
        # As `pharmafl simulate` runs it (all clients in parallel) over the same work done sequentially.
        "federated_overhead": parallel["wall_s"] / local_s,
        "federated_overhead_one_client_at_a_time": sequential["wall_s"] / local_s,
        "local_s": local_s,
        "simulator_sequential_s": sequential["wall_s"],
        "simulator_parallel_s": parallel["wall_s"],
        "rounds": rounds,
        "sites": len(sites),
        "train_compounds": compounds,
        "hidden_sizes": hidden_sizes,
        "batch_size": config.batch_size,
        "machine": machine(),
    }
