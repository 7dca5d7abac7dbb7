import numpy as np
import pytest

from pharmafl.clinical.train import (
    MortalityConfig,
    MortalityTrainer,
    Standardizer,
    expected_calibration_error,
    load_site,
    positive_weight,
    scores,
)
from pharmafl.core.errors import InputError


def test_standardizer_imputes_scales_and_flags_missing_values():
    X = np.array([[1.0, np.nan], [3.0, 4.0], [np.nan, 8.0]])
    standardizer = Standardizer.fit(X)
    out = standardizer.transform(X)
    assert out.shape == (3, 4) and out.dtype == np.float32
    assert np.allclose(out[:, 2:], np.isnan(X))  # one missing indicator per feature
    assert np.allclose(out[2, 0], 0.0) and np.allclose(out[0, 1], 0.0)  # imputed with the mean: 0 after scaling
    assert np.allclose(out[[0, 1], 0], [-1.0, 1.0])
    stats = {"a": {"mean": 2.0, "stddev": 1.0}, "b": {"mean": 6.0, "stddev": 2.0}}
    assert np.allclose(Standardizer.from_statistics(stats, ["a", "b"]).transform(X)[1, :2], [1.0, -1.0])
    with pytest.raises(InputError, match="no entry for c"):
        Standardizer.from_statistics(stats, ["a", "c"])


def test_calibration_error_and_scores():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert expected_calibration_error(y, np.full(4, 0.5)) == 0.0  # one bin, rate 0.5, mean 0.5
    assert np.isclose(expected_calibration_error(y, np.array([0.9, 0.9, 0.9, 0.9])), 0.4)
    result = scores(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert result["auroc"] == 0.75 and result["stays"] == 4 and result["deaths"] == 2
    assert np.isnan(scores(np.zeros(3, dtype=int), np.full(3, 0.1))["auroc"])  # one class: no ranking metric


def test_positive_weights():
    y = np.array([1] + [0] * 9)
    assert positive_weight("1", y) == 1.0 and positive_weight("balanced", y) == 9.0
    assert np.isclose(positive_weight("sqrt", y), 3.0)


def test_the_trainer_learns_and_refuses_a_broken_global_model(eicu_regions):
    site = load_site(eicu_regions / "south")
    trainer = MortalityTrainer(site, MortalityConfig(model="mlp", hidden=8))
    before = trainer.evaluate("validation")["auroc"]
    for _ in range(3):
        assert trainer.train() > 0
    assert trainer.evaluate("validation")["auroc"] > max(before, 0.6)
    state = trainer.state()
    trainer.load_state(state)
    broken = {**state, "net.0.weight": np.full_like(state["net.0.weight"], np.nan)}
    with pytest.raises(InputError, match="mis-shaped or not finite"):
        trainer.load_state(broken)
    with pytest.raises(InputError, match="are not this model's"):
        trainer.load_state({"weight": np.zeros(3)})
    assert trainer.weight() == (site.split == "train").sum()
    assert MortalityTrainer(site, MortalityConfig(weighting="uniform")).weight() == 1.0


def test_bad_settings_and_missing_data_are_one_sentence(tmp_path):
    with pytest.raises(InputError, match="model must be one of logistic, mlp"):
        MortalityConfig(model="forest")
    with pytest.raises(InputError, match="weighting must be one of samples, uniform"):
        MortalityConfig(weighting="by-beds")
    with pytest.raises(InputError, match="run `pharmafl prepare eicu` first"):
        load_site(tmp_path)


def test_the_script_refuses_a_bad_setting_in_one_sentence(eicu_regions, capsys):
    from pharmafl.clinical.mortality import main

    assert main(["--data", str(eicu_regions / "south"), "--learning-rate", "fast"]) == 2
    assert "--learning-rate fast is not a valid float" in capsys.readouterr().err
    assert main(["--data", str(eicu_regions / "south"), "--model", "forest"]) == 2
