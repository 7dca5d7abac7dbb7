"""ESM-2 LoRA jobs end to end in the real FLARE simulator: 2 GPSite clients, a tiny random ESM-2, 2 rounds."""

import json

import numpy as np
import pytest

from pharmafl.flare.state_persistor import STATE_FILE
from pharmafl.jobs import repo_root
from pharmafl.simulate import run_simulator

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("job", ["esm2_lora_fra", "esm2_lora_fedavg"])
def test_lora_job_runs_and_reports(job, gpsite_small, tiny_esm_config, tmp_path):
    overrides = {"model": "", "model_config": tiny_esm_config, "local_steps": 3, "batch_size": 4, "max_length": 64}
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
