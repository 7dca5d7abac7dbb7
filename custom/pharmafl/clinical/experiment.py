"""``pharmafl experiment eicu``: the federated job, each site alone, centralized and APACHE IVa, over seeds.

Seed S draws its own stratified splits (``prepare eicu --seed S``) and its own initial model and batches, on both
the federated and the baseline sides; every method is scored on the same test stays of the same seed. Per seed,
FLARE's federated statistics job runs first on the training stays, and the federated sites standardise with its
global figures (``statistics=``; ``--set statistics=`` with no value: each site its own). The table is mean ± std
over seeds per site, and the worst site's AUROC.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from pharmafl.clinical.baseline import run_eicu_baseline
from pharmafl.clinical.prepare import EicuConfig, prepare_eicu
from pharmafl.clinical.report import METHODS, build_eicu_summary, write_statistics_report
from pharmafl.core.errors import InputError
from pharmafl.core.metrics import mean_std
from pharmafl.core.outputs import check_output, staged_output
from pharmafl.core.paths import job_dir
from pharmafl.jobs.simulate import run_simulator

EXPERIMENT = "experiment eicu"
JOB, STATISTICS_JOB = "eicu_fedavg", "eicu_statistics"


def run_eicu_experiment(
    tables: str | Path,
    out_dir: str | Path,
    seeds: int = 5,
    sites: str = "region",
    rounds: int | None = None,
    threads: int | None = None,
    overrides: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Seeds 0..seeds-1 under ``out_dir/seed-S``; writes and returns the combined summary."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    check_output(out_dir, (EXPERIMENT,), overwrite, "--out", reads=[tables])
    with staged_output(out_dir, EXPERIMENT) as out:
        per_seed = []
        for seed in range(seeds):
            folder = out / f"seed-{seed}"
            data = folder / "data"
            prepare_eicu(tables, data, EicuConfig(sites=sites, seed=seed), say=lambda _line: None)
            settings = {**(overrides or {}), "seed": seed}
            if "statistics" not in settings:
                progress(f"seed {seed}: federated statistics")
                run_simulator(STATISTICS_JOB, data, folder / "statistics", threads=threads, quiet=True)
                write_statistics_report(folder / "statistics")  # its feature_distributions.png
                # relative to the data root, where the sites look for it: the path survives the staged output's move
                settings["statistics"] = os.path.relpath(folder / "statistics", data)
            progress(f"seed {seed}: federated run")
            result = run_simulator(
                JOB, data, folder / "federated", rounds, threads, executor_overrides=settings, quiet=True
            )
            progress(f"seed {seed}: baselines ({result['wall_s']:.0f} s federated)")
            # their own standardisers; and no DP: with --set dp.* the baselines stay the non-private references
            baseline_settings = {k: v for k, v in settings.items() if k != "statistics" and not k.startswith("dp.")}
            for mode in ("local", "centralized"):  # as many rounds x local epochs as the federation
                run_eicu_baseline(data, folder / mode, job_dir(JOB), mode, rounds, baseline_settings)
            summary = build_eicu_summary(folder / "federated", [folder / "local", folder / "centralized"])
            summary["federated_wall_s"] = result["wall_s"]
            (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            per_seed.append(summary)
        combined = combine_seeds(per_seed)
        combined["settings"] = {"sites": sites, "rounds": rounds, "overrides": overrides or {}}
        (out / "summary.json").write_text(json.dumps(combined, indent=2) + "\n")
        (out / "report.md").write_text(f"# eICU mortality over {seeds} seeds\n\n{format_seeds_table(combined)}\n")
    return combined


def combine_seeds(per_seed: list[dict]) -> dict:
    """Mean ± std over seeds of each site's AUROC/AUPRC per method, on all test stays and on APACHE's stays."""
    sites = sorted(set.intersection(*(set(s["sites"]) for s in per_seed)))
    combined: dict = {"seeds": len(per_seed), "sites": {}, "worst_site_auroc": {}, "wall_s": []}
    for site in sites:
        entry: dict = {}
        for method in METHODS:
            runs = [s["sites"][site].get(method) for s in per_seed]
            if all(runs):
                entry[method] = {m: mean_std([r[m] for r in runs]) for m in ("auroc", "auprc", "brier", "ece")}
        for method in ("federated", "local", "centralized"):
            runs = [s["sites"][site]["on_apache_stays"].get(method) for s in per_seed]
            if all(runs):
                entry.setdefault("on_apache_stays", {})[method] = mean_std([r["auroc"] for r in runs])
        entry["federated_minus_local_auroc"] = mean_std(
            [s["sites"][site]["federated"]["auroc"] - s["sites"][site]["local"]["auroc"] for s in per_seed]
        )
        entry["federated_minus_centralized_auroc"] = mean_std(
            [s["sites"][site]["federated"]["auroc"] - s["sites"][site]["centralized"]["auroc"] for s in per_seed]
        )
        combined["sites"][site] = entry
    for method in METHODS:
        combined["worst_site_auroc"][method] = mean_std(
            [s["fairness"][method]["worst_site_auroc"] for s in per_seed if method in s["fairness"]]
        )
    for method in METHODS:  # every site's test stays pooled (a seed's ``pooled``)
        runs = [s["pooled"][method] for s in per_seed if method in s.get("pooled", {})]
        if runs:
            combined.setdefault("pooled", {})[method] = {
                m: mean_std([r[m] for r in runs]) for m in ("auroc", "auprc", "ece")
            }
    combined["wall_s"] = [s.get("federated_wall_s") for s in per_seed]
    return combined


def format_seeds_table(combined: dict) -> str:
    def cell(value: dict | None) -> str:
        return f"{value['mean']:.3f} ± {value['std']:.3f}" if value else ""

    lines = [
        "| site | federated AUROC | local AUROC | centralized AUROC | APACHE IVa AUROC | federated on APACHE's stays | "
        "fed - local | fed - centralized |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for site, entry in combined["sites"].items():
        lines.append(
            f"| {site} | {cell(entry['federated']['auroc'])} | {cell(entry['local']['auroc'])} | "
            f"{cell(entry['centralized']['auroc'])} | {cell(entry['apache']['auroc'])} | "
            f"{cell(entry['on_apache_stays']['federated'])} | {cell(entry['federated_minus_local_auroc'])} | "
            f"{cell(entry['federated_minus_centralized_auroc'])} |"
        )
    worst = " · ".join(f"{m} {cell(v)}" for m, v in combined["worst_site_auroc"].items() if v.get("n"))
    lines += ["", f"Worst-site AUROC over {combined['seeds']} seeds: {worst}."]
    pooled = " · ".join(f"{m} {cell(v['auroc'])}" for m, v in combined.get("pooled", {}).items())
    if pooled:
        lines += ["", f"All test stays pooled, AUROC: {pooled}."]
    return "\n".join(lines)
