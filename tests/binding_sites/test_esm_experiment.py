"""``pharmafl experiment esm``: what it refuses before any run (its runs: tests/test_esm_simulator_e2e.py)."""

import pytest

from pharmafl.binding_sites.experiment import combine_seeds, format_seeds_table, parse_variant, run_esm_experiment
from pharmafl.binding_sites.splits import SplitConfig
from pharmafl.cli import main
from pharmafl.core.errors import InputError


def test_variants_must_share_total_steps_and_names(gpsite_dir, tmp_path, capsys):
    inputs = [str(gpsite_dir / "ATP_train.txt"), str(gpsite_dir / "HEM_train.txt")]
    split = SplitConfig(val_fraction=0.2)
    long = parse_variant("long:rounds=2;local_steps=30")
    assert long.rounds == 2 and long.overrides == {"local_steps": 30}
    with pytest.raises(InputError, match="same total steps per client.*base 20.*long 60"):
        run_esm_experiment(inputs, tmp_path / "a", split, 1, 1, [parse_variant("base"), long])
    with pytest.raises(InputError, match="names must differ"):
        run_esm_experiment(inputs, tmp_path / "b", split, 1, 1, [parse_variant("x"), parse_variant("x")])
    with pytest.raises(InputError, match="--val-fraction must be above 0"):
        run_esm_experiment(inputs, tmp_path / "c", SplitConfig(), 1, 1)
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "esm", *inputs, "--out", str(tmp_path / "d"), "--variant", "bad:rounds=0"])
    assert exit_info.value.code == 2 and "rounds must be a positive integer" in capsys.readouterr().err


def _scores(value: float) -> dict:
    row = {"auprc": value, "auroc": value, "f1": value, "mcc": value, "threshold": 0.5}
    return {"site-1": row, "site-2": row, "pooled": row}


def _spent(epsilon: float, noise: float) -> dict:
    return {"epsilon": epsilon, "delta": 0.01, "noise_multiplier": noise, "accountant": "rdp"}


def test_seeds_combine_into_paired_differences_and_the_largest_epsilon_any_site_spent():
    per_seed = [
        {
            "scores": {"dp": {"fra_lora": _scores(0.3 + s / 10), "naive": _scores(0.2)}, "centralized": {
                "centralized": _scores(0.5)}},
            "rounds": {},
            # site-2 spent more; in seed 1 site-1 had no DP record
            "privacy": {"dp": {method: {"site-1": None if s else _spent(1.0, 2.0), "site-2": _spent(3.0 + s, 1.5)}
                               for method in ("fra_lora", "naive")}},
        }
        for s in range(2)
    ]  # fmt: skip
    combined = combine_seeds(per_seed, ["dp"])
    entry = combined["variants"]["dp"]
    assert entry["fra_minus_naive"]["pooled"]["auprc"]["values"] == pytest.approx([0.1, 0.2])
    assert entry["fra_minus_centralized"]["site-1"]["auroc"]["mean"] == pytest.approx(-0.15)
    spent = entry["privacy"]["fra_lora"]
    assert spent["epsilon"]["values"] == [3.0, 4.0] and spent["noise_multiplier"]["values"] == [2.0, 1.5]
    assert spent["accountant"] == "rdp"
    table = format_seeds_table(combined)
    assert "largest epsilon any site spent 3.5000 ± 0.7071" in table and "rdp accountant" in table
    # no DP records: no privacy line
    for summary in per_seed:
        summary["privacy"] = {}
    assert "privacy" not in combine_seeds(per_seed, ["dp"])["variants"]["dp"]
