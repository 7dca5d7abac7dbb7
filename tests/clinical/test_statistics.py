"""The global figures of FLARE's federated statistics, and the curves of the sites' predicted-risk histograms."""

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pharmafl.clinical.report import histogram_curves
from pharmafl.clinical.statistics import GLOBAL, MISSING, global_statistics, read_statistics, suppressed
from pharmafl.clinical.train import Standardizer, expected_calibration_error, score_histogram
from pharmafl.core.errors import InputError


def _flare_output(sites: dict[str, np.ndarray], min_count: int) -> dict:
    """What FLARE's statistics workflow writes for one feature ``x`` (NaN: missing) at ``sites``: each site's
    count, sum, mean and standard deviation, with its minimum-count filter's removals, and FLARE's Global."""
    stats = {
        "x": {k: {} for k in ("count", "sum", "mean", "stddev")},
        MISSING + "x": {k: {} for k in ("count", "mean")},
    }
    for site, values in sites.items():
        observed = values[~np.isnan(values)]
        stats["x"]["count"][site] = {"train": len(observed)}  # FLARE's filter keeps a suppressed site's count
        stats[MISSING + "x"]["count"][site] = {"train": len(values)}
        stats[MISSING + "x"]["mean"][site] = {"train": float(np.isnan(values).mean())}
        if len(observed) >= min_count:
            stats["x"]["sum"][site] = {"train": float(observed.sum())}
            stats["x"]["mean"][site] = {"train": float(observed.mean())}
            stats["x"]["stddev"][site] = {"train": float(observed.std(ddof=1))}
    reported = [s for s in sites if s in stats["x"]["mean"]]
    total = sum(stats["x"]["count"][s]["train"] for s in sites)
    stats["x"]["mean"][GLOBAL] = {"train": sum(stats["x"]["sum"][s]["train"] for s in reported) / total}
    return stats


def test_the_global_figures_pool_the_reporting_sites_not_flares_biased_global_mean():
    rng = np.random.default_rng(0)
    big = rng.normal(50.0, 10.0, 200)
    big[:20] = np.nan
    small = np.array([90.0, np.nan, 95.0, np.nan, np.nan])  # 2 observed values: under the minimum count
    other = rng.normal(60.0, 5.0, 80)
    stats = _flare_output({"a": big, "b": small, "c": other}, min_count=10)
    figures = global_statistics(stats, ["x"])["x"]
    pooled = np.concatenate([big, other])  # the sites that reported x
    assert figures["sites"] == 2 and figures["count"] == np.sum(~np.isnan(pooled))
    assert np.isclose(figures["mean"], np.nanmean(pooled)) and np.isclose(figures["stddev"], np.nanstd(pooled, ddof=1))
    everyone = np.concatenate([big, small, other])
    assert np.isclose(figures["missing_rate"], np.isnan(everyone).mean())
    # FLARE's own Global mean divides the reporting sites' sum by every site's count: lower than any site's mean
    assert stats["x"]["mean"][GLOBAL]["train"] < figures["mean"] - 0.1
    assert suppressed(stats, ["x"]) == {"a": [], "b": ["x"], "c": []}


def test_a_feature_no_site_reported_falls_back_to_the_sites_own_figures():
    stats = _flare_output({"a": np.array([1.0, np.nan])}, min_count=10)
    figures = global_statistics(stats, ["x", "absent"])
    assert figures["x"]["mean"] is None and figures["absent"]["sites"] == 0
    own = Standardizer(np.array([1.0, 3.0]), np.array([2.0, 4.0]))
    standardizer = Standardizer.from_statistics(figures, ["x", "absent"], own)
    assert np.allclose(standardizer.mean, [1.0, 3.0]) and np.allclose(standardizer.std, [2.0, 4.0])


def test_read_statistics_takes_the_file_or_a_workspace_and_refuses_anything_else(tmp_path):
    stats = _flare_output({"a": np.arange(20.0)}, min_count=10)
    file = tmp_path / "ws" / "server" / "simulate_job" / "statistics" / "eicu_statistics.json"
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps(stats))
    assert read_statistics(tmp_path / "ws") == read_statistics(file) == json.loads(json.dumps(stats))
    with pytest.raises(InputError, match="neither FLARE's statistics JSON nor"):
        read_statistics(tmp_path / "nothing")
    (tmp_path / "other.json").write_text(json.dumps({"x": [1, 2]}))
    with pytest.raises(InputError, match="not the output of FLARE's statistics workflow"):
        read_statistics(tmp_path / "other.json")


def test_the_risk_histogram_gives_the_exact_curves_up_to_its_bins():
    rng = np.random.default_rng(1)
    y = (rng.random(3000) < 0.1).astype(int)
    p = np.clip(rng.beta(2, 8, 3000) + 0.25 * y, 0.0, 1.0)
    histogram = score_histogram(y, p)
    assert sum(histogram["deaths"]) == y.sum() and sum(histogram["survivors"]) == (1 - y).sum()
    curves = histogram_curves(histogram)
    assert abs(curves["auroc"] - roc_auc_score(y, p)) < 0.003
    assert abs(curves["auprc"] - average_precision_score(y, p)) < 0.01
    assert abs(curves["ece"] - expected_calibration_error(y, p)) < 0.01
    assert curves["fpr"][0] == curves["tpr"][0] == 0.0 and curves["fpr"][-1] == curves["tpr"][-1] == 1.0
    assert sum(curves["calibration"]["stays"]) == len(y)
    one_class = histogram_curves(score_histogram(np.zeros(5, dtype=int), np.full(5, 0.2)))
    assert "auroc" not in one_class and one_class["stays"] == 5  # no ranking metric without a death


def test_the_distribution_figure_says_so_when_the_minimum_count_removed_every_figure(tmp_path):
    from pharmafl.clinical.statistics import distribution_figure, global_statistics

    stats = _flare_output({"a": np.array([1.0, 2.0, np.nan]), "b": np.array([3.0, np.nan])}, min_count=10)
    for site in ("a", "b"):  # FLARE's filter also removes the missing rate of a site under the minimum count
        del stats[MISSING + "x"]["mean"][site]
    assert global_statistics(stats, ["x"])["x"]["sites"] == 0
    path = distribution_figure(stats, ["x"], tmp_path / "feature_distributions.png")
    assert path.stat().st_size > 1000
