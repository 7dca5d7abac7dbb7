"""The report of an eICU run: per site, the federated model beside each site alone, centralized and APACHE IVa.

All four are scored on the same test stays of each site; APACHE IVa only has a prediction for some of them, so
each method is also scored on exactly those (``on_apache_stays``), and that is the comparison with APACHE IVa.
Fairness: the worst site's AUROC and the spread (max - min) across sites. Every site also reports, per method,
its predicted-risk histogram of deaths and survivors (``score_histogram``: counts per bin): summed over
sites they give the pooled ROC and calibration curves (``roc.png``, ``calibration.png``) and the pooled AUROC and
AUPRC of all test stays, which is the only ranking metric most hospitals of the hospital-level run have (a
hospital's test split rarely holds a death). There, the spread across hospitals is their Brier scores' (median
and worst decile) and the AUROC of the hospitals where it is defined.

A run whose sites standardised with the federated statistics (``--set statistics=...``) also gets the statistics
run's per-site feature-distribution figure (``feature_distributions.png``) and its summary.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from pharmafl.clinical.prepare import feature_names
from pharmafl.clinical.statistics import distribution_figure, read_statistics, statistics_summary
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
        histograms = {"federated": metrics.get("histogram"), "apache": metrics["apache"].get("histogram")}
        for mode, baseline in baselines.items():
            theirs = baseline["sites"].get(site)
            if theirs is not None:
                entry[mode] = _pick(theirs)
                entry["on_apache_stays"][mode] = _pick(theirs["on_apache_stays"])
                histograms[mode] = theirs.get("histogram")
        entry["histograms"] = {m: h for m, h in histograms.items() if h}
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
    return {
        "sites": sites,
        "fairness": fairness,
        "pooled": pooled_scores(sites),
        "across_sites": spread_across_sites(sites),
        "baselines": {m: b["rounds"] for m, b in baselines.items()},
    }


def _sum_histograms(histograms: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.sum([np.asarray(h[k], dtype=float) for h in histograms], axis=0) for k in ("deaths", "survivors")}


def histogram_curves(histogram: dict) -> dict:
    """ROC points, AUROC, AUPRC and the 10-bin calibration curve of a predicted-risk histogram (stays in one bin
    are tied: half-credit in AUROC, one threshold in AUPRC)."""
    deaths, survivors = (np.asarray(histogram[k], dtype=float) for k in ("deaths", "survivors"))
    bins = len(deaths)
    tp, fp = np.cumsum(deaths[::-1]), np.cumsum(survivors[::-1])  # thresholds from the highest risk down
    P, N = tp[-1], fp[-1]
    curves: dict = {"stays": int(P + N), "deaths": int(P)}
    if P > 0 and N > 0:
        tpr, fpr = np.concatenate([[0.0], tp / P]), np.concatenate([[0.0], fp / N])
        precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
        curves.update(
            fpr=fpr.tolist(),
            tpr=tpr.tolist(),
            auroc=float(np.trapezoid(tpr, fpr)),
            auprc=float(np.sum(np.diff(tpr) * precision)),
        )
    centres = (np.arange(bins) + 0.5) / bins
    groups = np.arange(bins) * 10 // bins
    stays = np.bincount(groups, deaths + survivors, 10)
    predicted = np.bincount(groups, (deaths + survivors) * centres, 10)
    observed = np.bincount(groups, deaths, 10)
    filled = stays > 0
    curves["calibration"] = {
        "predicted": (predicted[filled] / stays[filled]).tolist(),
        "observed": (observed[filled] / stays[filled]).tolist(),
        "stays": stays[filled].astype(int).tolist(),
    }
    curves["ece"] = float(np.sum(np.abs(observed - predicted)) / max(P + N, 1))
    return curves


def pooled_scores(sites: dict) -> dict:
    """Per method, AUROC, AUPRC and ECE of every site's test stays pooled (APACHE IVa: its stays)."""
    pooled = {}
    for method, histogram in _sum_by_method(sites.values()).items():
        if all(method in s.get("histograms", {}) for s in sites.values()):  # every site's test stays, or none
            curves = histogram_curves(histogram)
            pooled[method] = {k: curves.get(k) for k in ("auroc", "auprc", "ece", "stays", "deaths")}
    return pooled


def spread_across_sites(sites: dict) -> dict:
    """Per method, the sites' Brier scores (median, worst decile: the mean of the 10% highest) and the AUROC of the
    sites where it is defined (how many, median, worst decile: the mean of the 10% lowest)."""
    out = {}
    for method in METHODS:
        briers = np.array([s[method]["brier"] for s in sites.values() if method in s], dtype=float)
        aurocs = np.array([s[method]["auroc"] for s in sites.values() if method in s], dtype=float)
        briers, aurocs = briers[np.isfinite(briers)], aurocs[np.isfinite(aurocs)]
        if not len(briers):
            continue
        decile = max(1, int(np.ceil(len(briers) / 10)))
        entry = {
            "sites": int(len(briers)),
            "brier_median": float(np.median(briers)),
            "brier_worst_decile": float(np.sort(briers)[-decile:].mean()),
            "auroc_defined_sites": int(len(aurocs)),
        }
        if len(aurocs):
            worst = max(1, int(np.ceil(len(aurocs) / 10)))
            entry.update(
                auroc_median=float(np.median(aurocs)), auroc_worst_decile=float(np.sort(aurocs)[:worst].mean())
            )
        out[method] = entry
    return out


LABELS = {"federated": "federated", "local": "site alone", "centralized": "centralized", "apache": "APACHE IVa"}
COLOURS = {"federated": "tab:blue", "local": "tab:orange", "centralized": "tab:green", "apache": "black"}


def curve_figures(summary: dict, out: Path, most_sites: int = 6) -> list[Path]:
    """``roc.png`` and ``calibration.png``: all test stays pooled, and each site when there are few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = summary["sites"]
    panels = {"all sites pooled": _sum_by_method(sites.values())}
    if len(sites) <= most_sites:
        panels.update({site: entry.get("histograms", {}) for site, entry in sites.items()})
    paths = []
    for kind in ("roc", "calibration"):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False)
        for ax, (title, histograms) in zip(axes[0], panels.items(), strict=True):
            for method in METHODS:
                if method not in histograms:
                    continue
                curves = histogram_curves(histograms[method])
                if kind == "roc" and "auroc" in curves:
                    ax.plot(curves["fpr"], curves["tpr"], color=COLOURS[method],
                            label=f"{LABELS[method]} {curves['auroc']:.3f}")  # fmt: skip
                elif kind == "calibration":
                    cal = curves["calibration"]
                    ax.plot(cal["predicted"], cal["observed"], "o-", ms=3, color=COLOURS[method],
                            label=f"{LABELS[method]} ECE {curves['ece']:.3f}")  # fmt: skip
            ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("false positive rate" if kind == "roc" else "predicted risk", fontsize=8)
            ax.set_ylabel("true positive rate" if kind == "roc" else "observed mortality", fontsize=8)
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "upper left")
            ax.tick_params(labelsize=7)
        fig.suptitle("ROC on the test stays (AUROC)" if kind == "roc" else "Calibration on the test stays (10 bins)",
                     fontsize=10)  # fmt: skip
        fig.tight_layout()
        path = out / f"{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _sum_by_method(entries) -> dict:
    entries = list(entries)
    out = {}
    for method in METHODS:
        histograms = [e["histograms"][method] for e in entries if method in e.get("histograms", {})]
        if histograms:
            out[method] = {k: v.tolist() for k, v in _sum_histograms(histograms).items()}
    return out


def statistics_used(workspace: str | Path) -> str | None:
    """The ``--stats`` file a run's sites standardised with (from a site's job config), or None."""
    for config in sorted(Path(workspace).glob("*/simulate_job/app_*/config/config_fed_client.json")):
        for entry in json.loads(config.read_text()).get("executors", []):
            words = shlex.split(entry.get("executor", {}).get("args", {}).get("task_script_args", ""))
            if "--stats" in words[:-1]:
                return words[words.index("--stats") + 1]
    return None


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
    pooled = " · ".join(f"{m} {v['auroc']:.3f}" for m, v in summary["pooled"].items() if v.get("auroc") is not None)
    lines += ["", f"All test stays pooled, AUROC: {pooled}."]
    spread = summary["across_sites"]
    if spread:
        lines += ["", "| method | sites | Brier median | Brier worst decile | sites with AUROC | AUROC worst decile |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for method, v in spread.items():
            worst_auroc = f"{v['auroc_worst_decile']:.3f}" if "auroc_worst_decile" in v else ""
            lines.append(f"| {method} | {v['sites']} | {v['brier_median']:.4f} | {v['brier_worst_decile']:.4f} | "
                         f"{v['auroc_defined_sites']} | {worst_auroc} |")  # fmt: skip
    return "\n".join(lines)


def write_eicu_report(workspace: str | Path, baselines: list) -> tuple[dict, str]:
    summary = build_eicu_summary(workspace, baselines)
    table = format_eicu_table(summary)
    out = Path(workspace) / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = curve_figures(summary, out)
    used = statistics_used(workspace)
    if used:
        summary["statistics"] = {"file": used}
        try:
            stats = read_statistics(used)
        except InputError as err:  # moved or deleted since the run: the report says so and goes on
            summary["statistics"]["error"] = str(err)
        else:
            summary["statistics"].update(statistics_summary(stats, feature_names()))
            figures.append(distribution_figure(stats, feature_names(), out / "feature_distributions.png"))
    summary["figures"] = [f.name for f in figures]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(f"# eICU in-hospital mortality\n\n{table}\n")
    return summary, table


def write_statistics_report(workspace: str | Path) -> tuple[dict, str]:
    """The report of a federated statistics run: global figures per feature, what each site reported, the figure."""
    stats = read_statistics(workspace)
    summary = statistics_summary(stats, feature_names())
    out = Path(workspace) / "report"
    out.mkdir(parents=True, exist_ok=True)
    figure = distribution_figure(stats, feature_names(), out / "feature_distributions.png")
    summary["figures"] = [figure.name]
    lines = ["| site | training stays | features suppressed (FLARE's minimum count) |", "|---|---:|---:|"]
    for site, entry in summary["sites"].items():
        lines.append(f"| {site} | {entry['stays'] or 0:.0f} | {entry['suppressed_features']} |")
    table = "\n".join(lines)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(f"# eICU federated statistics\n\n{table}\n")
    return summary, table
