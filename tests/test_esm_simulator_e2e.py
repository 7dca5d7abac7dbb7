"""ESM-2 LoRA jobs end to end in the real FLARE simulator: 2 GPSite clients, a tiny random ESM-2, 2 rounds."""

import json

import numpy as np
import pytest

from pharmafl.binding_sites.experiment import parse_variant, run_esm_experiment
from pharmafl.binding_sites.splits import SplitConfig
from pharmafl.flare.state_persistor import STATE_FILE

pytestmark = pytest.mark.slow


EXPERIMENT_OVERRIDES = {"model": "", "local_steps": 3, "batch_size": 4, "max_length": 64}
JOBS = {"esm2_lora_fra": "fra_lora", "esm2_lora_fedavg": "naive"}  # job -> the experiment's method


@pytest.fixture(scope="module")
def experiment(gpsite_dir, tiny_esm_config, tmp_path_factory):
    """``experiment esm`` for one seed: both jobs in the simulator with site-1 at LoRA rank 4 under the rank-16
    global adapter, 2 rounds, then centralized training; (the experiment's folder, its summary, what it said)."""
    out = tmp_path_factory.mktemp("esm_experiment") / "exp"
    inputs = [str(gpsite_dir / "ATP_train.txt"), str(gpsite_dir / "HEM_train.txt")]
    split = SplitConfig(clients=2, split="iid", max_length=64, max_chains_per_input=60, val_fraction=0.2)
    overrides = {**EXPERIMENT_OVERRIDES, "model_config": tiny_esm_config}
    said = []
    variants = [parse_variant('ranks:site_ranks={"site-1": 4}')]
    combined = run_esm_experiment(inputs, out, split, 1, 2, variants, overrides, progress=said.append)
    return out, combined, said


@pytest.mark.parametrize("job", list(JOBS))
def test_lora_job_runs_and_reports(job, experiment):
    """FRA-LoRA takes site-1's rank-4 factors as they are, the naive job its zero-padded ones; site-1 trains the
    leading 4 components of the global adapter."""
    out, _, _ = experiment
    workspace = out / "seed-0" / "ranks" / JOBS[job]
    run_dir = workspace / "server/simulate_job"
    results = json.loads((run_dir / "cross_site_val/cross_val_results.json").read_text())
    assert set(results) == {"site-1", "site-2"}
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
        with np.load(workspace / site / "simulate_job" / "local_adapter.npz") as adapter:
            assert all(adapter[name].shape[0] == rank for name in lora_a)
    log = (workspace / "simulate.log").read_text()
    assert "LoRA rank 4" in log and "LoRA rank 16" in log
    # per-round scoring was off (the experiment scores the final models itself): only the final model was scored
    assert "final global model" in log and "round 1 global model" not in log


def test_experiment_scores_every_method_at_validation_thresholds(experiment):
    out, combined, said = experiment
    assert list(combined["variants"]) == ["ranks"] and combined["settings"]["steps_per_client"] == 6
    seed = json.loads((out / "seed-0/summary.json").read_text())
    scores = {**seed["scores"]["ranks"], "centralized": seed["scores"]["centralized"]["centralized"]}
    for entry in scores.values():
        assert set(entry) == {"site-1", "site-2", "pooled"}
        for metrics in entry.values():
            assert 0 <= metrics["auprc"] <= 1 and 0 <= metrics["auroc"] <= 1 and -1 <= metrics["mcc"] <= 1
        assert 0 <= entry["site-1"]["threshold"] <= 1
    # both federated methods start from the same seeded adapter and differ only in the aggregation
    assert scores["fra_lora"] != scores["naive"]
    # FRA-LoRA's per-round record: the truncation's retained energy and the naive-averaging error on the same uploads
    rounds = seed["rounds"]["ranks"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(0 < r["retained_energy"]["min"] <= 1 and r["naive_error"] > 0 for r in rounds)
    diff = combined["variants"]["ranks"]["fra_minus_naive"]["pooled"]["auprc"]
    assert diff["mean"] == pytest.approx(scores["fra_lora"]["pooled"]["auprc"] - scores["naive"]["pooled"]["auprc"])
    assert diff["n"] == 1
    assert (out / "seed-0/data/site-1/val.jsonl").stat().st_size > 0
    assert "naive averaging error" in (out / "report.md").read_text()
    assert (out / "rounds.png").stat().st_size > 0
    assert any("ranks naive done" in line for line in said)
