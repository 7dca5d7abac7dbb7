"""Membership-inference audit of eICU mortality models: does a model reveal which ICU stays it trained on?

The privacy unit is one ICU stay, as for DP-SGD. Per site:
- **members** are the site's training stays (a random sample of at most ``max_members``); **non-members** its test
  stays (a stratified random split of the same site's stays: the same distribution, never trained on).
- **models attacked**: the site alone (as ``baseline eicu --mode local``), each finished run's final global model (the
  server's persisted ``FL_global_model.pt``), and the centralized model (every site's training stays pooled).
- **attacks**: LOSS and offline RMIA (``pharmafl.privacy.audit``) on Pr(x | model) = p if the stay died, else 1 - p,
  with reference models the auditor trains on random halves of all sites' validation stays (no model attacked
  trains on them; the sites only choose their positive weight on them); RMIA's population samples are the other
  sites' test stays (trained on by no model).

Each model scores a stay standardised as it was trained: the site alone with the site's own statistics, a run's
global model with the statistics its script was given (``--stats``) or else the site's own, the centralized model
and each reference with those of their training stays. The audit's own models train with the job's settings, for
the job's rounds x local epochs, without DP; a DP run's epsilon is recomputed from its script's ``--dp-*`` settings
with the accountant the sites used (every site trains the same steps: the run's rounds x local epochs).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from pharmafl.clinical.baseline import job_config
from pharmafl.clinical.mortality import config_from, dp_config_from, parser, standardizer_for
from pharmafl.clinical.train import (
    MortalityConfig,
    MortalityNet,
    MortalityTrainer,
    SiteStays,
    Standardizer,
    load_site,
    make_model,
    n_inputs,
    pooled,
    predict,
    scores,
)
from pharmafl.core.errors import InputError
from pharmafl.core.report import find_server_run_dir
from pharmafl.jobs import find_component, num_rounds, prepared_sites, read_json
from pharmafl.privacy.audit import AuditConfig, membership_attacks, model_result, write_audit_report
from pharmafl.privacy.dp_sgd import PrivacyBudget

LOCAL = "local"
CENTRALIZED = "centralized"
GLOBAL_MODEL = "FL_global_model.pt"  # what FLARE's PyTorch persistor keeps in the server's app folder

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (raw features, labels) -> Pr(x | model)


def stay_probabilities(model: torch.nn.Module, standardizer: Standardizer, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pr(x | model) of each stay: the predicted probability of its outcome (p if it died, else 1 - p)."""
    p = predict(model, standardizer.transform(X))
    return np.where(y == 1, p, 1.0 - p)


def run_model(workspace: str | Path) -> tuple[MortalityNet, MortalityConfig, str, int]:
    """A finished eICU run's final global model, its training settings, its script arguments and its rounds."""
    run_dir = find_server_run_dir(workspace)
    path = next(iter(sorted(run_dir.glob(f"app_*/{GLOBAL_MODEL}"))), None)
    if path is None:
        raise InputError(f"the run in '{workspace}' has no {GLOBAL_MODEL}; is it an eICU run?")
    clients = sorted(run_dir.parent.parent.glob(f"*/{run_dir.name}/app_*/config/config_fed_client.json"))
    if not clients:
        raise InputError(f"the run in '{workspace}' has no site configuration (config_fed_client.json).")
    script_args = find_component(read_json(clients[0]), "executor").get("args", {}).get("task_script_args", "")
    config = config_from(parser(alone=False).parse_args(shlex.split(script_args)))
    servers = sorted(run_dir.glob("app_*/config/config_fed_server.json"))
    workflows = read_json(servers[0]).get("workflows", []) if servers else []
    rounds = next((int(w["args"]["num_rounds"]) for w in workflows if "num_rounds" in w.get("args", {})), None)
    if rounds is None:
        raise InputError(f"the run in '{workspace}' has no training workflow with num_rounds.")
    model = make_model(n_inputs(), config)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(saved.get("model", saved))
    return model, config, script_args, rounds


def spent_privacy(script_args: str, config: MortalityConfig, rounds: int, training_stays: int) -> dict | None:
    """What a site with ``training_stays`` spent under the run's ``--dp-*`` settings over ``rounds`` rounds, or None
    without DP: the steps it took (rounds x local epochs of Poisson batches, until the budget was spent)."""
    dp = dp_config_from(parser(alone=False).parse_args(shlex.split(script_args)), config)
    if not dp.enabled:
        return None
    budget = PrivacyBudget(dp, training_stays, config.batch_size)
    planned = rounds * config.local_epochs * budget.steps_per_epoch
    budget.steps = planned if budget.max_steps is None else min(planned, budget.max_steps)
    return budget.summary()


def _stats_path(script_args: str) -> str | None:
    return parser(alone=False).parse_args(shlex.split(script_args)).stats


def _trained(site: SiteStays, config: MortalityConfig, rounds: int) -> tuple[MortalityNet, Standardizer]:
    """A model trained as ``baseline eicu`` trains one: rounds x local epochs on the site's training stays."""
    trainer = MortalityTrainer(site, config)
    for _ in range(rounds):
        trainer.train()
    return trainer.model, trainer.standardizer


def audit_eicu(
    data_dir: str | Path,
    runs: Mapping[str, str | Path],
    out_dir: str | Path,
    job_dir: str | Path,
    config: AuditConfig,
    progress: Callable[[str], None] = print,
    centralized: bool = True,
    overrides: Mapping | None = None,
) -> dict:
    """Audit each site's local model, each run's final global model and (``centralized``) the centralized model;
    write ``summary.json``, ``report.md`` and ``privacy.png`` under ``out_dir``; returns the summary."""
    started = time.perf_counter()
    training = job_config(job_dir, dict(overrides or {}))
    rounds = config.rounds or num_rounds(job_dir)
    names = prepared_sites(data_dir)
    if len(names) < 2:
        raise InputError("the audit needs at least two sites: RMIA's population is the other sites' test stays.")
    sites = {name: load_site(Path(data_dir) / name) for name in names}
    targets_of_runs = {name: run_model(workspace) for name, workspace in runs.items()}

    # references: random halves of every site's validation stays, standardised and trained as a site alone would be
    validation = pooled(list(sites.values()))
    validation_rows = np.flatnonzero(validation.split == "validation")
    halves = np.random.default_rng(config.seed + 1)
    weight = "balanced" if training.pos_weight == "auto" else training.pos_weight  # no validation stays to choose by
    reference_config = replace(training, pos_weight=weight)
    references = []
    for k in range(config.references):
        rows = np.sort(halves.choice(validation_rows, len(validation_rows) // 2, replace=False))
        split = np.full(len(rows), "train", dtype=object)
        half = SiteStays(f"reference-{k + 1}", validation.X[rows], validation.y[rows], split, validation.apache[rows])
        references.append(_trained(half, replace(reference_config, seed=training.seed + 100 + k), rounds))
    progress(f"{config.references} reference models, each on half of the {len(validation_rows)} validation stays")
    pooled_model = _trained(pooled(list(sites.values())), training, rounds) if centralized else None

    summary: dict = {
        "config": asdict(config),
        "job": str(job_dir),
        "rounds": rounds,
        "epochs": {LOCAL: rounds * training.local_epochs},
        "runs": {name: str(workspace) for name, workspace in runs.items()},
        "sites": {},
    }
    rng = np.random.default_rng(config.seed)
    for name, site in sites.items():
        train_rows = np.flatnonzero(site.split == "train")
        members = np.sort(rng.choice(train_rows, min(config.max_members, len(train_rows)), replace=False))
        non_members = np.flatnonzero(site.split == "test")
        others = [other for other in names if other != name]
        X_other = np.vstack([sites[o].X[sites[o].split == "test"] for o in others])
        y_other = np.concatenate([sites[o].y[sites[o].split == "test"] for o in others])
        chosen = np.sort(rng.choice(len(y_other), min(config.population, len(y_other)), replace=False))
        X = np.vstack([site.X[members], site.X[non_members], X_other[chosen]])
        y = np.concatenate([site.y[members], site.y[non_members], y_other[chosen]])
        m, t = len(members), len(non_members)
        rows = np.arange(m), np.arange(m, m + t), np.arange(m + t, len(y))
        progress(f"{name}: {m} members, {t} non-members (its test stays), {len(chosen)} population stays")
        reference_scores = [stay_probabilities(model, std, X, y) for model, std in references]
        reference_fns = [lambda r, p=p: p[r] for p in reference_scores]
        targets: dict[str, tuple[torch.nn.Module, Standardizer, dict | None]] = {}
        targets[LOCAL] = (*_trained(site, training, rounds), None)
        for run, (model, run_config, script_args, run_rounds) in targets_of_runs.items():
            stats = _stats_path(script_args)
            try:
                standardizer = standardizer_for(site, stats, data_dir) if stats else None
            except InputError as err:
                raise InputError(f"the run '{run}' standardised with statistics that cannot be read: {err}") from None
            standardizer = standardizer or Standardizer.fit(site.part("train")[0])
            targets[run] = (model, standardizer, spent_privacy(script_args, run_config, run_rounds, len(train_rows)))
        if pooled_model is not None:
            targets[CENTRALIZED] = (*pooled_model, None)
        site_summary = {"members": m, "non_members": t, "population": len(chosen), "models": {}}
        for model_name, (model, standardizer, privacy) in targets.items():
            probability = stay_probabilities(model, standardizer, X, y)
            risk = predict(model, standardizer.transform(site.X[non_members]))
            scored = scores(site.y[non_members], risk)
            attacks = membership_attacks(lambda r, p=probability: p[r], reference_fns, *rows, config)
            utility = {"auc_pr": scored["auprc"], "auc_roc": scored["auroc"]}
            site_summary["models"][model_name] = model_result(name, model_name, utility, privacy, attacks, progress)
        summary["sites"][name] = site_summary
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_audit_report(summary, Path(out_dir))
    return summary
