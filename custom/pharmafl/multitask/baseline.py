"""Single-partner baseline: each partner trains alone with the job's model, hyperparameters and code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pharmafl.core.progress import StepReporter
from pharmafl.core.settings import apply_settings, field_types, settings
from pharmafl.jobs import executor_args, num_rounds, prepared_sites
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.model import TrunkConfig
from pharmafl.multitask.train import SETTINGS, MultiTaskTrainer, TrainConfig


def job_train_config(job_dir: str | Path, overrides: dict | None = None) -> tuple[TrainConfig, TrunkConfig, int]:
    """(TrainConfig, TrunkConfig, rounds) exactly as the federated job uses them, with ``overrides`` (``NAME`` or
    ``GROUP.NAME`` of the ``training`` and ``trunk`` settings, as ``--set``) applied."""
    groups = {group: field_types(cls) for group, cls in SETTINGS.items()}
    args = apply_settings(executor_args(job_dir), overrides or {}, groups, {}, Path(job_dir).name)
    config = settings(TrainConfig, args.get("training"), "training")
    return config, settings(TrunkConfig, args.get("trunk"), "trunk"), num_rounds(job_dir)


def train_site_alone(
    data_path: str | Path,
    config: TrainConfig,
    trunk: TrunkConfig,
    rounds: int,
    progress: Callable[[str], None] = print,
) -> dict:
    """``rounds`` x ``local_epochs`` epochs of local training, scored per round like the federated run."""
    data = load_site(str(data_path))
    trainer = MultiTaskTrainer(data, config, trunk)
    curve = []
    for round_number in range(rounds):
        # Scored before each round's training, as the executor scores the global model it receives.
        curve.append(trainer.evaluate()["auc_pr"])
        site = data.manifest.get("site", data_path)
        trainer.train(progress=StepReporter(progress, prefix=f"{site} alone round {round_number + 1}/{rounds} "))
    test = trainer.evaluate()
    validation = trainer.evaluate(config.validation_fold)
    curve.append(test["auc_pr"])
    return {
        **test,
        "validation": {k: v for k, v in validation.items() if k != "per_task"},
        "curve_auc_pr": curve,
    }


def run_single_partner(
    data_dir: str | Path,
    out_dir: str | Path,
    job_dir: str | Path,
    rounds: int | None = None,
    progress: Callable[[str], None] = print,
    overrides: dict | None = None,
) -> dict:
    """Train every site alone. ``overrides`` changes the job's ``training`` and ``trunk`` settings (``--set``
    names), for a baseline tuned on the validation fold in its own right."""
    config, trunk, job_rounds = job_train_config(job_dir, overrides)
    rounds = rounds or job_rounds
    start = time.perf_counter()
    sites = {
        site: train_site_alone(Path(data_dir) / site, config, trunk, rounds, progress)
        for site in prepared_sites(data_dir)
    }
    summary = {
        "job": str(job_dir),
        "rounds": rounds,
        "config": {**asdict(config), "hidden_sizes": list(trunk.hidden_sizes)},
        "wall_s": time.perf_counter() - start,
        "sites": sites,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    return summary
