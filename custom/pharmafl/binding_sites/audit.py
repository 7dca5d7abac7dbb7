"""Membership-inference audit of ESM-2 LoRA binding-site models: does a model reveal which chains it trained on?

The privacy unit is one protein chain, as for DP-SGD. Per client:
- **members** are a random sample of the client's training chains; **non-members** its own test chains (a random
  split by sequence group of the same client's chains: the same distribution, never trained on).
- **models attacked**: the local model (the client alone, trained here as ``baseline esm --mode local``), each
  finished run's final model at this client (its saved adapter and head), and the centralized model (every
  client's training chains pooled, as ``baseline esm --mode centralized``; its members are still this client's).
- **attacks**: LOSS and offline RMIA (``pharmafl.privacy.audit``) on Pr(x | model) = exp(-mean per-residue
  cross-entropy over the chain's residues), with reference models the auditor trains on random halves of the
  common test set (in no target); RMIA's population samples z are the other clients' test chains (trained on by
  no model).

The models the audit trains use the job's settings and the federation's steps (rounds x local_steps per client)
and, like the baselines, no DP: the DP models under audit are the runs'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import peft
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from transformers import EsmTokenizer

from pharmafl.binding_sites.dataset import load_client, load_common_test
from pharmafl.binding_sites.formats import Chain
from pharmafl.binding_sites.model import IGNORE_INDEX, LoRASettings, encode_chains, load_esm_lora, load_lora_state
from pharmafl.binding_sites.train import SETTINGS, BindingSiteConfig, BindingSiteTrainer
from pharmafl.core.errors import InputError
from pharmafl.core.progress import StepReporter
from pharmafl.core.report import find_server_run_dir
from pharmafl.core.settings import apply_settings, field_types, settings
from pharmafl.jobs import executor_args, find_component, num_rounds, prepared_sites, read_json
from pharmafl.privacy.audit import AuditConfig, membership_attacks, model_result, write_audit_report

LOCAL = "local"
CENTRALIZED = "centralized"
# what the ESM-2 LoRA executor keeps at the end of a run (pharmafl.flare.esm_lora_executor's FINAL_*_FILE)
FINAL_ADAPTER = "local_adapter.npz"
FINAL_CARD = "local_adapter.json"
# executor arguments that are not setting groups and that the audit's models use
MODEL_ARGS = {"model": str, "model_config": dict | None}


class ChainScores(NamedTuple):
    """A model's scores of chains: Pr(x | model) per chain, and per chain its scored residues' labels and
    P(binding)."""

    probability: np.ndarray
    labels: list[np.ndarray]
    binding: list[np.ndarray]


@torch.no_grad()
def chain_scores(
    model: torch.nn.Module,
    tokenizer: EsmTokenizer,
    chains: Sequence[Chain],
    max_length: int,
    batch_size: int = 16,
) -> ChainScores:
    """Pr(x | model) of each chain, exp(-mean unweighted cross-entropy over its residues within ``max_length``),
    in eval mode; and the residues' labels and P(binding) for residue-level metrics."""
    model.eval()
    probability, labels, binding = [], [], []
    for start in range(0, len(chains), batch_size):
        part = chains[start : start + batch_size]
        batch = encode_chains(tokenizer, [c.sequence for c in part], [c.labels for c in part], max_length)
        target = batch.pop("labels")
        logits = model(**batch).logits.float()
        real = target != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.where(real, target, 0), reduction="none")
        mean_nll = (nll * real).sum(1) / real.sum(1)
        probability.append(torch.exp(-mean_nll.double()).numpy())
        positive = torch.softmax(logits, dim=-1)[..., 1]
        for row in range(len(part)):
            labels.append(target[row][real[row]].numpy())
            binding.append(positive[row][real[row]].numpy())
    return ChainScores(np.concatenate(probability) if probability else np.zeros(0), labels, binding)


def chain_probabilities(
    model: torch.nn.Module, tokenizer: EsmTokenizer, chains: Sequence[Chain], max_length: int, batch_size: int = 16
) -> np.ndarray:
    """Pr(x | model) of each chain (see ``chain_scores``)."""
    return chain_scores(model, tokenizer, chains, max_length, batch_size).probability


def residue_metrics(labels: Sequence[np.ndarray], binding: Sequence[np.ndarray]) -> dict[str, float]:
    """Residue-level AUC-PR (average precision) and AUC-ROC over chains' scored residues (NaN with one class)."""
    y = np.concatenate(labels) if len(labels) else np.zeros(0)
    p = np.concatenate(binding) if len(binding) else np.zeros(0)
    if len(np.unique(y)) < 2:
        return {"auc_pr": float("nan"), "auc_roc": float("nan")}
    return {"auc_pr": float(average_precision_score(y, p)), "auc_roc": float(roc_auc_score(y, p))}


def job_settings(job_dir: str | Path, overrides: Mapping | None = None) -> dict:
    """The job's executor arguments with ``overrides`` (``--set``) applied: the ``training`` and ``lora`` groups,
    ``model`` and ``model_config``. The audit's own models train without DP, so ``dp`` is not a setting here."""
    groups = {group: field_types(cls) for group, cls in SETTINGS.items() if group != "dp"}
    return apply_settings(executor_args(job_dir), overrides or {}, groups, MODEL_ARGS, Path(job_dir).name)


def run_site_adapters(workspace: str | Path) -> dict[str, tuple[Path, dict]]:
    """A finished ESM-2 LoRA run's final model folder per site, with that site's executor arguments."""
    run_dir = find_server_run_dir(workspace)
    out = {}
    for site_dir in sorted(p for p in run_dir.parent.parent.iterdir() if p.is_dir()):
        folder = site_dir / run_dir.name
        if not (folder / FINAL_ADAPTER).is_file():
            continue
        configs = sorted(folder.glob("app_*/config/config_fed_client.json"))
        args = find_component(read_json(configs[0]), "executor").get("args", {}) if configs else {}
        out[site_dir.name] = (folder, args)
    if not out:
        raise InputError(f"the run in '{workspace}' holds no site adapter ({FINAL_ADAPTER}); is it an ESM-2 run?")
    return out


def load_site_adapter(folder: Path, run_args: Mapping, job_args: Mapping) -> tuple[peft.PeftModel, dict | None]:
    """(the site's final model, the privacy its card records or None): a fresh model built as the run built it
    (its ``model``, ``model_config``, ``lora`` and seed; the audit job's where the run folder holds no config) with
    the saved LoRA factors and head loaded."""
    args = run_args or job_args
    lora = settings(LoRASettings, args.get("lora"), "lora")
    seed = settings(BindingSiteConfig, args.get("training"), "training").seed
    model, _ = load_esm_lora(args.get("model", ""), args.get("model_config"), lora, seed)
    with np.load(folder / FINAL_ADAPTER) as saved:
        load_lora_state(model, {name: saved[name] for name in saved.files})
    card = json.loads((folder / FINAL_CARD).read_text()) if (folder / FINAL_CARD).is_file() else {}
    return model, card.get("privacy")


def _cached(probabilities: Callable[[], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A record function over one client's records that scores them all once, on first use."""
    scored: list[np.ndarray] = []

    def at(rows: np.ndarray) -> np.ndarray:
        if not scored:
            scored.append(probabilities())
        return scored[0][rows]

    return at


def audit_binding_sites(
    data_dir: str | Path,
    runs: Mapping[str, str | Path],
    out_dir: str | Path,
    job_dir: str | Path,
    config: AuditConfig,
    progress: Callable[[str], None] = print,
    centralized: bool = True,
    overrides: Mapping | None = None,
) -> dict:
    """Audit each client's local model, each run's final site models and (``centralized``) the centralized model;
    write ``summary.json``, ``report.md`` and ``privacy.png`` under ``out_dir``; returns the summary.

    ``overrides`` changes the job's settings as ``baseline esm --set`` does (``training``, ``lora``, ``model``,
    ``model_config``); the scores crop chains at the resulting ``max_length`` for every model."""
    started = time.perf_counter()
    args = job_settings(job_dir, overrides)
    training = settings(BindingSiteConfig, args.get("training"), "training")
    lora = settings(LoRASettings, args.get("lora"), "lora")
    rounds = config.rounds or num_rounds(job_dir)
    steps = rounds * training.local_steps
    clients = prepared_sites(data_dir)
    train = {client: load_client(str(Path(data_dir) / client), "train") for client in clients}
    test = {client: load_client(str(Path(data_dir) / client), "test") for client in clients}
    common = load_common_test(str(data_dir))
    run_adapters = {name: run_site_adapters(workspace) for name, workspace in runs.items()}
    for name, adapters in run_adapters.items():
        missing = sorted(set(clients) - set(adapters))
        if missing:
            raise InputError(f"the run '{name}' has no model for {', '.join(missing)}.")

    _, tokenizer = load_esm_lora(args.get("model", ""), args.get("model_config"), lora, training.seed)

    def trained(chains: list[Chain], total_steps: int, what: str, seed: int = training.seed) -> peft.PeftModel:
        """A model trained as the baselines train one (same start, code and settings; ``seed`` drives batches)."""
        model, _ = load_esm_lora(args.get("model", ""), args.get("model_config"), lora, training.seed)
        trainer = BindingSiteTrainer(model, tokenizer, chains, replace(training, seed=seed))
        progress(f"{what}: {total_steps} steps on {len(chains)} chains")
        trainer.train(total_steps, progress=StepReporter(progress, prefix=f"{what} ", interval=60.0))
        return model

    halves = np.random.default_rng(config.seed + 1)
    references = [
        trained(
            [common[i] for i in np.sort(halves.choice(len(common), len(common) // 2, replace=False))],
            steps,
            f"reference model {k + 1}/{config.references} (half of the common test set)",
            seed=training.seed + 100 + k,
        )
        for k in range(config.references)
    ]
    pooled = None
    if centralized:
        pooled = trained([c for client in clients for c in train[client]], steps * len(clients), CENTRALIZED)

    def scores(model: torch.nn.Module, chains: list[Chain]) -> ChainScores:
        return chain_scores(model, tokenizer, chains, training.max_length)

    summary: dict = {
        "config": asdict(config),
        "job": str(job_dir),
        "rounds": rounds,
        "steps": {LOCAL: steps, CENTRALIZED: steps * len(clients) if centralized else None, "reference": steps},
        "runs": {name: str(workspace) for name, workspace in runs.items()},
        "sites": {},
    }
    rng = np.random.default_rng(config.seed)
    for client in clients:
        member_rows = np.sort(rng.choice(len(train[client]), min(config.max_members, len(train[client])), False))
        members = [train[client][i] for i in member_rows]
        others = [c for other in clients if other != client for c in test[other]]
        if not others:
            raise InputError("the audit needs at least two clients: RMIA's population is the other clients' tests.")
        population = [others[i] for i in np.sort(rng.choice(len(others), min(config.population, len(others)), False))]
        records = members + test[client] + population
        m, t = len(members), len(test[client])
        rows = np.arange(m), np.arange(m, m + t), np.arange(m + t, len(records))
        progress(
            f"{client}: {m} members, {t} non-members (its test chains), {len(population)} population chains "
            f"(other clients' tests), {config.references} reference models"
        )
        reference_fns = [_cached(lambda r=r, x=records: scores(r, x).probability) for r in references]
        targets: dict[str, tuple[torch.nn.Module, dict | None]] = {}
        targets[LOCAL] = (trained(train[client], steps, f"{client} {LOCAL}"), None)
        for name, adapters in run_adapters.items():
            folder, run_args = adapters[client]
            targets[name] = load_site_adapter(folder, run_args, args)
        if pooled is not None:
            targets[CENTRALIZED] = (pooled, None)
        site_summary = {"members": m, "non_members": t, "population": len(population), "models": {}}
        for name, (model, privacy) in targets.items():
            scored = scores(model, records)
            utility = residue_metrics(scored.labels[m : m + t], scored.binding[m : m + t])
            attacks = membership_attacks(lambda r, p=scored.probability: p[r], reference_fns, *rows, config)
            site_summary["models"][name] = model_result(client, name, utility, privacy, attacks, progress)
        summary["sites"][client] = site_summary
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_audit_report(summary, Path(out_dir))
    return summary
