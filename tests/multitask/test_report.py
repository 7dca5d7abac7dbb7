import json

import numpy as np
import pytest

from pharmafl.cli import main
from pharmafl.core.report import SITE_METRICS_FILE, federated_final, site_metrics
from pharmafl.multitask.report import build_summary, format_table


def test_final_metrics_skip_the_initial_checkpoint(tmp_path):
    results = {
        "site-1": {"SRV_initial_trunk.pt": {"auc_pr": 0.1}, "SRV_FL_global_model.pt": {"auc_pr": 0.8}},
        "site-2": {"SRV_global_state": {"auc_pr": 0.7}},
    }
    (tmp_path / "cross_site_val").mkdir()
    (tmp_path / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(results))
    assert federated_final(tmp_path) == {"site-1": {"auc_pr": 0.8}, "site-2": {"auc_pr": 0.7}}


def _sim_workspace(root, per_task_at_sites: bool):
    """A simulator workspace after the trunk-only filter: means at the server, per-task AUCs at each site."""
    sites = {
        "site-1": {"t1": {"auc_roc": 0.8, "auc_pr": 0.6}, "t2": {"auc_roc": 0.7, "auc_pr": 0.4}},
        "site-2": {"t3": {"auc_roc": 0.9, "auc_pr": 0.7}},
    }
    results = {}
    for site, per_task in sites.items():
        means = {"auc_roc": 0.8, "auc_pr": 0.5, "tasks_evaluated": len(per_task), "validation": {"auc_pr": 0.5}}
        results[site] = {"SRV_FL_global_model.pt": means}
        if per_task_at_sites:
            (root / site / "simulate_job").mkdir(parents=True)
            (root / site / "simulate_job" / SITE_METRICS_FILE).write_text(json.dumps({**means, "per_task": per_task}))
    (root / "server" / "simulate_job" / "cross_site_val").mkdir(parents=True)
    (root / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(results))
    return root


def _baseline(root):
    single = {
        "site-1": {"t1": {"auc_pr": 0.5}, "t2": {"auc_pr": 0.5}, "t9": {"auc_pr": 0.1}},
        "site-2": {"t3": {"auc_pr": 0.4}},
    }
    sites = {site: {"auc_roc": 0.7, "auc_pr": 0.45, "per_task": per_task} for site, per_task in single.items()}
    root.mkdir()
    (root / "summary.json").write_text(json.dumps({"sites": sites}))
    return root


def test_per_task_deltas_come_from_the_site_folders(tmp_path):
    workspace = _sim_workspace(tmp_path / "ws", per_task_at_sites=True)
    summary = build_summary(workspace, _baseline(tmp_path / "sp"))
    # site-1: (0.6 - 0.5 + 0.4 - 0.5) / 2 over the tasks both scored; site-2: 0.7 - 0.4
    assert summary["sites"]["site-1"]["mean_per_task_delta_auc_pr"] == pytest.approx(0.0)
    assert summary["sites"]["site-2"]["mean_per_task_delta_auc_pr"] == pytest.approx(0.3)
    assert summary["sites"]["site-1"]["delta"]["auc_pr"] == pytest.approx(0.05)


def test_a_downloaded_result_without_site_folders_reports_the_means(tmp_path):
    workspace = _sim_workspace(tmp_path / "ws", per_task_at_sites=False)
    summary = build_summary(workspace, _baseline(tmp_path / "sp"))
    for entry in summary["sites"].values():
        assert entry["mean_per_task_delta_auc_pr"] is None
        assert entry["federated"] == {"auc_roc": 0.8, "auc_pr": 0.5} and entry["tasks_evaluated"] > 0
    assert site_metrics(tmp_path / "ws" / "server" / "simulate_job", "site-1") is None


def _server_rounds(workspace, rounds):
    config = workspace / "server" / "simulate_job" / "app_server" / "config"
    config.mkdir(parents=True)
    (config / "config_fed_server.json").write_text(json.dumps({"num_rounds": rounds}))


def test_the_table_says_the_rounds_of_each_side_and_warns_when_they_differ(tmp_path):
    workspace = _sim_workspace(tmp_path / "ws", per_task_at_sites=False)
    _server_rounds(workspace, 2)
    baseline = _baseline(tmp_path / "sp")
    summary_file = baseline / "summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "rounds": 13}))
    summary = build_summary(workspace, baseline)
    assert summary["rounds"] == {"federated": 2, "single_partner": 13}
    table = format_table(summary)
    assert "WARNING: the rounds differ (federated 2, single-partner 13)" in table and "--rounds 2" in table
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "rounds": 2}))
    assert "Rounds: federated 2, single-partner 2." in format_table(build_summary(workspace, baseline))


@pytest.mark.parametrize("results", [{}, {"site-1": {}}])
def test_report_on_a_run_without_results_is_exit_2_with_one_sentence(tmp_path, capsys, results):
    run = tmp_path / "ws" / "server" / "simulate_job" / "cross_site_val"
    run.mkdir(parents=True)
    (run / "cross_val_results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "finished without results" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no finished run" in capsys.readouterr().err


def test_per_task_comparison_is_melloddys():
    from scipy.stats import wilcoxon

    from pharmafl.multitask.report import per_task_comparison

    single = {f"t{i}": {"auc_pr": 0.5 + 0.01 * i, "auc_roc": 0.7, "train_labels": 10 * (i + 1)} for i in range(20)}
    federated = {
        t: {"auc_pr": m["auc_pr"] + (0.05 if i < 15 else -0.01), "auc_roc": 0.72}
        for i, (t, m) in enumerate(single.items())
    }
    result = per_task_comparison(federated, {**single, "only_sp": {"auc_pr": 0.1}})
    assert result["tasks"] == 20 and result["improved_share"] == 0.75
    sp = [single[t]["auc_pr"] for t in sorted(single)]
    mp = [federated[t]["auc_pr"] for t in sorted(single)]
    assert result["wilcoxon_p"] == pytest.approx(wilcoxon(mp, sp).pvalue) and result["wilcoxon_p"] < 0.05
    assert result["mean_delta"]["auc_pr"] == pytest.approx((15 * 0.05 - 5 * 0.01) / 20)
    assert result["mean_delta"]["auc_roc"] == pytest.approx(0.02)
    expected_riptop = np.mean([(f - s) / (1 - s) for f, s in zip(mp, sp, strict=True)])
    assert result["riptop_auc_pr"] == pytest.approx(expected_riptop)
    quartiles = result["by_train_labels"]
    assert [q["tasks"] for q in quartiles] == [5, 5, 5, 5]
    assert quartiles[0]["mean_delta_auc_pr"] == pytest.approx(0.05)  # the smallest tasks improved
    assert quartiles[3]["mean_delta_auc_pr"] == pytest.approx(-0.01)
    assert per_task_comparison(federated, {}) is None


def test_calibrated_auc_pr_is_average_precision_at_the_true_prior():
    from sklearn.metrics import average_precision_score

    from pharmafl.core.metrics import calibrated_auc_pr

    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.3).astype(int)
    scores = rng.random(500) + 0.4 * y
    assert calibrated_auc_pr(y, scores, prior=y.mean()) == pytest.approx(average_precision_score(y, scores))
    assert calibrated_auc_pr(y, scores) < average_precision_score(y, scores)  # prior 0.1 < the 30% actives


def test_task_metrics_equal_scikit_learn_with_ties_and_float32():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pharmafl.core.metrics import binary_auc

    rng = np.random.default_rng(1)
    for case in range(300):
        n = int(rng.integers(2, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(int)
        if y.min() == y.max():
            continue
        scores = rng.random(n) + 0.3 * y
        if case % 2:
            scores = np.round(scores, 1)  # tie blocks spanning both classes
        if case % 3 == 0:
            scores = scores.astype(np.float32)
        metrics = binary_auc(y, scores)
        assert metrics["auc_roc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        assert metrics["auc_pr"] == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    one_class = binary_auc(np.ones(4, dtype=int), np.linspace(0, 1, 4))
    assert np.isnan(one_class["auc_roc"]) and np.isnan(one_class["auc_pr"])


def test_regression_comparison_pairs_tasks_both_sides_scored():
    from pharmafl.multitask.report import regression_comparison

    federated = {
        "per_task": {"a": {"r2": 0.5, "rmse": 0.8}, "b": {"r2": 0.2, "rmse": 1.0}, "c": {"r2": 0.1, "rmse": 1}}
    }
    single = {"per_task": {"a": {"r2": 0.3, "rmse": 0.9}, "b": {"r2": 0.3, "rmse": 0.9}}}
    result = regression_comparison(federated, single)
    assert result["tasks"] == 2  # c: scored by one side only
    assert result["mean_delta"]["r2"] == pytest.approx(0.05) and result["mean_delta"]["rmse"] == pytest.approx(0.0)
    assert result["improved_share"] == 0.5
    assert regression_comparison(None, single) is None and regression_comparison(federated, {}) is None
