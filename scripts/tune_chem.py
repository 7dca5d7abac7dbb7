"""Choose the multi-task hyperparameters on the validation fold (never the test fold).

Federated training is emulated in-process with the executor's training code and the aggregator's
weighted mean (the same math as the FLARE job, without the runtime), and the single-partner
baseline gets the same grid. For each method it reports the configuration and number of rounds
with the best mean validation AUC-PR over sites. Usage:

    .venv/bin/python scripts/tune_chem.py DATA_DIR [--rounds 25] [--dropout 0.2,0.5] [--hidden 400]
        [--regression-weight 0,1] [--pooled POOLED_DIR]

``--pooled`` adds the centralized upper bound: POOLED_DIR is the same input prepared for one
partner (``pharmafl prepare chem --partners 1``); one model learns all tasks on all compounds and
is scored on each site's own tasks.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from pharmafl.aggregation.weighted_mean import weighted_mean
from pharmafl.jobs import prepared_sites
from pharmafl.multitask.dataset import SiteData, load_site
from pharmafl.multitask.model import TrunkConfig, TrunkModel
from pharmafl.multitask.train import MultiTaskTrainer, TrainConfig


def validation_curves(trainers: list[MultiTaskTrainer], rounds: int, federated: bool) -> np.ndarray:
    """Validation AUC-PR of each site (columns) after each round (rows)."""
    global_trunk = {k: v.numpy().copy() for k, v in TrunkModel(*_geometry(trainers[0])).state_dict().items()}
    curve = []
    for _ in range(rounds):
        diffs, steps = [], []
        for trainer in trainers:
            if federated:
                trainer.load_trunk(global_trunk)
            steps.append(trainer.train())
            if federated:
                diffs.append({k: v - global_trunk[k] for k, v in trainer.trunk_weights().items()})
        if federated:
            mean = weighted_mean(diffs, steps)
            global_trunk = {k: global_trunk[k] + mean[k] for k in global_trunk}
            for trainer in trainers:
                trainer.load_trunk(global_trunk)
        curve.append([t.evaluate(t.config.validation_fold)["auc_pr"] for t in trainers])
    return np.array(curve)


def pooled_curves(pooled: SiteData, sites: list[SiteData], config: TrainConfig, hidden: int, rounds: int) -> np.ndarray:
    """Validation AUC-PR on each site's tasks (columns) of one model trained on all data, per epoch (rows)."""
    trainer = MultiTaskTrainer(pooled, config, TrunkConfig(pooled.n_features, (hidden,)))
    site_tasks = [set(d.tasks["task_id"]) for d in sites]
    curve = []
    for _ in range(rounds):
        trainer.train()
        per_task = trainer.evaluate(config.validation_fold)["per_task"]
        curve.append([np.mean([m["auc_pr"] for task, m in per_task.items() if task in tasks]) for tasks in site_tasks])
    return np.array(curve)


def _geometry(trainer: MultiTaskTrainer) -> tuple[int, list[int]]:
    return trainer.data.n_features, list(trainer.model.trunk.hidden_sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--dropout", default="0.2,0.5")
    parser.add_argument("--hidden", default="400")
    parser.add_argument("--learning-rate", default="0.001")
    parser.add_argument("--regression-weight", default="0", help="weights of the regression head's loss (0: none)")
    parser.add_argument("--pooled", default=None, help="the same input prepared for one partner (upper bound)")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    sites = [load_site(str(Path(args.data) / s)) for s in prepared_sites(args.data)]
    results = []
    grid = itertools.product(
        [float(x) for x in args.dropout.split(",")],
        [int(x) for x in args.hidden.split(",")],
        [float(x) for x in args.learning_rate.split(",")],
        [float(x) for x in args.regression_weight.split(",")],
    )
    for dropout, hidden, learning_rate, regression_weight in grid:
        config = TrainConfig(dropout=dropout, learning_rate=learning_rate, regression_weight=regression_weight)
        methods = ["federated", "single_partner"] + (["centralized"] if args.pooled else [])
        for method in methods:
            if method == "centralized":
                pooled = load_site(str(Path(args.pooled) / prepared_sites(args.pooled)[0]))
                per_site = pooled_curves(pooled, sites, config, hidden, args.rounds)
            else:
                trainers = [MultiTaskTrainer(d, config, TrunkConfig(d.n_features, (hidden,))) for d in sites]
                per_site = validation_curves(trainers, args.rounds, method == "federated")
            curve = per_site.mean(axis=1)
            best = int(np.argmax(curve))
            row = {
                "method": method,
                "dropout": dropout,
                "hidden": hidden,
                "learning_rate": learning_rate,
                "regression_weight": regression_weight,
                "best_rounds": best + 1,
                "best_validation_auc_pr": float(curve[best]),
                "sites_at_best": [round(float(v), 4) for v in per_site[best]],
                "curve": [round(float(c), 4) for c in curve],
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
