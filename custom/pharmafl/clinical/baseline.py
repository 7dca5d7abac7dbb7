"""``pharmafl baseline eicu``: each site alone, or one model on all sites' stays, with the job's script settings.

The settings are the federated job's own: the script arguments of its exported folder, read by the script's own
parser, with ``--set`` overrides; the number of rounds is the job's. ``local`` trains each site alone for
rounds x local_epochs epochs; ``centralized`` trains one model on every site's training stays for as many epochs
and scores it on each site's test stays. Both are scored like the federation, next to APACHE IVa.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict
from pathlib import Path

from pharmafl.clinical.mortality import config_from, parser
from pharmafl.clinical.train import MortalityConfig, MortalityTrainer, load_site, pooled
from pharmafl.core.errors import InputError
from pharmafl.core.settings import apply_settings, field_types, non_default, settings
from pharmafl.jobs import executor_args, num_rounds, prepared_sites

MODES = ("local", "centralized")


def job_config(job_dir: str | Path, overrides: dict | None = None) -> MortalityConfig:
    """The ``MortalityConfig`` the federated job's sites run with (``overrides``: ``--set`` names applied)."""
    script_args = executor_args(job_dir).get("task_script_args", "")
    config = config_from(parser(alone=False).parse_args(shlex.split(script_args)))
    groups = {"training": field_types(MortalityConfig)}
    values = apply_settings({"training": non_default(config)}, overrides or {}, groups, {}, Path(job_dir).name)
    return settings(MortalityConfig, values["training"], "training")


def run_eicu_baseline(
    data_dir: str | Path,
    out_dir: str | Path,
    job_dir: str | Path,
    mode: str = "local",
    rounds: int | None = None,
    overrides: dict | None = None,
) -> dict:
    """Train the baseline and write ``out_dir/summary.json``; returns the summary."""
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'.")
    config = job_config(job_dir, overrides)
    rounds = rounds or num_rounds(job_dir)
    sites = {name: load_site(Path(data_dir) / name) for name in prepared_sites(data_dir)}
    start = time.perf_counter()
    results = {}
    if mode == "local":
        for name, site in sites.items():
            trainer = MortalityTrainer(site, config)
            for _ in range(rounds):
                trainer.train()
            results[name] = trainer.evaluate("test")
    else:
        trainer = MortalityTrainer(pooled(list(sites.values())), config)
        for _ in range(rounds):
            trainer.train()
        results = {name: trainer.evaluate("test", site) for name, site in sites.items()}
    summary = {
        "mode": mode,
        "kind": "eicu",
        "rounds": rounds,
        "config": asdict(config),
        "wall_s": time.perf_counter() - start,
        "sites": results,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
