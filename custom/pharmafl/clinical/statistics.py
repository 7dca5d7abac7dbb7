"""The federated statistics of the eICU features: what each site reports, and what the federation does with it.

``jobs/eicu_statistics`` is FLARE's own statistics workflow (``StatisticsController`` and its ``StatsJob``, with
FLARE's minimum-count, min/max-noise and histogram-bin privacy filters at every site). Each site reports, for its
training stays, every feature's count of observed values, sum, mean, standard deviation and a histogram, and
``missing:FEATURE`` (1 when the value is missing), whose mean is the feature's missing rate. A site whose count
for a feature is under the job's ``min_count`` has that feature's statistics removed by FLARE's filter; the global
figures are over the sites that reported it.

The federated training job's sites standardise and impute with the global mean and standard deviation
(``--set statistics=FILE``: FLARE's output file, or the statistics run's workspace), not with their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pharmafl.core.errors import InputError

MISSING = "missing:"  # the prefix of a feature's missing indicator
DATASET = "train"  # the split a site computes its statistics on (never its test stays)
GLOBAL = "Global"  # FLARE's name for the combined figures
OUTPUT = "statistics/eicu_statistics.json"  # FLARE's JSON writer's output, under the server's job folder
STATISTICS = {"count": {}, "sum": {}, "mean": {}, "stddev": {}, "histogram": {"*": {"bins": 10}}}
MIN_COUNT = 10  # FLARE's StatsJob default: a site reports a feature only from 10 observed values


def _run_output(workspace: Path) -> Path | None:
    """FLARE's statistics JSON of a statistics run's simulator workspace (or downloaded result), if it is one."""
    return next((f for f in (workspace / "server" / "simulate_job" / OUTPUT, workspace / OUTPUT) if f.is_file()), None)


def statistics_file(path: str | Path) -> Path:
    """FLARE's statistics JSON at ``path``: the file itself, or a statistics run's simulator workspace."""
    path = Path(path).expanduser()
    found = path if path.is_file() else _run_output(path)
    if found is None:
        raise InputError(f"'{path}' is neither FLARE's statistics JSON nor a statistics run's workspace ({OUTPUT}).")
    return found


def is_statistics_run(workspace: str | Path) -> bool:
    """A simulator workspace (or downloaded result) of ``jobs/eicu_statistics``."""
    return _run_output(Path(workspace)) is not None


def read_statistics(path: str | Path) -> dict:
    """FLARE's statistics output: ``{feature: {statistic: {site or "Global": {dataset: value}}}}``."""
    file = statistics_file(path)
    try:
        stats = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{file} is not JSON ({err.msg}, line {err.lineno}).") from None
    if not isinstance(stats, dict) or not all(isinstance(v, dict) and "count" in v for v in stats.values()):
        raise InputError(f"{file} is not the output of FLARE's statistics workflow.")
    return stats


def global_statistics(stats: dict, features: list[str]) -> dict[str, dict]:
    """``{feature: {"mean", "stddev", "count", "missing_rate", "sites"}}`` over the sites that reported the feature
    (None: no site did).

    Combined from each site's count, mean and standard deviation, not read from FLARE's ``Global`` entry: FLARE's
    minimum-count filter removes a site's mean and sum but keeps its count, so FLARE's global mean divides the
    reporting sites' sum by every site's count (and its standard deviation inherits that mean)."""
    out = {}
    for f in features:
        mean, stddev, count, sites = _pooled(stats, f)
        out[f] = {
            "mean": mean,
            "stddev": stddev,
            "count": count,
            "missing_rate": _pooled(stats, MISSING + f)[0],
            "sites": sites,
        }
    return out


def _pooled(stats: dict, feature: str) -> tuple[float | None, float | None, float, int]:
    """(mean, sample standard deviation, observed values, sites) over the sites that reported ``feature``'s mean."""
    parts = []
    for site in site_names(stats):
        n, m = _site_value(stats, feature, "count", site), _site_value(stats, feature, "mean", site)
        if n and m is not None:
            parts.append((n, m, _site_value(stats, feature, "stddev", site)))
    if not parts:
        return None, None, 0.0, 0
    n, m, s = (np.array([p[i] if p[i] is not None else np.nan for p in parts], dtype=float) for i in range(3))
    total = n.sum()
    mean = float((n * m).sum() / total)
    within = np.nansum(np.where(n > 1, (n - 1) * s**2, 0.0))
    stddev = float(np.sqrt((within + (n * (m - mean) ** 2).sum()) / (total - 1))) if total > 1 else None
    return mean, stddev, float(total), len(parts)


def site_names(stats: dict) -> list[str]:
    names = {site for entry in stats.values() for site in entry.get("count", {}) if site != GLOBAL}
    return sorted(names)


def suppressed(stats: dict, features: list[str]) -> dict[str, list[str]]:
    """Per site, the features FLARE's minimum-count filter removed from what the site reported."""
    return {
        site: [f for f in features if stats.get(f, {}).get("mean", {}).get(site, {}).get(DATASET) is None]
        for site in site_names(stats)
    }


def statistics_summary(stats: dict, features: list[str]) -> dict:
    """What the report says about a statistics run: global figures, per-site counts, suppressed features."""
    removed = suppressed(stats, features)
    return {
        "sites": {
            site: {
                "stays": _site_value(stats, MISSING + features[0], "count", site),
                "suppressed_features": len(removed[site]),
            }
            for site in site_names(stats)
        },
        "global": global_statistics(stats, features),
        "suppressed": {site: names for site, names in removed.items() if names},
    }


def _site_value(stats: dict, feature: str, statistic: str, site: str) -> float | None:
    value = stats.get(feature, {}).get(statistic, {}).get(site, {}).get(DATASET)
    return None if value is None else float(value)


def distribution_figure(stats: dict, features: list[str], path: str | Path, per_row: int = 4) -> Path:
    """Per-site histograms (as densities) of the continuous features (more than two filled bins), and each site's
    missing rate of the most often missing features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = site_names(stats)
    shown = [f for f in features if sum(1 for b in _histogram(stats, f, GLOBAL) if b[2] > 0) > 2][: 4 * per_row - 1]
    overall = global_statistics(stats, features)
    often_missing = sorted(features, key=lambda f: -(overall[f]["missing_rate"] or 0.0))[:20]
    rows = -(-(len(shown) + 1) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.2 * per_row, 2.4 * rows), squeeze=False)
    colours = plt.get_cmap("tab10" if len(sites) <= 10 else "viridis")
    for ax, feature in zip(axes.flat, shown, strict=False):
        for i, site in enumerate(sites if len(sites) <= 10 else []):
            bins = _histogram(stats, feature, site)
            if bins:
                _density(ax, bins, colour=colours(i), label=site)
        _density(ax, _histogram(stats, feature, GLOBAL), colour="black", label="global", width=2.0)
        ax.set_title(feature, fontsize=9)
        ax.tick_params(labelsize=7)
    ax = axes.flat[len(shown)]
    rates = np.array([[_or_nan(_site_value(stats, MISSING + f, "mean", s)) for f in often_missing] for s in sites])
    image = ax.imshow(rates, aspect="auto", vmin=0, vmax=1, cmap="magma_r")
    ax.set_title("missing rate (site x feature)", fontsize=9)
    ax.set_yticks(range(len(sites)) if len(sites) <= 10 else [])
    ax.set_yticklabels(sites if len(sites) <= 10 else [], fontsize=7)
    ax.set_xticks(range(len(often_missing)))
    ax.set_xticklabels(often_missing, rotation=90, fontsize=5)
    fig.colorbar(image, ax=ax)
    if np.isnan(rates).all():  # e.g. sites with fewer stays than FLARE's minimum count
        ax.text(0.5, 0.5, "no site reported a figure:\nFLARE's minimum count removed them all", ha="center",
                va="center", transform=ax.transAxes, fontsize=7)  # fmt: skip
    for extra in list(axes.flat)[len(shown) + 1 :]:
        extra.axis("off")
    if shown:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle("Training-stay feature distributions per site (FLARE federated statistics)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value


def _histogram(stats: dict, feature: str, who: str) -> list:
    return stats.get(feature, {}).get("histogram", {}).get(who, {}).get(DATASET) or []


def _density(ax, bins: list, colour, label: str, width: float = 1.0) -> None:
    lows, highs, counts = (np.array(column, dtype=float) for column in zip(*bins, strict=True))
    total = counts.sum() * (highs - lows)
    density = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    ax.step(lows, density, where="post", color=colour, label=label, linewidth=width)
