"""ESM-2 LoRA jobs end to end in the real FLARE simulator: 2 GPSite clients, a tiny random ESM-2, 2 rounds."""

import json

import numpy as np
import pytest

from pharmafl.binding_sites.baseline import run_esm_baseline
from pharmafl.binding_sites.report import ESM_METRICS
from pharmafl.core.paths import repo_root
from pharmafl.flare.state_persistor import STATE_FILE
from pharmafl.jobs.simulate import run_simulator
from pharmafl.report import write_report

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("job", ["esm2_lora_fra", "esm2_lora_fedavg"])
def test_lora_job_runs_and_reports(job, gpsite_small, tiny_esm_config, tmp_path):
    """Both jobs with site-1 at LoRA rank 4 under the rank-16 global adapter: FRA-LoRA takes its rank-4 factors as
    they are, the naive job its zero-padded ones; it trains the leading 4 components of the global adapter."""
    overrides = {"model": "", "model_config": tiny_esm_config, "local_steps": 3, "batch_size": 4, "max_length": 64}
    overrides["site_ranks"] = {"site-1": 4}
    result = run_simulator(
        repo_root() / "jobs" / job, gpsite_small, tmp_path / "ws", rounds=2, executor_overrides=overrides, quiet=True
    )
    run_dir = tmp_path / "ws/server/simulate_job"
    results = json.loads((run_dir / "cross_site_val/cross_val_results.json").read_text())
    assert set(results) == set(result["sites"]) == {"site-1", "site-2"}
    for by_model in results.values():
        metrics = next(iter(by_model.values()))
        assert {"site", "common"} <= set(metrics)
        assert 0.0 <= metrics["common"]["f1"] <= 1.0
    records = [json.loads(line) for line in (run_dir / "contributions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["accepted"] for r in records)
    with np.load(run_dir / "app_server" / STATE_FILE) as state:
        lora_a = [name for name in state.files if name.endswith("lora_A.weight")]
        assert lora_a and all(state[name].shape[0] == 16 for name in lora_a)  # rank 16 adapter
        assert all(np.isfinite(state[name]).all() for name in state.files)
    for site, rank in (("site-1", 4), ("site-2", 16)):
        with np.load(tmp_path / "ws" / site / "simulate_job" / "local_adapter.npz") as adapter:
            assert all(adapter[name].shape[0] == rank for name in lora_a)
    log = (tmp_path / "ws" / "simulate.log").read_text()
    assert "LoRA rank 4" in log and "LoRA rank 16" in log


def test_report_compares_the_federation_with_centralized_training(gpsite_small, tiny_esm_config, tmp_path):
    overrides = {"model": "", "model_config": tiny_esm_config, "local_steps": 2, "batch_size": 4, "max_length": 64}
    job = repo_root() / "jobs" / "esm2_lora_fra"
    run_simulator(job, gpsite_small, tmp_path / "ws", rounds=2, executor_overrides=overrides, quiet=True)
    run_esm_baseline(gpsite_small, tmp_path / "central", job, "centralized", 2, overrides, progress=lambda _: None)
    summary, table = write_report(tmp_path / "ws", [tmp_path / "central"])
    assert summary["kind"] == "esm_lora" and summary["baselines"]["centralized"]["steps"] == 2 * 2 * 2
    assert set(summary["sites"]) == {"site-1", "site-2"}
    for entry in summary["sites"].values():
        for model in ("federated", "centralized", "federated_common", "centralized_common"):
            assert set(entry[model]) == set(ESM_METRICS)
        assert entry["f1_minus_centralized"] == entry["federated"]["f1"] - entry["centralized"]["f1"]
        # round 0 (untrained), round 1, and the final model after round 2, for the federation and the baseline
        assert [len(entry["curves"][m]["f1"]) for m in ("federated", "centralized")] == [3, 3]
        assert entry["curves"]["federated"]["f1"][-1] == pytest.approx(entry["federated"]["f1"])
    assert "centralized" in table
    on_disk = json.loads((tmp_path / "ws/report/summary.json").read_text())
    assert on_disk["sites"].keys() == summary["sites"].keys()
    assert (tmp_path / "ws/report/metrics_per_round.png").stat().st_size > 0
