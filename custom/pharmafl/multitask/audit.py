"""Membership-inference audit of MELLODDY-style models: what a model, and what the server, reveals about members.

Per site:
- **members** are a random sample of the site's training compounds; **non-members** its audit hold-out compounds in
  the training folds (``prepare chem --audit-fraction``): drawn at random from the same folds, never trained on.
  Test-fold compounds are not used: their scaffolds differ from the training folds' by construction.
- **models attacked**: the single-partner model (trained here with the job's settings and rounds, as
  ``baseline chem``) and each finished run's final model at this site (global trunk + the site's own head), e.g.
  the plain federated job and DP jobs at several budgets.
- **attacks**: LOSS (a compound's mean BCE over its observed labels) and offline RMIA with ``references``
  reference models that the auditor trains on random halves of the site's other training compounds (targets are
  never in them); RMIA's population samples z are the site's validation-fold compounds, which no model trained on.
- **what the server sees**: the trunk update one round of local training sends, from the run's final model with
  the run's own settings (DP included). The input layer is trained with lazy Adam, so a site's update is non-zero
  exactly in the rows of its batch compounds' bits; the attack scores a compound by the share of its bits whose
  rows moved. The same attack on the sum of every site's update is what the server sees under secure aggregation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pharmafl.core.errors import InputError
from pharmafl.core.report import find_server_run_dir
from pharmafl.core.settings import settings
from pharmafl.jobs import find_component, prepared_sites, read_json
from pharmafl.multitask.baseline import job_train_config
from pharmafl.multitask.dataset import SiteData, load_site
from pharmafl.multitask.predict import MODEL_CARD
from pharmafl.multitask.train import MultiTaskTrainer, TrainConfig, sparse_batch
from pharmafl.privacy.audit import AuditConfig, membership_attacks, model_result, write_audit_report
from pharmafl.privacy.dp_sgd import DPConfig
from pharmafl.privacy.membership import attack_metrics, bit_presence_scores, nonzero_rows

SINGLE_PARTNER = "single partner"
CENTRALIZED = "centralized"
FEDERATED_MODEL = "local_model.pt"


@torch.no_grad()
def record_probabilities(
    model: torch.nn.Module, data: SiteData, rows: np.ndarray, batch_size: int = 2048
) -> np.ndarray:
    """Pr(x | model) of each compound: exp(-mean BCE over its observed labels), in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        block = rows[start : start + batch_size]
        indices, offsets = sparse_batch(data.X, block)
        y = torch.from_numpy(data.Y[block].toarray().astype(np.float32))
        observed = (y != 0).float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            model(indices, offsets), (y > 0).float(), reduction="none"
        )
        out.append(torch.exp(-(bce * observed).sum(1) / observed.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def audit_targets(data: SiteData, train_rows: np.ndarray, config: AuditConfig) -> tuple[np.ndarray, ...]:
    """(members, non-members, population): population = training compounds that are not member targets."""
    fold_of = data.folds
    training_folds = np.unique(fold_of[train_rows])
    non_members = data.audit_rows[np.isin(fold_of[data.audit_rows], training_folds)]
    if len(non_members) == 0:
        raise InputError(
            f"the site at {data.path} has no audit hold-out in its training folds; prepare the data with "
            "--audit-fraction (e.g. 0.1)."
        )
    rng = np.random.default_rng(config.seed)
    members = np.sort(rng.choice(train_rows, min(config.max_members, len(train_rows)), replace=False))
    population = np.setdiff1d(train_rows, members)
    return members, non_members, population


def run_site_models(workspace: str | Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """A finished run's final model folder per site, and each site's executor arguments (its settings)."""
    run_dir = find_server_run_dir(workspace)
    folders, args = {}, {}
    for site_dir in sorted(p for p in run_dir.parent.parent.iterdir() if p.is_dir()):
        folder = site_dir / run_dir.name
        if not (folder / FEDERATED_MODEL).is_file():
            continue
        folders[site_dir.name] = folder
        configs = sorted(folder.glob("app_*/config/config_fed_client.json"))
        args[site_dir.name] = find_component(read_json(configs[0]), "executor").get("args", {}) if configs else {}
    if not folders:
        raise InputError(f"the run in '{workspace}' holds no site model ({FEDERATED_MODEL}); is it a multi-task run?")
    return folders, args


class CentralizedView:
    """The centralized model (one partner: every compound and task pooled) seen through one site's data: its
    compounds matched by SMILES and its tasks by (assay, threshold), the same labels being scored."""

    def __init__(self, pooled: MultiTaskTrainer, site: SiteData):
        import pandas as pd

        self.pooled, self.site = pooled, site
        pooled_smiles = pd.read_csv(Path(pooled.data.path) / "compounds.csv")["smiles"]
        row_of = {smiles: i for i, smiles in enumerate(pooled_smiles)}
        site_smiles = pd.read_csv(Path(site.path) / "compounds.csv")["smiles"]
        self.row = np.array([row_of.get(smiles, -1) for smiles in site_smiles])
        column_of = {
            (a, float(t)): j
            for j, (a, t) in enumerate(zip(pooled.data.tasks["assay"], pooled.data.tasks["threshold"], strict=True))
        }
        pairs = [
            (i, column_of.get((a, float(t)), -1))
            for i, (a, t) in enumerate(zip(site.tasks["assay"], site.tasks["threshold"], strict=True))
        ]
        self.site_columns = np.array([i for i, j in pairs if j >= 0], dtype=np.int64)
        self.pooled_columns = np.array([j for i, j in pairs if j >= 0], dtype=np.int64)
        self.pooled_task = dict(
            zip(
                site.tasks["task_id"].iloc[self.site_columns],
                pooled.data.tasks["task_id"].iloc[self.pooled_columns],
                strict=True,
            )
        )

    def scorable(self, rows: np.ndarray) -> np.ndarray:
        """The rows the pooled model has (a compound every pooled task dropped is absent) with a matched label."""
        labelled = np.asarray((self.site.Y[rows][:, self.site_columns] != 0).sum(1)).ravel() > 0
        return rows[(self.row[rows] >= 0) & labelled]

    @torch.no_grad()
    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        model = self.pooled.model
        model.eval()
        indices, offsets = sparse_batch(self.pooled.data.X, self.row[rows])
        logits = model(indices, offsets)[:, torch.from_numpy(self.pooled_columns)]
        y = torch.from_numpy(self.site.Y[rows][:, self.site_columns].toarray().astype(np.float32))
        observed = (y != 0).float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, (y > 0).float(), reduction="none")
        return torch.exp(-(bce * observed).sum(1) / observed.sum(1).clamp(min=1)).double().numpy()

    def test_scores(self) -> dict:
        """Mean test AUC-PR/AUC-ROC of the pooled model over this site's tasks that both evaluate."""
        per_task = self.pooled.evaluate()["per_task"]
        own = set(self.site.tasks["task_id"][self.site.eval_task_mask])
        scored = [per_task[self.pooled_task[t]] for t in own if self.pooled_task.get(t) in per_task]
        return {k: float(np.mean([m[k] for m in scored])) if scored else float("nan") for k in ("auc_pr", "auc_roc")}


def _update_attack(
    site_updates: Mapping[str, np.ndarray], datas: Mapping[str, SiteData], targets: Mapping[str, tuple], config
) -> dict:
    """The bit-presence attack on each site's own input-layer update and on the sum of all sites' updates."""
    aggregate = np.sum([u for u in site_updates.values()], axis=0)
    aggregate_rows = nonzero_rows(aggregate)
    out = {}
    for site, update in site_updates.items():
        members, non_members = targets[site][0], targets[site][1]
        rows = np.concatenate([members, non_members])
        is_member = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
        X = datas[site].X[rows]
        own = nonzero_rows(update)
        out[site] = {
            "rows_moved_individual": int(own.sum()),
            "rows_moved_aggregate": int(aggregate_rows.sum()),
            "individual": attack_metrics(
                bit_presence_scores(own, X), is_member, n_bootstrap=config.bootstrap, seed=config.seed
            ),
            "secure_aggregate": attack_metrics(
                bit_presence_scores(aggregate_rows, X), is_member, n_bootstrap=config.bootstrap, seed=config.seed
            ),
        }
    return out


def audit_membership(
    data_dir: str | Path,
    runs: Mapping[str, str | Path],
    out_dir: str | Path,
    job_dir: str | Path,
    config: AuditConfig,
    progress: Callable[[str], None] = print,
    centralized: str | Path | None = None,
) -> dict:
    """Audit the single-partner model, each run's site models and (with ``centralized``: the same input prepared
    for one partner with the same audit fraction, so the same compounds are held out) the centralized model; write
    ``summary.json``, ``report.md`` and a figure under ``out_dir``; returns the summary."""
    started = time.perf_counter()
    training, trunk, job_rounds = job_train_config(job_dir)
    rounds = config.rounds or job_rounds
    sites = prepared_sites(data_dir)
    run_models = {name: run_site_models(ws) for name, ws in runs.items()}
    pooled = None
    if centralized is not None:
        pooled_sites = prepared_sites(centralized)
        if len(pooled_sites) != 1:
            raise InputError(
                f"--centralized takes data prepared for one partner; '{centralized}' has {len(pooled_sites)}."
            )
        pooled = MultiTaskTrainer(load_site(str(Path(centralized) / pooled_sites[0])), training, trunk)
        progress(f"centralized: training on {len(pooled.train_rows)} pooled compounds")
        pooled.train(epochs=rounds * training.local_epochs)
    summary: dict = {
        "config": asdict(config),
        "job": str(job_dir),
        "rounds": rounds,
        "runs": {name: str(path) for name, path in runs.items()},
        "sites": {},
    }
    datas, targets = {}, {}
    for site in sites:
        data = load_site(str(Path(data_dir) / site))
        alone = MultiTaskTrainer(data, training, trunk)
        members, non_members, population = audit_targets(data, alone.train_rows, config)
        datas[site], targets[site] = data, (members, non_members, population)
        rng = np.random.default_rng(config.seed + 1)
        # RMIA's population samples z: trained on by neither the target nor the references (the validation fold)
        validation = data.rows_in_folds([training.validation_fold])
        z = np.sort(rng.choice(validation, min(config.population, len(validation)), replace=False))
        progress(
            f"{site}: {len(members)} members, {len(non_members)} non-members (audit hold-out), "
            f"{config.references} reference models on halves of {len(population)} other training compounds, "
            f"{len(z)} population compounds"
        )
        references = []
        for k in range(config.references):
            ref = MultiTaskTrainer(data, TrainConfig(**{**asdict(training), "seed": training.seed + 100 + k}), trunk)
            ref.train_rows = np.sort(rng.choice(population, len(population) // 2, replace=False))
            ref.train(epochs=rounds * training.local_epochs)
            references.append(lambda rows, model=ref.model, d=data: record_probabilities(model, d, rows))
        alone.train(epochs=rounds * training.local_epochs)
        models = {SINGLE_PARTNER: (alone, None)}
        for name, (folders, _) in run_models.items():
            if site not in folders:
                raise InputError(f"the run '{name}' has no model for {site}.")
            scored = MultiTaskTrainer(data, training, trunk)
            scored.model.load_state_dict(torch.load(folders[site] / FEDERATED_MODEL, weights_only=True))
            card = (
                json.loads((folders[site] / MODEL_CARD).read_text()) if (folders[site] / MODEL_CARD).is_file() else {}
            )
            models[name] = (scored, card.get("privacy"))
        site_summary = {"members": len(members), "non_members": len(non_members), "models": {}}
        if pooled is not None:
            view = CentralizedView(pooled, data)
            kept = [view.scorable(rows) for rows in (members, non_members, z)]
            attacks = membership_attacks(view.probabilities, references, *kept, config)
            site_summary["models"][CENTRALIZED] = {**view.test_scores(), "epsilon": None, "delta": None, **attacks}
            progress(f"{site} centralized: RMIA AUC {attacks['rmia']['auc']:.3f} on {len(kept[0])}/{len(kept[1])}")
        for name, (trainer, privacy) in models.items():
            test = trainer.evaluate()
            attacks = membership_attacks(
                lambda rows, m=trainer.model, d=data: record_probabilities(m, d, rows),
                references,
                members,
                non_members,
                z,
                config,
            )
            site_summary["models"][name] = model_result(site, name, test, privacy, attacks, progress)
        summary["sites"][site] = site_summary
    summary["update_attack"] = {}
    for name, (folders, args) in run_models.items():
        updates = {}
        for site in sites:
            run_training = settings(TrainConfig, args[site].get("training"), "training")
            dp = settings(DPConfig, args[site].get("dp"), "dp")
            trainer = MultiTaskTrainer(datas[site], run_training, trunk, dp)
            trainer.model.load_state_dict(torch.load(folders[site] / FEDERATED_MODEL, weights_only=True))
            before = trainer.model.trunk.input.weight.detach().clone()
            trainer.train(epochs=1)
            updates[site] = (trainer.model.trunk.input.weight.detach() - before).numpy()
        summary["update_attack"][name] = _update_attack(updates, datas, targets, config)
        for site, result in summary["update_attack"][name].items():
            progress(
                f"server's view, {name}, {site}: bit-presence AUC {result['individual']['auc']:.3f} on the site's "
                f"own update, {result['secure_aggregate']['auc']:.3f} on the secure aggregate"
            )
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_audit_report(summary, Path(out_dir))
    return summary
