"""The eICU mortality job in the real FLARE simulator: the Client API script at 2 region sites, 2 rounds."""

import json
import shutil

import pytest
import torch

from pharmafl.clinical.mortality import main as train_alone
from pharmafl.clinical.train import MortalityNet, n_inputs
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
def fedprox_run(two_regions, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("eicu_sim") / "workspace"
    overrides = {"fedprox_mu": 0.01, "weighting": "uniform"}
    result = run_simulator("eicu_fedavg", two_regions, workspace, rounds=2, executor_overrides=overrides, quiet=True)
    return result, workspace


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
        assert entry["executor"]["args"]["task_script_args"].split() == [
            "--fedprox-mu",
            "0.01",
            "--weighting",
            "uniform",
        ]
    log = (workspace / "simulate.log").read_text()
    assert "Round 1 started" in log and "Round 2 started" not in log


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


def test_the_experiment_runs_every_method_per_seed(eicu_dir, tmp_path):
    from pharmafl.clinical.experiment import run_eicu_experiment

    combined = run_eicu_experiment(eicu_dir, tmp_path / "exp", seeds=1, rounds=1, progress=lambda _m: None)
    assert sorted(combined["sites"]) == ["midwest", "northeast", "south", "west"]
    for entry in combined["sites"].values():
        assert {"federated", "local", "centralized", "apache"} <= set(entry)
        assert entry["federated"]["auroc"]["n"] == 1
    assert (tmp_path / "exp" / "seed-0" / "summary.json").is_file()
    assert (tmp_path / "exp" / "report.md").is_file()
