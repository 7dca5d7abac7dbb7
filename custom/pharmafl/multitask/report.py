"""The multi-task (MELLODDY) report: per-partner federated vs single-partner, per task, with plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pharmafl.core.errors import InputError
from pharmafl.core.report import (
    federated_final,
    federated_rounds,
    find_server_run_dir,
    rounds_note,
    site_metrics,
    tensorboard_curves,
    write_report_files,
)
from pharmafl.privacy.report import privacy_table, site_privacy


def _pick(metrics: dict) -> dict:
    return {"auc_roc": metrics.get("auc_roc"), "auc_pr": metrics.get("auc_pr")}


PER_TASK_METRICS = ("auc_roc", "auc_pr", "auc_pr_cal", "brier")


def _finite_mean(values: np.ndarray) -> float:
    """Mean over the finite values (NaN: a metric no task carries, e.g. from results of an older job)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def per_task_comparison(federated: dict, single: dict) -> dict | None:
    """MELLODDY's per-task comparison of the multi-partner (MP) and single-partner (SP) models at one partner.

    Over the tasks both scored (the partner's evaluation quorum): the mean MP - SP of each metric (Brier: lower
    is better), the mean relative improvement to perfect of AUC-PR ((MP - SP) / (1 - SP), MELLODDY's "RIPtoP"),
    the share of tasks whose AUC-PR improved, the paired Wilcoxon signed-rank test over tasks on AUC-PR
    (two-sided p), and the mean AUC-PR delta by quartile of the tasks' training labels. None: no shared tasks.
    """
    from scipy.stats import wilcoxon

    tasks = sorted(set(federated) & set(single))
    if not tasks:
        return None
    mp = {name: np.array([federated[t].get(name, np.nan) for t in tasks], dtype=float) for name in PER_TASK_METRICS}
    sp = {name: np.array([single[t].get(name, np.nan) for t in tasks], dtype=float) for name in PER_TASK_METRICS}
    delta = mp["auc_pr"] - sp["auc_pr"]
    headroom = 1.0 - sp["auc_pr"]
    riptop = np.divide(delta, headroom, out=np.full_like(delta, np.nan), where=headroom > 0)
    p_value = None
    if len(tasks) >= 2 and np.any(delta != 0):
        p_value = float(wilcoxon(mp["auc_pr"], sp["auc_pr"]).pvalue)
    result = {
        "tasks": len(tasks),
        "mean_delta": {name: _finite_mean(mp[name] - sp[name]) for name in PER_TASK_METRICS},
        "riptop_auc_pr": float(np.nanmean(riptop)) if np.isfinite(riptop).any() else None,
        "improved_share": float(np.mean(delta > 0)),
        "wilcoxon_p": p_value,
    }
    sizes = np.array([single[t].get("train_labels", federated[t].get("train_labels", -1)) for t in tasks], float)
    # the per-task pairs behind the scatter plot, in task order (no task names: they stay with the partner)
    result["auc_pr_pairs"] = {
        "single_partner": sp["auc_pr"].tolist(),
        "federated": mp["auc_pr"].tolist(),
        "train_labels": sizes.astype(int).tolist(),
    }
    if np.all(sizes >= 0) and len(tasks) >= 4:
        edges = np.quantile(sizes, [0, 0.25, 0.5, 0.75, 1])
        quartile = np.clip(np.searchsorted(edges[1:-1], sizes, side="right"), 0, 3)
        result["by_train_labels"] = [
            {
                "quartile": q + 1,
                "train_labels": [int(sizes[quartile == q].min()), int(sizes[quartile == q].max())],
                "tasks": int((quartile == q).sum()),
                "mean_delta_auc_pr": float(delta[quartile == q].mean()),
            }
            for q in range(4)
            if (quartile == q).any()
        ]
    return result


def regression_comparison(federated: dict | None, single: dict | None) -> dict | None:
    """Per-task MP - SP of R² and RMSE over the regression tasks both scored, the share of tasks whose R²
    improved and the paired Wilcoxon test on R²; None when either side trained no regression head."""
    from scipy.stats import wilcoxon

    mp, sp = (federated or {}).get("per_task", {}), (single or {}).get("per_task", {})
    tasks = sorted(set(mp) & set(sp))
    if not tasks:
        return None
    r2 = np.array([[mp[t]["r2"], sp[t]["r2"]] for t in tasks], dtype=float)
    rmse = np.array([[mp[t]["rmse"], sp[t]["rmse"]] for t in tasks], dtype=float)
    delta = r2[:, 0] - r2[:, 1]
    return {
        "tasks": len(tasks),
        "federated": {"r2": _finite_mean(r2[:, 0]), "rmse": _finite_mean(rmse[:, 0])},
        "single_partner": {"r2": _finite_mean(r2[:, 1]), "rmse": _finite_mean(rmse[:, 1])},
        "mean_delta": {"r2": _finite_mean(delta), "rmse": _finite_mean(rmse[:, 0] - rmse[:, 1])},
        "improved_share": float(np.mean(delta > 0)),
        "wilcoxon_p": float(wilcoxon(r2[:, 0], r2[:, 1]).pvalue) if len(tasks) >= 2 and np.any(delta != 0) else None,
    }


def build_summary(workspace: str | Path, baseline_dir: str | Path | None = None) -> dict:
    run_dir = find_server_run_dir(workspace)
    final = federated_final(run_dir)
    curves = tensorboard_curves(run_dir)
    baseline = {}
    if baseline_dir is not None:
        path = Path(baseline_dir) / "summary.json"
        if not path.is_file():
            raise InputError(f"No baseline results at '{path}'; run `pharmafl baseline chem` first.")
        baseline_summary = json.loads(path.read_text())
        baseline, baseline_rounds = baseline_summary["sites"], baseline_summary.get("rounds")
    sites = {}
    for site in sorted(final):
        entry = {
            "tasks_evaluated": int(final[site].get("tasks_evaluated", 0)),
            "federated": _pick(final[site]),
            "federated_curve_auc_pr": curves.get(site, []),
        }
        if site in baseline:
            single = baseline[site]
            entry["single_partner"] = _pick(single)
            entry["single_partner_curve_auc_pr"] = single.get("curve_auc_pr", [])
            entry["delta"] = {k: entry["federated"][k] - entry["single_partner"][k] for k in ("auc_roc", "auc_pr")}
            # Per-task results stay at the site; a server-side result carries them only from older jobs.
            federated_full = site_metrics(run_dir, site) or final[site]
            federated_per_task = federated_full.get("per_task", {})
            federated_conformal = federated_full.get("conformal")
            if federated_conformal or single.get("conformal"):
                entry["conformal"] = {"federated": federated_conformal, "single_partner": single.get("conformal")}
            regression = regression_comparison(federated_full.get("regression"), single.get("regression"))
            if regression:
                entry["regression"] = regression
            comparison = per_task_comparison(federated_per_task, single.get("per_task", {}))
            entry["per_task"] = comparison
            entry["mean_per_task_delta_auc_pr"] = None if comparison is None else comparison["mean_delta"]["auc_pr"]
        privacy = site_privacy(run_dir, site)
        if privacy:
            entry["privacy"] = privacy
        sites[site] = entry
    deltas = [entry["delta"]["auc_pr"] for entry in sites.values() if "delta" in entry]
    rounds = {"federated": federated_rounds(run_dir)}
    if baseline_dir is not None:
        rounds["single_partner"] = baseline_rounds
    summary = {"run_dir": str(run_dir), "rounds": rounds, "sites": sites}
    if deltas:
        summary["federated_beats_single_partner_everywhere"] = bool(len(deltas) == len(sites) and min(deltas) > 0)
    return summary


def format_table(summary: dict) -> str:
    header = (
        "| site | tasks | federated AUC-ROC | federated AUC-PR "
        "| single-partner AUC-ROC | single-partner AUC-PR | delta AUC-PR | tasks improved | p (Wilcoxon) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    for site, entry in summary["sites"].items():
        single = entry.get("single_partner", {})
        delta = entry.get("delta", {}).get("auc_pr")
        lines.append(
            f"| {site} | {entry['tasks_evaluated']} | {fmt(entry['federated']['auc_roc'])} | "
            f"{fmt(entry['federated']['auc_pr'])} | {fmt(single.get('auc_roc'))} | {fmt(single.get('auc_pr'))} | "
            f"{'n/a' if delta is None else f'{delta:+.4f}'} | {improved_cell(entry.get('per_task'))} | "
            f"{p_value_cell(entry.get('per_task'))} |"
        )
    if "federated_beats_single_partner_everywhere" in summary:
        verdict = "yes" if summary["federated_beats_single_partner_everywhere"] else "no"
        lines.append(f"\nFederated mean AUC-PR above single-partner at every site: {verdict}")
    rounds = summary.get("rounds", {})
    single = {"single-partner": rounds["single_partner"]} if rounds.get("single_partner") else {}
    note = rounds_note(rounds.get("federated"), single)
    if note:
        lines.append(note)
    privacy = privacy_table(summary)
    if privacy:
        lines.append(privacy)
    return "\n".join(lines)


def improved_cell(comparison: dict | None) -> str:
    if not comparison:
        return "n/a"
    return f"{round(comparison['improved_share'] * comparison['tasks'])}/{comparison['tasks']}"


def p_value_cell(comparison: dict | None) -> str:
    if not comparison or comparison.get("wilcoxon_p") is None:
        return "n/a"
    return f"{comparison['wilcoxon_p']:.2g}"


def plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (site, entry) in enumerate(summary["sites"].items()):
        color = f"C{index}"
        # Round 0 is the untrained model; plot from the first aggregated round on.
        federated = entry.get("federated_curve_auc_pr", [])[1:]
        ax.plot(range(1, len(federated) + 1), federated, color=color, marker="o", ms=3, label=f"{site} federated")
        single = entry.get("single_partner_curve_auc_pr", [])[1:]
        if single:
            ax.plot(range(1, len(single) + 1), single, color=color, ls="--", label=f"{site} single-partner")
    ax.set_xlabel("round")
    ax.set_ylabel("mean AUC-PR (test fold)")
    ax.set_title("Per-round mean AUC-PR per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PER_TASK_PLOT = "per_task_auc_pr.png"


def plot_per_task(summary: dict, path: Path) -> bool:
    """Per partner, each task's single-partner vs federated AUC-PR, and the mean delta by task size; False when
    no site has a per-task comparison (no baseline)."""
    compared = {site: entry["per_task"] for site, entry in summary["sites"].items() if entry.get("per_task")}
    if not compared:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(compared) + 1, figsize=(3.3 * (len(compared) + 1), 3.6), squeeze=False)
    for index, (site, comparison) in enumerate(compared.items()):
        ax, pairs = axes[0][index], comparison["auc_pr_pairs"]
        ax.scatter(pairs["single_partner"], pairs["federated"], s=6, alpha=0.5, color=f"C{index}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="single-partner AUC-PR", aspect="equal")
        ax.set_title(f"{site}: {comparison['improved_share']:.0%} of {comparison['tasks']} tasks improved", fontsize=8)
        if index == 0:
            ax.set_ylabel("federated AUC-PR")
    ax = axes[0][-1]
    for index, (site, comparison) in enumerate(compared.items()):
        quartiles = comparison.get("by_train_labels", [])
        sizes = [float(np.mean(q["train_labels"])) for q in quartiles]
        ax.plot(sizes, [q["mean_delta_auc_pr"] for q in quartiles], marker="o", color=f"C{index}", label=site)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="training labels per task (quartiles)", ylabel="mean AUC-PR delta (MP - SP)")
    ax.set_title("delta by task size", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_multitask_report(workspace: str | Path, folders: list) -> tuple[dict, str]:
    """``WORKSPACE/report/`` of a multi-task run beside its single-partner baseline folder (at most one)."""
    out = Path(workspace) / "report"
    if len(folders) > 1:
        raise InputError("a multi-task run takes one --baseline (the single-partner folder).")
    summary = build_summary(workspace, folders[0] if folders else None)
    table = format_table(summary)
    write_report_files(
        out,
        summary,
        table,
        plot_curves,
        "auc_pr_per_round.png",
        "# Multi-task federated run\n\n"
        "Mean over each site's tasks that pass the evaluation quorum, on the site's test fold; the federated\n"
        "model is the final global trunk with the site's own head.",
    )
    if plot_per_task(summary, out / PER_TASK_PLOT):
        with open(out / "report.md", "a") as report:
            report.write(
                f"\n![per-task AUC-PR, single-partner vs federated, and delta by task size]({PER_TASK_PLOT})\n"
            )
    return summary, table
