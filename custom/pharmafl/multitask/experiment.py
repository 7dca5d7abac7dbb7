"""The multi-task comparison over seeds: the federated job and the single-partner baseline, once per seed.

Each seed fixes everything random on both sides (the server's initial trunk, every partner's head, batches and
dropout). Each figure is reported as mean and standard deviation over the seeds. Each partner's paired test runs
over its tasks on the seed-averaged per-task AUC-PR, as MELLODDY compared multi- and single-partner models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pharmafl.core.errors import InputError
from pharmafl.core.metrics import mean_std
from pharmafl.core.outputs import check_output, staged_output
from pharmafl.core.report import site_metrics
from pharmafl.jobs import num_rounds, prepared_sites
from pharmafl.jobs.export import JobOptions, export_run_job
from pharmafl.jobs.simulate import run_simulator
from pharmafl.multitask.baseline import job_train_config, run_single_partner
from pharmafl.multitask.report import (
    build_summary,
    improved_cell,
    p_value_cell,
    per_task_comparison,
    regression_comparison,
)

EXPERIMENT = "experiment chem"
CONFORMAL_LEVELS = ("0.8", "0.9")


def run_chem_experiment(
    data_dir: str | Path,
    out_dir: str | Path,
    job_dir: str | Path,
    seeds: int = 3,
    rounds: int | None = None,
    baseline_rounds: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
    overrides: dict | None = None,
    baseline_overrides: dict | None = None,
) -> dict:
    """Federated and single-partner runs for seeds 0..seeds-1 under ``out_dir``; returns (and writes) the summary.

    ``overrides``: executor arguments changed for both sides (the baseline reads them from the job copy);
    ``baseline_overrides``: training settings of the single-partner side only (its own validation-fold winner)."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    if any(name.rpartition(".")[2] == "seed" for name in baseline_overrides or {}):
        raise InputError("--baseline-set cannot set the seed: each seed of the experiment sets it on both sides.")
    try:  # an unknown or mistyped setting stops here, before any run
        job_train_config(job_dir, baseline_overrides)
    except InputError as err:
        raise InputError(f"--baseline-set: {err}") from None
    sites = prepared_sites(data_dir)
    check_output(out_dir, (EXPERIMENT,), overwrite, "--out", reads=[data_dir, job_dir])
    with staged_output(out_dir, EXPERIMENT) as out:
        per_seed = []
        for seed in range(seeds):
            folder = out / f"seed-{seed}"
            # the seed fixes the server's initial trunk and every site's training (the job builder passes it to both)
            seeded = {**(overrides or {}), "training.seed": seed}
            job = export_run_job(job_dir, folder, JobOptions(rounds, len(sites), seeded))  # the baseline reads it
            progress(f"seed {seed}: federated run")
            run_simulator(job_dir, data_dir, folder / "federated", rounds, executor_overrides=seeded, quiet=True)
            progress(f"seed {seed}: single-partner baseline")
            job_rounds = num_rounds(job)
            run_single_partner(
                data_dir,
                folder / "single_partner",
                job,
                baseline_rounds or job_rounds,
                lambda _m: None,
                {**(baseline_overrides or {}), "seed": seed},
            )
            per_seed.append(seed_summary(folder))
        result = combine_seeds(per_seed)
        result["rounds"] = per_seed[0]["rounds"]
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(f"# Multi-task comparison over {seeds} seeds\n\n{format_seeds_table(result)}\n")
    return result


def seed_summary(folder: Path) -> dict:
    """One seed's report summary (``<folder>/federated`` against ``<folder>/single_partner``) with both sides'
    per-task classification and regression results, as ``combine_seeds`` takes them."""
    summary = build_summary(folder / "federated", folder / "single_partner")
    run_dir = Path(summary["run_dir"])
    federated = {site: site_metrics(run_dir, site) or {} for site in summary["sites"]}
    single = json.loads((folder / "single_partner" / "summary.json").read_text())["sites"]
    summary["per_task_federated"] = {site: result.get("per_task", {}) for site, result in federated.items()}
    summary["per_task_single"] = {site: result.get("per_task", {}) for site, result in single.items()}
    summary["regression_federated"] = {
        site: (result.get("regression") or {}).get("per_task", {}) for site, result in federated.items()
    }
    summary["regression_single"] = {
        site: (result.get("regression") or {}).get("per_task", {}) for site, result in single.items()
    }
    return summary


def combine_seeds(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of each partner's AUC-PR (federated, single-partner, delta), and the paired test
    over its tasks on the seed-averaged per-task AUC-PR."""
    sites = sorted(set.intersection(*(set(s["sites"]) for s in per_seed)))
    combined = {}
    for site in sites:
        federated = [s["sites"][site]["federated"]["auc_pr"] for s in per_seed]
        single = [s["sites"][site].get("single_partner", {}).get("auc_pr", math.nan) for s in per_seed]
        delta = np.subtract(federated, single)
        combined[site] = {
            "federated_auc_pr": mean_std(federated),
            "single_partner_auc_pr": mean_std(single),
            "delta_auc_pr": mean_std(delta),
            "per_task": per_task_comparison(
                _seed_mean([s["per_task_federated"].get(site, {}) for s in per_seed]),
                _seed_mean([s["per_task_single"].get(site, {}) for s in per_seed]),
            ),
        }
        regression = [s["sites"][site].get("regression") for s in per_seed]
        if all(regression):  # the regression head's R² and RMSE, MP - SP, when the runs trained one
            combined[site]["regression"] = {
                "delta_r2": mean_std([r["mean_delta"]["r2"] for r in regression]),
                "delta_rmse": mean_std([r["mean_delta"]["rmse"] for r in regression]),
                "federated_r2": mean_std([r["federated"]["r2"] for r in regression]),
                "single_partner_r2": mean_std([r["single_partner"]["r2"] for r in regression]),
                "per_task": regression_comparison(
                    {"per_task": _seed_mean([s["regression_federated"].get(site, {}) for s in per_seed])},
                    {"per_task": _seed_mean([s["regression_single"].get(site, {}) for s in per_seed])},
                ),
            }
        conformal = [s["sites"][site].get("conformal") for s in per_seed]
        if all(conformal):
            combined[site]["conformal"] = {
                side: {
                    level: {
                        metric: float(np.mean([c[side][level][metric] for c in conformal]))
                        for metric in ("efficiency", "validity")
                    }
                    for level in CONFORMAL_LEVELS
                }
                for side in ("federated", "single_partner")
                if all(c.get(side) for c in conformal)
            }
    deltas = [entry["delta_auc_pr"]["mean"] for entry in combined.values()]
    p_values = [(entry["per_task"] or {}).get("wilcoxon_p") for entry in combined.values()]
    return {
        "seeds": len(per_seed),
        "sites": combined,
        "federated_beats_single_partner_everywhere": bool(deltas and min(deltas) > 0),
        "significant_everywhere": bool(p_values and all(p is not None and p < 0.05 for p in p_values)),
    }


def _seed_mean(per_task_by_seed: list[dict]) -> dict:
    """Per task, the mean over seeds of each metric (tasks scored under every seed)."""
    tasks = set.intersection(*(set(p) for p in per_task_by_seed)) if per_task_by_seed else set()
    return {
        task: {
            name: float(np.mean([p[task][name] for p in per_task_by_seed]))
            for name in per_task_by_seed[0][task]
            if all(isinstance(p[task].get(name), int | float) for p in per_task_by_seed)
        }
        for task in tasks
    }


def format_seeds_table(result: dict) -> str:
    lines = [
        f"| site | federated AUC-PR | single-partner AUC-PR | delta (mean ± std over {result['seeds']} seeds) "
        "| tasks improved | p (Wilcoxon, seed-averaged tasks) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for site, entry in result["sites"].items():
        lines.append(
            f"| {site} | {_fmt(entry['federated_auc_pr'])} | {_fmt(entry['single_partner_auc_pr'])} | "
            f"{entry['delta_auc_pr']['mean']:+.4f} ± {entry['delta_auc_pr']['std']:.4f} | "
            f"{improved_cell(entry['per_task'])} | {p_value_cell(entry['per_task'])} |"
        )
    conformal = {site: entry["conformal"] for site, entry in result["sites"].items() if entry.get("conformal")}
    if conformal:
        lines += [
            "\nConformal efficiency (share of single-label sets) and validity, test fold, calibrated on the "
            "validation fold, mean over seeds:\n",
            "| site | confidence | federated efficiency | single-partner efficiency | federated validity "
            "| single-partner validity |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for site, sides in conformal.items():
            for level in CONFORMAL_LEVELS:
                mp, sp = sides.get("federated", {}).get(level), sides.get("single_partner", {}).get(level)
                if mp and sp:
                    lines.append(
                        f"| {site} | {level} | {mp['efficiency']:.4f} | {sp['efficiency']:.4f} | "
                        f"{mp['validity']:.4f} | {sp['validity']:.4f} |"
                    )
    regression = {site: entry["regression"] for site, entry in result["sites"].items() if entry.get("regression")}
    if regression:
        lines += [
            "\nRegression head (measured values in the test fold), mean ± std over seeds; tasks improved and p on "
            "the seed-averaged per-task R²:\n",
            "| site | tasks | federated R² | single-partner R² | delta R² | delta RMSE | tasks improved "
            "| p (Wilcoxon) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for site, entry in regression.items():
            lines.append(
                f"| {site} | {(entry['per_task'] or {}).get('tasks', 0)} | {_fmt(entry['federated_r2'])} | "
                f"{_fmt(entry['single_partner_r2'])} | "
                f"{entry['delta_r2']['mean']:+.4f} ± {entry['delta_r2']['std']:.4f} | "
                f"{entry['delta_rmse']['mean']:+.4f} ± {entry['delta_rmse']['std']:.4f} | "
                f"{improved_cell(entry['per_task'])} | {p_value_cell(entry['per_task'])} |"
            )
    above = "yes" if result["federated_beats_single_partner_everywhere"] else "no"
    significant = "yes" if result["significant_everywhere"] else "no"
    lines.append(
        f"\nFederated above single-partner at every site: {above}; per-task test p < 0.05 at every site: {significant}"
    )
    return "\n".join(lines)


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"
