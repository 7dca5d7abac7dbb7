"""End to end in the real FLARE simulator: 2 sites on a ChEMBL subset, 2 rounds."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pharmafl.core.paths import repo_root
from pharmafl.core.report import tensorboard_curves
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.flare.multitask_executor import FINAL_MODEL_FILE, HEAD_FILE
from pharmafl.jobs.simulate import run_simulator
from pharmafl.multitask.baseline import run_single_partner
from pharmafl.report import write_report

pytestmark = pytest.mark.slow
JOB = repo_root() / "jobs" / "multitask_fedavg"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, chembl_small):
    workspace = tmp_path_factory.mktemp("sim") / "workspace"
    result = run_simulator(JOB, chembl_small, workspace, rounds=2, quiet=True)
    return result, workspace


def test_both_sites_report_final_metrics(finished_run):
    result, workspace = finished_run
    assert result["sites"] == ["site-1", "site-2"]
    results = json.loads((workspace / "server/simulate_job/cross_site_val/cross_val_results.json").read_text())
    assert set(results) == {"site-1", "site-2"}
    for by_model in results.values():
        metrics = next(iter(by_model.values()))
        assert metrics["tasks_evaluated"] > 0 and 0.0 < metrics["auc_pr"] <= 1.0


def test_the_head_never_reached_the_server(finished_run):
    _, workspace = finished_run
    server_dir = workspace / "server/simulate_job"
    records = [json.loads(line) for line in (server_dir / CONTRIBUTIONS_LOG).read_text().splitlines()]
    assert len(records) == 2 * 2  # 2 sites x 2 rounds, every one accepted
    assert all(r["accepted"] for r in records)
    assert all(key.startswith("trunk.") for r in records for key in r["keys"])
    global_model = torch.load(server_dir / "app_server/FL_global_model.pt", weights_only=False)
    state = global_model.get("model", global_model)
    assert state and all(key.startswith("trunk.") for key in state)
    for site in ("site-1", "site-2"):  # the heads stayed at home
        site_dir = workspace / site / "simulate_job"
        assert (site_dir / HEAD_FILE).is_file() and (site_dir / FINAL_MODEL_FILE).is_file()


def test_report_compares_with_single_partner(finished_run, chembl_small, tmp_path):
    _, workspace = finished_run
    run_single_partner(chembl_small, tmp_path / "sp", JOB, rounds=2, progress=lambda _: None)
    summary, table = write_report(workspace, tmp_path / "sp")
    for site in ("site-1", "site-2"):
        entry = summary["sites"][site]
        assert entry["tasks_evaluated"] > 0
        assert set(entry["federated"]) == {"auc_roc", "auc_pr"} == set(entry["single_partner"])
        assert len(entry["federated_curve_auc_pr"]) == 3  # rounds 0, 1 and the final model
        assert all(0.0 < value <= 1.0 for value in entry["federated_curve_auc_pr"])
        assert entry["federated_curve_auc_pr"][-1] == pytest.approx(entry["federated"]["auc_pr"], abs=1e-6)
        pairs = entry["per_task"]["auc_pr_pairs"]  # what the per-task scatter plots: one pair per compared task
        assert len(pairs["single_partner"]) == len(pairs["federated"]) == entry["per_task"]["tasks"] > 0
        delta = np.mean(np.array(pairs["federated"]) - np.array(pairs["single_partner"]))
        assert delta == pytest.approx(entry["per_task"]["mean_delta"]["auc_pr"])
    report = workspace / "report"
    for name in ("summary.json", "auc_pr_per_round.png", "per_task_auc_pr.png"):
        assert (report / name).is_file()
    assert "(per_task_auc_pr.png)" in (report / "report.md").read_text()
    assert "site-1" in table


def test_a_site_whose_task_raises_fails_the_run_with_its_error_on_the_console(chembl_small, tmp_path):
    # site-2's fingerprints are damaged after preparation: its train task raises inside FLARE's client runner
    data = tmp_path / "data"
    shutil.copytree(chembl_small, data)
    (data / "site-2" / "X.npz").write_bytes(b"not a sparse matrix")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pharmafl.cli",
            "simulate",
            str(JOB),
            "--data",
            str(data),
            "--workspace",
            str(tmp_path / "ws"),
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout[-3000:], done.stderr)
    assert done.returncode == 2
    assert done.stderr.startswith("pharmafl: error: site-2: ") and "simulate.log" in done.stderr
    assert "ERROR: task failed: site-2 cannot run train" in done.stdout  # on the console as it happened
    assert (tmp_path / "ws" / "simulate.log").is_file()


def test_progress_lines_name_the_site_and_the_loss_reaches_tensorboard(finished_run):
    result, workspace = finished_run
    log = open(result["log"]).read()
    from pharmafl.jobs.simulate import PROGRESS, console_line

    shown = [console_line(line) for line in log.splitlines() if PROGRESS.search(line)]
    for site in ("site-1", "site-2"):
        assert any(line.startswith(f"progress: {site} round 1 step ") and ", loss " in line for line in shown)
    curves = tensorboard_curves(workspace / "server" / "simulate_job", tag="train/loss")
    assert set(curves) == {"site-1", "site-2"} and all(len(c) == 2 and all(v > 0 for v in c) for c in curves.values())


def test_an_experiment_over_seeds_and_the_same_seed_gives_the_same_results(finished_run, chembl_small, tmp_path):
    # seed 0 is the job's own seeds: the experiment's seed-0 run repeats finished_run exactly (it did not, before
    # the server's initial trunk was seeded); seed 1 differs
    from pharmafl.multitask.experiment import format_seeds_table, run_chem_experiment

    result = run_chem_experiment(chembl_small, tmp_path / "exp", JOB, seeds=2, rounds=2, progress=lambda _m: None)
    _, workspace = finished_run
    first = json.loads((workspace / "server/simulate_job/cross_site_val/cross_val_results.json").read_text())
    again = json.loads(
        (tmp_path / "exp/seed-0/federated/server/simulate_job/cross_site_val/cross_val_results.json").read_text()
    )
    assert again == first
    other = json.loads(
        (tmp_path / "exp/seed-1/federated/server/simulate_job/cross_site_val/cross_val_results.json").read_text()
    )
    assert other != first
    for site in ("site-1", "site-2"):
        entry = result["sites"][site]
        assert len(entry["federated_auc_pr"]["values"]) == 2 and entry["federated_auc_pr"]["std"] > 0
        comparison = entry["per_task"]
        assert comparison["tasks"] > 10 and 0 <= comparison["wilcoxon_p"] <= 1
        for side in ("federated", "single_partner"):  # conformal sets on the test fold, MP and SP
            for level in ("0.8", "0.9"):
                assert 0 < entry["conformal"][side][level]["validity"] <= 1
    table = format_seeds_table(result)
    assert "± " in table and "p (Wilcoxon" in table and "Conformal efficiency" in table
    assert json.loads((tmp_path / "exp" / "summary.json").read_text()) == result


def test_an_experiment_with_the_regression_head_reports_r2_deltas_and_keeps_the_head_home(chembl_small, tmp_path):
    from pharmafl.multitask.experiment import format_seeds_table, run_chem_experiment

    overrides = {"regression_weight": 1.0}
    result = run_chem_experiment(
        chembl_small,
        tmp_path / "exp",
        JOB,
        1,
        1,
        progress=lambda _m: None,
        overrides=overrides,
        baseline_overrides={"dropout": 0.3},  # the single-partner side's own setting
    )
    single = json.loads((tmp_path / "exp/seed-0/single_partner/summary.json").read_text())["config"]
    assert single["dropout"] == 0.3 and single["regression_weight"] == 1.0
    for site in ("site-1", "site-2"):
        regression = result["sites"][site]["regression"]
        assert regression["per_task"]["tasks"] > 0
        assert regression["delta_r2"]["values"] == [pytest.approx(regression["per_task"]["mean_delta"]["r2"])]
    assert "delta R²" in format_seeds_table(result)
    workspace = tmp_path / "exp" / "seed-0" / "federated"
    records = [json.loads(line) for line in (workspace / "server/simulate_job" / CONTRIBUTIONS_LOG).open()]
    assert records and all(key.startswith("trunk.") for r in records for key in r["keys"])
    # what reached the server: aggregate regression metrics only, never per-task results
    server = json.loads((workspace / "server/simulate_job/cross_site_val/cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        sent = next(iter(server[site].values()))
        assert set(sent["regression"]) == {"r2", "rmse", "tasks_evaluated"}


def test_predict_round_trip_gives_the_scores_the_report_used(finished_run, chembl_small, tmp_path):
    # the saved site model scores its own test fold from SMILES alone: the same per-task AUCs as the final
    # validation (the site's site_metrics.json); a molecule that cannot be featurised keeps its row
    import pandas as pd

    from pharmafl.cli import main
    from pharmafl.core.metrics import per_task_auc
    from pharmafl.multitask.dataset import load_site

    _, workspace = finished_run
    site_dir = workspace / "site-1" / "simulate_job"
    data = load_site(str(chembl_small / "site-1"))
    rows = data.rows_in_folds([int(data.manifest["test_fold"])])
    smiles = pd.read_csv(chembl_small / "site-1" / "compounds.csv")["smiles"].to_numpy()[rows]
    pd.DataFrame({"smiles": [*smiles, "not a molecule", "[cH-]1cccc1"]}).to_csv(tmp_path / "new.csv", index=False)
    assert (
        main(
            [
                "predict",
                "--model",
                str(site_dir),
                "--smiles",
                str(tmp_path / "new.csv"),
                "--out",
                str(tmp_path / "preds.csv"),
            ]
        )
        == 0
    )
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == len(rows) + 2
    assert list(preds["status"].tail(2)) == ["invalid_smiles", "unreadable_standard_form"]
    task_ids = list(data.tasks["task_id"])
    scores = preds[task_ids].to_numpy()[: len(rows)]
    quorum = data.manifest["quorum"]
    per_task = per_task_auc(
        data.Y[rows].toarray(), scores, task_ids, quorum["min_eval_actives"], quorum["min_eval_inactives"]
    )
    validated = json.loads((site_dir / "site_metrics.json").read_text())["per_task"]
    assert set(per_task) == set(validated)
    for task, metrics in per_task.items():
        assert metrics["auc_pr"] == pytest.approx(validated[task]["auc_pr"], abs=1e-6)
