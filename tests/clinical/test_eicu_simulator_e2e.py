"""The eICU jobs in the real FLARE simulator at 2 region sites: FLARE's federated statistics, then the Client API
script for 2 rounds standardising with them. ``experiment eicu`` (statistics, federated run and baselines per seed)
runs in the README smoke test, which checks its summary."""

import json
import shutil

import numpy as np
import pytest
import torch

from pharmafl.clinical.mortality import main as train_alone
from pharmafl.clinical.statistics import MIN_COUNT, global_statistics, read_statistics, suppressed
from pharmafl.clinical.train import MortalityNet, load_site, n_inputs, pooled
from pharmafl.jobs.simulate import run_simulator

pytestmark = pytest.mark.slow
SITES = ["midwest", "south"]


@pytest.fixture(scope="module")
def two_regions(eicu_regions, tmp_path_factory):
    data = tmp_path_factory.mktemp("eicu_two")
    for site in SITES:
        shutil.copytree(eicu_regions / site, data / site)
    return data


@pytest.fixture(scope="module")
def statistics_run(two_regions, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("eicu_stats") / "workspace"
    run_simulator("eicu_statistics", two_regions, workspace, quiet=True)
    return workspace


@pytest.fixture(scope="module")
def fedprox_run(two_regions, statistics_run, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("eicu_sim") / "workspace"
    overrides = {"fedprox_mu": 0.01, "weighting": "uniform", "statistics": str(statistics_run)}
    result = run_simulator("eicu_fedavg", two_regions, workspace, rounds=2, executor_overrides=overrides, quiet=True)
    return result, workspace


def test_flares_statistics_are_the_pooled_training_statistics_and_its_filter_drops_small_counts(
    statistics_run, two_regions
):
    stats = read_statistics(statistics_run)
    sites = [load_site(two_regions / name) for name in SITES]
    features = sites[0].features
    figures = global_statistics(stats, features)
    X, _ = pooled(sites).part("train")
    compared = 0
    for i, feature in enumerate(features):
        observed = {s.name: int(np.sum(~np.isnan(s.part("train")[0][:, i]))) for s in sites}
        assert figures[feature]["sites"] == sum(n >= MIN_COUNT for n in observed.values())  # FLARE's filter
        assert np.isclose(figures[feature]["missing_rate"], np.isnan(X[:, i]).mean(), atol=1e-3)
        if figures[feature]["sites"] == len(sites):
            column = X[:, i][~np.isnan(X[:, i])]
            assert np.isclose(figures[feature]["mean"], column.mean(), rtol=1e-3, atol=1e-3)
            assert np.isclose(figures[feature]["stddev"], column.std(ddof=1), rtol=1e-3, atol=1e-3)
            compared += 1
    assert compared > 60
    removed = suppressed(stats, features)
    for site in sites:
        counts = np.sum(~np.isnan(site.part("train")[0]), axis=0)
        assert removed[site.name] == [f for f, n in zip(features, counts, strict=True) if n < MIN_COUNT]
    assert any(removed.values())  # the demo has features too rare to report at a region


def test_the_statistics_report_draws_each_sites_distributions(statistics_run):
    from pharmafl.report import write_report

    summary, table = write_report(statistics_run)
    assert set(summary["sites"]) == set(SITES) and "| midwest |" in table
    assert summary["global"]["age"]["sites"] == 2 and 0 < summary["global"]["albumin"]["missing_rate"] < 1
    assert (statistics_run / "report" / "feature_distributions.png").stat().st_size > 10_000


def test_every_site_scores_the_final_global_model_and_apache_on_the_same_stays(fedprox_run):
    result, workspace = fedprox_run
    assert result["sites"] == SITES
    results = json.loads((workspace / "server/simulate_job/cross_site_val/cross_val_results.json").read_text())
    assert set(results) == set(SITES)
    for by_model in results.values():
        (metrics,) = by_model.values()
        assert 0.5 < metrics["auroc"] <= 1.0 and 0.0 < metrics["brier"] < 0.25 and 0.0 <= metrics["ece"] < 0.5
        assert metrics["apache"]["stays"] == metrics["on_apache_stays"]["stays"] > 0
        assert metrics["apache"]["auroc"] > 0.7  # APACHE IVa on this site's test stays


def test_the_server_holds_the_scripts_model_and_the_sites_ran_fedprox_uniform(fedprox_run):
    _, workspace = fedprox_run
    saved = torch.load(workspace / "server/simulate_job/app_server/FL_global_model.pt", weights_only=False)
    weights = saved.get("model", saved)
    assert set(weights) == set(MortalityNet(n_inputs()).state_dict())
    for site in SITES:
        client = json.loads((workspace / site / f"simulate_job/app_{site}/config/config_fed_client.json").read_text())
        (entry,) = client["executors"]
        assert entry["executor"]["args"]["task_script_path"] == "mortality_client.py"
        words = entry["executor"]["args"]["task_script_args"].split()
        assert words[:4] == ["--fedprox-mu", "0.01", "--weighting", "uniform"]
        assert words[4] == "--stats" and words[5].endswith("statistics/eicu_statistics.json")
    log = (workspace / "simulate.log").read_text()
    assert "Round 1 started" in log and "Round 2 started" not in log
    for site in SITES:
        assert f"{site}: standardises with the federated statistics" in log


def test_the_same_script_trains_one_site_alone(two_regions, tmp_path, capsys):
    assert train_alone(["--data", str(two_regions / "south"), "--rounds", "2", "--out", str(tmp_path / "alone")]) == 0
    scores = json.loads((tmp_path / "alone" / "scores.json").read_text())
    assert scores["site"] == "south" and 0.5 < scores["test"]["auroc"] <= 1.0
    assert (tmp_path / "alone" / "model.pt").is_file()
    assert train_alone(["--data", str(tmp_path), "--rounds", "1"]) == 2
    assert "run `pharmafl prepare eicu` first" in capsys.readouterr().err


def test_the_report_puts_every_method_on_the_same_test_stays(fedprox_run, two_regions, tmp_path):
    from pharmafl.clinical.baseline import run_eicu_baseline
    from pharmafl.core.paths import job_dir
    from pharmafl.report import write_report

    _, workspace = fedprox_run
    overrides = {"fedprox_mu": 0.01, "weighting": "uniform"}
    for mode in ("local", "centralized"):
        summary = run_eicu_baseline(two_regions, tmp_path / mode, job_dir("eicu_fedavg"), mode, 2, overrides)
        assert summary["rounds"] == 2 and summary["config"]["fedprox_mu"] == 0.01
    report, table = write_report(workspace, [tmp_path / "local", tmp_path / "centralized"])
    assert set(report["sites"]) == set(SITES)
    for entry in report["sites"].values():
        for method in ("federated", "local", "centralized", "apache"):
            assert set(entry[method]) == {"auroc", "auprc", "brier", "ece"}
            assert 0.0 <= entry[method]["auroc"] <= 1.0
        assert entry["test_stays"] > entry["apache_stays"] > 0
        assert set(entry["on_apache_stays"]) == {"federated", "local", "centralized"}
    assert report["fairness"]["federated"]["worst_site_auroc"] == min(
        e["federated"]["auroc"] for e in report["sites"].values()
    )
    assert "| midwest |" in table and (workspace / "report" / "summary.json").is_file()
    # the pooled figures come from the sites' risk histograms: all test stays, every method
    stays = sum(e["test_stays"] for e in report["sites"].values())
    assert report["pooled"]["federated"]["stays"] == report["pooled"]["local"]["stays"] == stays
    assert report["pooled"]["apache"]["stays"] == sum(e["apache_stays"] for e in report["sites"].values())
    assert 0.5 < report["pooled"]["federated"]["auroc"] <= 1.0
    assert report["across_sites"]["federated"]["sites"] == 2
    assert report["statistics"]["global"]["age"]["sites"] == 2  # the statistics the sites standardised with
    for figure in ("roc.png", "calibration.png", "feature_distributions.png"):
        assert figure in report["figures"] and (workspace / "report" / figure).stat().st_size > 10_000


def test_the_membership_audit_scores_the_runs_global_model_as_the_sites_did(fedprox_run, two_regions, tmp_path):
    """The audit loads the run's final global model with the federated statistics the sites standardised with: its
    test AUPRC/AUROC at each site are the ones the site reported for that model in the run."""
    from pharmafl.clinical.audit import CENTRALIZED, LOCAL, audit_eicu
    from pharmafl.core.paths import job_dir
    from pharmafl.privacy.audit import AuditConfig

    _, workspace = fedprox_run
    config = AuditConfig(references=1, bootstrap=10, rounds=2)
    overrides = {"fedprox_mu": 0.01, "weighting": "uniform"}
    summary = audit_eicu(
        two_regions, {"fed": workspace}, tmp_path, job_dir("eicu_fedavg"), config, lambda _: None, True, overrides
    )
    reported = json.loads((workspace / "server/simulate_job/cross_site_val/cross_val_results.json").read_text())
    for site in SITES:
        stays = load_site(two_regions / site)
        entry = summary["sites"][site]
        assert entry["members"] == int((stays.split == "train").sum())
        assert entry["non_members"] == int((stays.split == "test").sum())
        assert set(entry["models"]) == {LOCAL, "fed", CENTRALIZED}
        (metrics,) = reported[site].values()
        fed = entry["models"]["fed"]
        assert fed["auc_pr"] == pytest.approx(metrics["auprc"]) and fed["auc_roc"] == pytest.approx(metrics["auroc"])
        assert fed["epsilon"] is None
        for model in entry["models"].values():
            for attack in ("loss", "rmia"):
                assert 0.0 <= model[attack]["auc"] <= 1.0 and 0.0 <= model[attack]["tpr_at_fpr_0.01"] <= 1.0
    assert (tmp_path / "report.md").read_text().count("| fed |") == len(SITES)
