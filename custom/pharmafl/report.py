"""Report of a finished multi-task run: summary.json, report.md and per-round plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pharmafl.errors import UserError

CURVE_TAG = "test/auc_pr"


def find_server_run_dir(workspace: str | Path) -> Path:
    """The server's run folder of a simulator workspace or of a downloaded POC/production job result."""
    root = Path(workspace)
    if not root.is_dir():
        raise UserError(f"Workspace '{root}' does not exist.")
    candidates = sorted(root.glob("**/cross_site_val/cross_val_results.json"))
    if not candidates:
        raise UserError(f"'{root}' holds no finished run (no cross_site_val/cross_val_results.json).")
    preferred = [c for c in candidates if "server" in c.parts] or candidates
    return preferred[0].parent.parent


def federated_final(run_dir: Path) -> dict[str, dict]:
    """Each site's final metrics: the last global trunk with the site's own head, on its test fold."""
    results = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    final = {}
    for site, by_model in results.items():
        if by_model:
            final[site] = next(iter(by_model.values()))
    return final


def tensorboard_curves(run_dir: Path, tag: str = CURVE_TAG) -> dict[str, list[float]]:
    """Per-site scalar series streamed to the server's TensorBoard, ordered by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    curves: dict[str, list[float]] = {}
    tb_root = run_dir / "tb_events"
    if not tb_root.is_dir():
        return curves
    for site_dir in sorted(p for p in tb_root.iterdir() if p.is_dir()):
        points: dict[int, float] = {}
        for event_file in sorted(site_dir.glob("events.out.tfevents.*")):
            for event in EventFileLoader(str(event_file)).Load():
                for value in event.summary.value:
                    if value.tag == tag:
                        # The loader migrates simple_value scalars to tensors.
                        scalar = value.simple_value if value.HasField("simple_value") else make_ndarray(value.tensor)
                        points[int(event.step)] = float(scalar)
        if points:
            curves[site_dir.name] = [points[s] for s in sorted(points)]
    return curves


def _pick(metrics: dict) -> dict:
    return {"auc_roc": metrics.get("auc_roc"), "auc_pr": metrics.get("auc_pr")}


def _per_task_delta(federated: dict, single: dict) -> float | None:
    tasks = sorted(set(federated.get("per_task", {})) & set(single.get("per_task", {})))
    if not tasks:
        return None
    return float(np.mean([federated["per_task"][t]["auc_pr"] - single["per_task"][t]["auc_pr"] for t in tasks]))


def build_summary(workspace: str | Path, baseline_dir: str | Path | None = None) -> dict:
    run_dir = find_server_run_dir(workspace)
    final = federated_final(run_dir)
    curves = tensorboard_curves(run_dir)
    baseline = {}
    if baseline_dir is not None:
        path = Path(baseline_dir) / "summary.json"
        if not path.is_file():
            raise UserError(f"No baseline results at '{path}'; run `pharmafl baseline chem` first.")
        baseline = json.loads(path.read_text())["sites"]
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
            entry["mean_per_task_delta_auc_pr"] = _per_task_delta(final[site], single)
        sites[site] = entry
    deltas = [entry["delta"]["auc_pr"] for entry in sites.values() if "delta" in entry]
    summary = {"run_dir": str(run_dir), "sites": sites}
    if deltas:
        summary["federated_beats_single_partner_everywhere"] = bool(len(deltas) == len(sites) and min(deltas) > 0)
    return summary


def format_table(summary: dict) -> str:
    header = (
        "| site | tasks | federated AUC-ROC | federated AUC-PR "
        "| single-partner AUC-ROC | single-partner AUC-PR | delta AUC-PR |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(value) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    for site, entry in summary["sites"].items():
        single = entry.get("single_partner", {})
        delta = entry.get("delta", {}).get("auc_pr")
        lines.append(
            f"| {site} | {entry['tasks_evaluated']} | {fmt(entry['federated']['auc_roc'])} | "
            f"{fmt(entry['federated']['auc_pr'])} | {fmt(single.get('auc_roc'))} | {fmt(single.get('auc_pr'))} | "
            f"{'n/a' if delta is None else f'{delta:+.4f}'} |"
        )
    if "federated_beats_single_partner_everywhere" in summary:
        verdict = "yes" if summary["federated_beats_single_partner_everywhere"] else "no"
        lines.append(f"\nFederated mean AUC-PR above single-partner at every site: {verdict}")
    return "\n".join(lines)


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


def write_report(workspace: str | Path, baseline_dir: str | Path | None = None) -> tuple[dict, str]:
    summary = build_summary(workspace, baseline_dir)
    out = Path(workspace) / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_table(summary)
    plot_curves(summary, out / "auc_pr_per_round.png")
    (out / "report.md").write_text(
        "# Multi-task federated run\n\n"
        "Mean over each site's tasks that pass the evaluation quorum, on the site's test fold; the federated\n"
        "model is the final global trunk with the site's own head.\n\n"
        f"{table}\n\n![per-round AUC-PR](auc_pr_per_round.png)\n"
    )
    return summary, table
