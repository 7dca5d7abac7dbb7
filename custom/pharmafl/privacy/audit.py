"""What every membership-inference audit shares: its settings, the two attacks on one model, the report.

A use case's audit (``pharmafl.multitask.audit``, ``pharmafl.binding_sites.audit``) picks members, non-members,
population and reference models from its own data and models, and gives each model as a function from records to
Pr(x | model); this module attacks it and writes ``summary.json``, ``report.md`` and ``privacy.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pharmafl.core.errors import InputError
from pharmafl.privacy.membership import attack_metrics, loss_attack_scores, rmia_scores


@dataclass
class AuditConfig:
    """Settings of ``pharmafl audit membership``."""

    references: int = 2  # reference models per site for RMIA, trained by the auditor on data without the targets
    max_members: int = 2000  # members sampled per site
    population: int = 2000  # population records (trained on by no model attacked) RMIA compares against
    offline_a: float = 0.33
    bootstrap: int = 200
    seed: int = 0
    rounds: int | None = None  # training of the models the audit trains itself (default: as the job's rounds)

    def __post_init__(self) -> None:
        if self.references < 1 or self.max_members < 1 or self.population < 1 or self.bootstrap < 0:
            raise InputError("--references, --max-members and --population must be at least 1, --bootstrap >= 0.")


def membership_attacks(
    target: Callable[[np.ndarray], np.ndarray],
    references: list[Callable[[np.ndarray], np.ndarray]],
    members: np.ndarray,
    non_members: np.ndarray,
    population: np.ndarray,
    config: AuditConfig,
) -> dict:
    """LOSS and offline RMIA against one target model: ``target(rows)`` and each ``references[k](rows)`` give
    Pr(x | model) of each record (the probability of its true labels); AUC and TPR at 0.1%/1% FPR with intervals."""
    targets = np.concatenate([members, non_members])
    is_member = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    p_target, p_population = target(targets), target(population)
    refs_target = np.stack([ref(targets) for ref in references])
    refs_population = np.stack([ref(population) for ref in references])
    loss = loss_attack_scores(-np.log(np.clip(p_target, 1e-12, 1.0)))
    rmia = rmia_scores(p_target, refs_target, p_population, refs_population, offline_a=config.offline_a)
    return {
        "loss": attack_metrics(loss, is_member, n_bootstrap=config.bootstrap, seed=config.seed),
        "rmia": attack_metrics(rmia, is_member, n_bootstrap=config.bootstrap, seed=config.seed),
    }


def model_result(
    where: str, name: str, utility: dict, privacy: dict | None, attacks: dict, progress: Callable[[str], None]
) -> dict:
    """One attacked model's summary entry (``utility``: its ``auc_pr`` and ``auc_roc``; the epsilon and delta
    ``privacy`` records, None without DP; the attacks), said in one progress line."""
    progress(
        f"{where} {name}: test AUC-PR {utility['auc_pr']:.4f}, AUC-ROC {utility['auc_roc']:.4f}; LOSS AUC "
        f"{attacks['loss']['auc']:.3f}, RMIA AUC {attacks['rmia']['auc']:.3f}, TPR@1%FPR "
        f"{attacks['rmia']['tpr_at_fpr_0.01']:.3f}" + (f", epsilon {privacy['epsilon']:.2f}" if privacy else "")
    )
    return {
        "auc_pr": utility["auc_pr"],
        "auc_roc": utility["auc_roc"],
        "epsilon": privacy["epsilon"] if privacy else None,
        "delta": privacy["delta"] if privacy else None,
        **attacks,
    }


def audit_table(summary: dict) -> str:
    """The per-site table of every model attacked (utility, epsilon, attacks) and, when measured, the server's view."""
    lines = [
        "| site | model | epsilon | test AUC-PR | LOSS AUC | RMIA AUC [95% CI] | RMIA TPR@1%FPR | RMIA TPR@0.1%FPR |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for site, result in summary["sites"].items():
        for name, m in result["models"].items():
            eps = "-" if m["epsilon"] is None else f"{m['epsilon']:.2f}"
            ci = m["rmia"].get("auc_ci") or [float("nan")] * 2
            lines.append(
                f"| {site} | {name} | {eps} | {m['auc_pr']:.4f} | {m['loss']['auc']:.3f} | "
                f"{m['rmia']['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {m['rmia']['tpr_at_fpr_0.01']:.3f} | "
                f"{m['rmia']['tpr_at_fpr_0.001']:.3f} |"
            )
    if not summary.get("update_attack"):
        return "\n".join(lines)
    lines += [
        "",
        "What the server sees (bit-presence attack on the trunk's input-layer update):",
        "",
        "| run | site | rows moved (own / aggregate) | AUC own update | AUC secure aggregate | TPR@1%FPR own | "
        "TPR@1%FPR aggregate |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, per_site in summary.get("update_attack", {}).items():
        for site, r in per_site.items():
            lines.append(
                f"| {name} | {site} | {r['rows_moved_individual']} / {r['rows_moved_aggregate']} | "
                f"{r['individual']['auc']:.3f} | {r['secure_aggregate']['auc']:.3f} | "
                f"{r['individual']['tpr_at_fpr_0.01']:.3f} | {r['secure_aggregate']['tpr_at_fpr_0.01']:.3f} |"
            )
    return "\n".join(lines)


def write_audit_report(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(name for result in summary["sites"].values() for name in result["models"]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per model, one marker per site
    for index, result in enumerate(summary["sites"].values()):
        marker = "osD^vP*X"[index % 8]
        for name, m in result["models"].items():
            x = m["epsilon"] if m["epsilon"] is not None else np.inf
            label = name if index == 0 else None
            style = {"color": colour[name], "marker": marker, "label": label}
            axes[0].scatter(m["auc_pr"], m["rmia"]["tpr_at_fpr_0.01"], **style)
            axes[1].scatter(np.nan_to_num(x, posinf=100.0), m["auc_pr"], **style)
    axes[0].set_title(
        "markers: " + ", ".join(f"{s} {'osD^vP*X'[i % 8]}" for i, s in enumerate(summary["sites"])), fontsize=8
    )
    axes[0].set_xlabel("test AUC-PR (utility)")
    axes[0].set_ylabel("RMIA TPR at 1% FPR (leakage)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("epsilon (no DP plotted at 100)")
    axes[1].set_ylabel("test AUC-PR")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "privacy.png", dpi=120)
    plt.close(fig)
    (out / "report.md").write_text(
        "# Membership-inference audit\n\n" + audit_table(summary) + "\n\n![utility vs leakage](privacy.png)\n"
    )
