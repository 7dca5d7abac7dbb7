import json

import pytest

from pharmafl.binding_sites.baseline import run_esm_baseline
from pharmafl.core.errors import InputError
from pharmafl.core.paths import repo_root

JOB = repo_root() / "jobs" / "esm2_lora_fra"


@pytest.mark.parametrize("mode, steps", [("centralized", 2 * 2 * 2), ("local", 2 * 2)])
def test_baseline_takes_the_federation_total_steps(mode, steps, gpsite_small, tiny_esm_config, tmp_path):
    overrides = {"model": "", "model_config": tiny_esm_config, "local_steps": 2, "batch_size": 2, "max_length": 64}
    summary = run_esm_baseline(gpsite_small, tmp_path, JOB, mode, rounds=2, overrides=overrides, progress=print)
    assert summary["steps"] == steps  # rounds x local steps (x clients when pooled)
    assert set(summary["sites"]) == {"site-1", "site-2"}
    for result in summary["sites"].values():
        assert 0.0 <= result["site"]["f1"] <= 1.0 and result["common"]["residues"] > 0
        # scored before training and after each of the 2 rounds; the last point is the final result
        assert len(result["curve"]) == 3 and result["curve"][-1]["site"] == result["site"]
    assert json.loads((tmp_path / "summary.json").read_text())["mode"] == mode


def test_unknown_mode(gpsite_small, tmp_path):
    with pytest.raises(InputError, match="--mode"):
        run_esm_baseline(gpsite_small, tmp_path, JOB, "pooled")
