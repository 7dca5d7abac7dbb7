"""``pharmafl experiment esm``: what it refuses before any run (its runs: tests/test_esm_simulator_e2e.py)."""

import pytest

from pharmafl.binding_sites.experiment import parse_variant, run_esm_experiment
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
