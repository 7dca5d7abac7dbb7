"""Single-partner baseline: each partner trains alone with the job's model, hyperparameters and code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pharmafl.core.progress import StepReporter
from pharmafl.jobs import executor_args, job_configs, prepared_sites, settings_from_args, trunk_model_args
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.train import MultiTaskTrainer, TrainConfig


def job_train_config(job_dir: str | Path) -> tuple[TrainConfig, list[int], int]:
    """(TrainConfig, hidden sizes, rounds) exactly as the federated job would use them."""
    args = executor_args(job_dir)
    config = settings_from_args(TrainConfig, args)
    hidden_sizes = list(trunk_model_args(job_dir)["hidden_sizes"])
    return config, hidden_sizes, int(job_configs(job_dir)[0]["num_rounds"])


def train_site_alone(
    data_path: str | Path,
    config: TrainConfig,
    hidden_sizes: list[int],
    rounds: int,
    progress: Callable[[str], None] = print,
) -> dict:
    """``rounds`` x ``local_epochs`` epochs of local training, scored per round like the federated run."""
    data = load_site(str(data_path))
    trainer = MultiTaskTrainer(data, config, hidden_sizes)
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
    """Train every site alone. ``overrides`` replaces job hyperparameters (TrainConfig fields or
    ``hidden_sizes``), for a baseline tuned on the validation fold in its own right."""
    config, hidden_sizes, job_rounds = job_train_config(job_dir)
    overrides = dict(overrides or {})
    hidden_sizes = list(overrides.pop("hidden_sizes", hidden_sizes))
    config = TrainConfig(**{**config.__dict__, **overrides})
    rounds = rounds or job_rounds
    start = time.perf_counter()
    sites = {
        site: train_site_alone(Path(data_dir) / site, config, hidden_sizes, rounds, progress)
        for site in prepared_sites(data_dir)
    }
    summary = {
        "job": str(job_dir),
        "rounds": rounds,
        "config": {**config.__dict__, "hidden_sizes": hidden_sizes},
        "wall_s": time.perf_counter() - start,
        "sites": sites,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    return summary
