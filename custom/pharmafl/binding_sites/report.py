"""The ESM-2 LoRA binding-site report: token metrics of the federated model beside the baselines, per round."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pharmafl.core.errors import InputError
from pharmafl.core.report import (
    federated_final,
    federated_rounds,
    find_server_run_dir,
    rounds_note,
    tensorboard_curves,
    write_report_files,
)
from pharmafl.privacy.report import privacy_table, site_privacy

ESM_METRICS = ("accuracy", "precision", "recall", "f1", "mcc", "auc_roc")


ESM_PLOTTED = ("accuracy", "f1", "precision", "recall")


def is_esm_run(run_dir: Path) -> bool:
    """An ESM-2 LoRA run's validation results carry a ``common`` (common test set) entry per site."""
    return any("common" in metrics for metrics in federated_final(run_dir).values())


def _esm_pick(metrics: dict) -> dict:
    return {name: metrics.get(name) for name in ESM_METRICS}


def _load_baseline(folder: str | Path) -> dict:
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise InputError(f"No baseline results at '{path}'; run `pharmafl baseline esm` first.")
    baseline = json.loads(path.read_text())
    if baseline.get("mode") not in ("centralized", "local"):
        raise InputError(f"'{path}' is not an ESM baseline (`pharmafl baseline esm`).")
    return baseline


def build_esm_summary(workspace: str | Path, baseline_dirs: list) -> dict:
    """Final and per-round token metrics of the federated model per site, beside the ESM baselines.

    Per site: ``federated`` (the final global adapter and head on the site's own test set), ``federated_common``
    (on the common test set), the same for each baseline mode given, their F1 differences, and ``curves``: per
    metric the per-round values on the site's test set (index r = the model after r rounds, 0 = before training).
    """
    run_dir = find_server_run_dir(workspace)
    final = federated_final(run_dir)
    baselines = [_load_baseline(folder) for folder in baseline_dirs]
    curves = {name: tensorboard_curves(run_dir, f"test/{name}") for name in ESM_PLOTTED}
    sites = {}
    for site in sorted(final):
        entry = {
            "federated": _esm_pick(final[site]["site"]),
            "federated_common": _esm_pick(final[site]["common"]),
            "curves": {"federated": {name: curves[name].get(site, []) for name in ESM_PLOTTED}},
        }
        for baseline in baselines:
            mode = baseline["mode"]
            if site not in baseline["sites"]:
                continue
            result = baseline["sites"][site]
            entry[mode] = _esm_pick(result["site"])
            entry[f"{mode}_common"] = _esm_pick(result["common"])
            entry[f"f1_minus_{mode}"] = entry["federated"]["f1"] - entry[mode]["f1"]
            entry[f"f1_minus_{mode}_common"] = entry["federated_common"]["f1"] - entry[f"{mode}_common"]["f1"]
            entry["curves"][mode] = {
                name: [point["site"][name] for point in result.get("curve", [])] for name in ESM_PLOTTED
            }
        privacy = site_privacy(run_dir, site)
        if privacy:
            entry["privacy"] = privacy
        sites[site] = entry
    return {
        "kind": "esm_lora",
        "run_dir": str(run_dir),
        "rounds": federated_rounds(run_dir),
        "baselines": {
            baseline["mode"]: {"steps": baseline["steps"], "rounds": baseline["rounds"]} for baseline in baselines
        },
        "sites": sites,
    }


def format_esm_table(summary: dict) -> str:
    modes = [mode for mode in ("centralized", "local") if mode in summary["baselines"]]
    header = "| site | test set | model | " + " | ".join(ESM_METRICS) + " |"
    lines = [header, "|---|---|---|" + "---:|" * len(ESM_METRICS)]

    def fmt(value) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    for site, entry in summary["sites"].items():
        for test_set, suffix in (("own", ""), ("common", "_common")):
            for model in ("federated", *modes):
                if model + suffix in entry:
                    values = entry[model + suffix]
                    lines.append(
                        f"| {site} | {test_set} | {model} | " + " | ".join(fmt(values[m]) for m in ESM_METRICS) + " |"
                    )
    for mode in modes:
        gaps = [entry.get(f"f1_minus_{mode}_common") for entry in summary["sites"].values()]
        gaps = [gap for gap in gaps if gap is not None]
        if gaps:
            lines.append(f"\nF1 federated minus {mode} on the common test set: {min(gaps):+.4f} (worst site)")
    note = rounds_note(summary.get("rounds"), {mode: summary["baselines"][mode]["rounds"] for mode in modes})
    if note:
        lines.append(note)
    privacy = privacy_table(summary)
    if privacy:
        lines.append(privacy)
    return "\n".join(lines)


def plot_esm_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, metric in zip(axes.ravel(), ESM_PLOTTED, strict=True):
        for index, (site, entry) in enumerate(summary["sites"].items()):
            for mode, style in (("federated", "-"), ("centralized", "--"), ("local", ":")):
                values = entry["curves"].get(mode, {}).get(metric, [])
                if values:
                    ax.plot(
                        range(len(values)),
                        values,
                        color=f"C{index}",
                        ls=style,
                        marker="o" if style == "-" else None,
                        ms=3,
                        label=f"{site} {mode}",
                    )
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-round token metrics on each client's test set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_binding_sites_report(workspace: str | Path, baselines: list) -> tuple[dict, str]:
    """``WORKSPACE/report/`` of an ESM-2 LoRA run beside its baselines (centralized and/or local folders)."""
    out = Path(workspace) / "report"
    summary = build_esm_summary(workspace, baselines)
    table = format_esm_table(summary)
    write_report_files(
        out,
        summary,
        table,
        plot_esm_curves,
        "metrics_per_round.png",
        "# ESM-2 LoRA binding-site run\n\n"
        "Token-level metrics over real residues at threshold 0.5; the federated model is the final global adapter\n"
        "and head. Baselines train with the same code and settings for the same total number of steps.",
    )
    return summary, table
