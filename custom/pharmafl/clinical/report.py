"""The report of an eICU run: per site, the federated model beside each site alone, centralized and APACHE IVa.

All four are scored on the same test stays of each site; APACHE IVa only has a prediction for some of them, so
each method is also scored on exactly those (``on_apache_stays``), and that is the comparison with APACHE IVa.
Fairness: the worst site's AUROC and the spread (max - min) across sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pharmafl.core.errors import InputError
from pharmafl.core.report import federated_final, find_server_run_dir

METRICS = ("auroc", "auprc", "brier", "ece")
METHODS = ("federated", "local", "centralized", "apache")


def is_eicu_run(run_dir: Path) -> bool:
    """An eICU run's validation results carry APACHE IVa's scores per site."""
    return any("apache" in metrics for metrics in federated_final(run_dir).values())


def load_baseline(folder: str | Path) -> dict:
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise InputError(f"No baseline results at '{path}'; run `pharmafl baseline eicu` first.")
    baseline = json.loads(path.read_text())
    if baseline.get("kind") != "eicu" or baseline.get("mode") not in ("local", "centralized"):
        raise InputError(f"'{path}' is not an eICU baseline (`pharmafl baseline eicu`).")
    return baseline


def _pick(metrics: dict) -> dict:
    return {name: metrics.get(name) for name in METRICS}


def build_eicu_summary(workspace: str | Path, baseline_dirs: list) -> dict:
    """``{"sites": {SITE: {"federated", "local", "centralized", "apache": {auroc, auprc, brier, ece}, "test_stays",
    "apache_stays", "on_apache_stays": {method: ...}}}, "fairness": {method: {...}}}``."""
    final = federated_final(find_server_run_dir(workspace))
    baselines = {b["mode"]: b for b in (load_baseline(folder) for folder in baseline_dirs)}
    sites = {}
    for site, metrics in sorted(final.items()):
        entry = {
            "federated": _pick(metrics),
            "apache": _pick(metrics["apache"]),
            "test_stays": metrics["stays"],
            "apache_stays": metrics["apache"]["stays"],
            "on_apache_stays": {"federated": _pick(metrics["on_apache_stays"])},
        }
        for mode, baseline in baselines.items():
            theirs = baseline["sites"].get(site)
            if theirs is not None:
                entry[mode] = _pick(theirs)
                entry["on_apache_stays"][mode] = _pick(theirs["on_apache_stays"])
        sites[site] = entry
    fairness = {}
    for method in METHODS:
        values = [s[method]["auroc"] for s in sites.values() if method in s and s[method]["auroc"] is not None]
        values = [v for v in values if np.isfinite(v)]
        if values:
            fairness[method] = {
                "worst_site_auroc": min(values),
                "auroc_spread": max(values) - min(values),
                "mean_site_auroc": float(np.mean(values)),
            }
    return {"sites": sites, "fairness": fairness, "baselines": {m: b["rounds"] for m, b in baselines.items()}}


def format_eicu_table(summary: dict) -> str:
    methods = [m for m in METHODS if any(m in s for s in summary["sites"].values())]
    head = "| site | test stays | " + " | ".join(f"{m} AUROC" for m in methods) + " | " + " | ".join(
        f"{m} AUPRC" for m in methods
    ) + " |"  # fmt: skip
    lines = [head, "|---|" + "---:|" * (1 + 2 * len(methods))]
    for site, entry in summary["sites"].items():
        cells = [f"{entry[m]['auroc']:.3f}" if m in entry else "" for m in methods]
        cells += [f"{entry[m]['auprc']:.3f}" if m in entry else "" for m in methods]
        lines.append(f"| {site} | {entry['test_stays']} | " + " | ".join(cells) + " |")
    worst = " · ".join(f"{m} {v['worst_site_auroc']:.3f}" for m, v in summary["fairness"].items())
    lines += ["", f"Worst-site AUROC: {worst}. APACHE IVa is scored on the test stays that have its prediction."]
    return "\n".join(lines)


def write_eicu_report(workspace: str | Path, baselines: list) -> tuple[dict, str]:
    summary = build_eicu_summary(workspace, baselines)
    table = format_eicu_table(summary)
    out = Path(workspace) / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(f"# eICU in-hospital mortality\n\n{table}\n")
    return summary, table
