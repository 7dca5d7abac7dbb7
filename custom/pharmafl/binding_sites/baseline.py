"""ESM-2 LoRA baselines with the federated job's model, settings and training code, at the same total steps.

``centralized``: one model on all clients' training chains pooled, for rounds x local_steps x clients steps
(the steps the federation takes in all). ``local``: each client alone for rounds x local_steps steps.
Both are scored like the federation: each client's own test set and the common test set, before training and
after every round's worth of steps (the per-round curves of `pharmafl report`), the last point being the final;
with ``score_rounds`` false (``--set score_rounds=false``) only the final model is scored. The centralized model's
trainable state is kept as ``global_state.npz``, the name a federated run's server gives its global model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pharmafl.binding_sites.dataset import load_client, load_common_test
from pharmafl.binding_sites.model import LoRASettings, load_esm_lora
from pharmafl.binding_sites.train import SETTINGS, BindingSiteConfig, BindingSiteTrainer
from pharmafl.core.errors import InputError
from pharmafl.core.paths import STATE_FILE
from pharmafl.core.progress import StepReporter
from pharmafl.core.settings import apply_settings, field_types, settings
from pharmafl.jobs import executor_args, num_rounds, prepared_sites

MODES = ("centralized", "local")


def run_esm_baseline(
    data_dir: str | Path,
    out_dir: str | Path,
    job_dir: str | Path,
    mode: str = "centralized",
    rounds: int | None = None,
    overrides: dict | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train the baseline and write ``out_dir/summary.json``; ``overrides`` changes the job's settings (``--set``:
    ``training`` and ``lora`` settings, ``model``, ``model_config``; the FLARE-side ones mean nothing here)."""
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'.")
    groups = {group: field_types(cls) for group, cls in SETTINGS.items()}
    plain = {"model": str, "model_config": dict | None, "upload": str, "optimizer_state": str, "score_rounds": bool}
    args = apply_settings(executor_args(job_dir), overrides or {}, groups, plain, Path(job_dir).name)
    rounds = rounds or num_rounds(job_dir)
    config = settings(BindingSiteConfig, args.get("training"), "training")
    lora = settings(LoRASettings, args.get("lora"), "lora")
    sites = prepared_sites(data_dir)
    train = {site: load_client(str(Path(data_dir) / site), "train") for site in sites}
    test = {site: load_client(str(Path(data_dir) / site), "test") for site in sites}
    common = load_common_test(str(data_dir))

    def fresh_trainer(chains):
        model, tokenizer = load_esm_lora(args.get("model", ""), args.get("model_config"), lora, config.seed)
        return BindingSiteTrainer(model, tokenizer, chains, config)

    def score(trainer, scored_sites, curves):
        on_common = trainer.evaluate(common)
        for site in scored_sites:
            curves.setdefault(site, []).append({"site": trainer.evaluate(test[site]), "common": on_common})

    score_rounds = bool(args.get("score_rounds", True))

    def train_with_curves(trainer, steps_per_round, scored_sites):
        """Train ``rounds`` x ``steps_per_round`` steps; score before and after each round (or only at the end)."""
        curves: dict[str, list[dict]] = {}
        if score_rounds:
            score(trainer, scored_sites, curves)
        for round_number in range(rounds):
            trainer.train(
                steps_per_round, progress=StepReporter(progress, prefix=f"{mode} round {round_number + 1}/{rounds} ")
            )
            if score_rounds or round_number == rounds - 1:
                score(trainer, scored_sites, curves)
        return curves

    start = time.perf_counter()
    curves: dict[str, list[dict]] = {}
    if mode == "centralized":
        steps = rounds * config.local_steps * len(sites)
        trainer = fresh_trainer([chain for site in sites for chain in train[site]])
        progress(f"centralized: {steps} steps on {sum(len(c) for c in train.values())} chains")
        curves = train_with_curves(trainer, config.local_steps * len(sites), sites)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        np.savez(Path(out_dir) / STATE_FILE, **trainer.state())
    else:
        steps = rounds * config.local_steps
        for site in sites:
            trainer = fresh_trainer(train[site])
            progress(f"{site} alone: {steps} steps on {len(train[site])} chains")
            curves.update(train_with_curves(trainer, config.local_steps, [site]))
    results = {site: {**curve[-1], "curve": curve} for site, curve in curves.items()}
    summary = {
        "mode": mode,
        "job": str(job_dir),
        "rounds": rounds,
        "steps": steps,
        "wall_s": time.perf_counter() - start,
        "sites": results,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
