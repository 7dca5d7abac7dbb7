import json

from pharmafl.report import federated_final


def test_final_metrics_skip_the_initial_checkpoint(tmp_path):
    results = {
        "site-1": {"SRV_initial_trunk.pt": {"auc_pr": 0.1}, "SRV_FL_global_model.pt": {"auc_pr": 0.8}},
        "site-2": {"SRV_global_state": {"auc_pr": 0.7}},
    }
    (tmp_path / "cross_site_val").mkdir()
    (tmp_path / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(results))
    assert federated_final(tmp_path) == {"site-1": {"auc_pr": 0.8}, "site-2": {"auc_pr": 0.7}}
