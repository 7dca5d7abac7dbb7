"""DP-SGD in the eICU mortality training (one ICU stay the privacy unit): budget, noise, FedProx, script and job."""

import json

import numpy as np
import pytest
import torch

from pharmafl.clinical.train import MortalityConfig, MortalityTrainer, load_site, positive_weight, predict
from pharmafl.privacy import accounting
from pharmafl.privacy.dp_sgd import DPConfig

# a batch larger than the site's 320 training stays: Poisson rate 1, which the accountant computes at once
FULL_BATCH = {"batch_size": 512, "learning_rate": 0.05, "pos_weight": "balanced"}
DELTA = 1e-3


@pytest.fixture(scope="module")
def south(eicu_regions):
    return load_site(eicu_regions / "south")


def weighted_training_loss(trainer: MortalityTrainer) -> float:
    p = np.clip(predict(trainer.model, trainer.X_train), 1e-7, 1 - 1e-7)
    y = trainer.y_train
    return float(-np.mean(trainer.pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_private_training_reports_epsilon_and_stops_at_the_budget(south):
    target = accounting.epsilon(1.0, 1.0, 3, DELTA) + 1e-6  # exactly three steps fit
    config = MortalityConfig(**FULL_BATCH, local_epochs=2)
    trainer = MortalityTrainer(south, config, dp=DPConfig(noise_multiplier=1.0, target_epsilon=target, delta=DELTA))
    assert trainer.budget.sample_rate == 1.0 and trainer.budget.max_steps == 3
    assert trainer.pos_weight == positive_weight("balanced", trainer.y_train)
    assert trainer.train() == 2
    first = trainer.privacy()
    assert 0 < first["epsilon"] <= target and first["privacy_unit"] == "one ICU stay of this site"
    assert trainer.train() == 1 and trainer.train() == 0  # the budget ends the second round after one step
    spent = trainer.privacy()
    assert first["epsilon"] < spent["epsilon"] <= target and spent["exhausted"] and spent["steps"] == 3
    # without DP the trainer neither clips nor accounts
    assert MortalityTrainer(south, MortalityConfig(pos_weight="balanced")).privacy() is None


def test_a_model_trained_with_large_noise_is_worse_than_one_without(south):
    config = MortalityConfig(**FULL_BATCH, local_epochs=10)
    plain = MortalityTrainer(south, config)
    noisy = MortalityTrainer(south, config, dp=DPConfig(noise_multiplier=1000.0))
    assert plain.train() == noisy.train() == 10
    # the loss, not a ranking metric: a random walk of weights ranks stays anywhere from 0.2 to 0.7 AUROC
    assert weighted_training_loss(noisy) > weighted_training_loss(plain) + 0.5
    assert noisy.privacy()["epsilon"] < 0.1  # so much noise buys a small epsilon


def test_fedprox_under_dp_pulls_the_model_to_the_global_one(south):
    """The proximal term depends on no stay: its gradient joins the noised gradient, unclipped."""
    config = MortalityConfig(**FULL_BATCH, local_epochs=10)
    distances = {}
    for mu in (0.0, 100.0):
        trainer = MortalityTrainer(south, config, dp=DPConfig(noise_multiplier=1.0))
        trainer.train()
        start = trainer.model_copy()  # as the Client API script keeps the global model of a round

        def proximal(model, mu=mu, start=start):
            pairs = zip(model.parameters(), start.parameters(), strict=True)
            return mu / 2 * sum((p - s).pow(2).sum() for p, s in pairs)

        assert proximal(trainer.model) == 0
        trainer.train(extra_loss=proximal if mu else None)
        with torch.no_grad():
            distances[mu] = float(proximal(trainer.model, mu=2.0) ** 0.5)
    assert distances[100.0] < distances[0.0] / 3


def test_the_script_takes_dp_options_prints_epsilon_and_saves_it(eicu_regions, tmp_path, capsys):
    from pharmafl.clinical.mortality import main

    args = ["--data", str(eicu_regions / "south"), "--rounds", "2", "--local-epochs", "2", "--batch-size", "512"]
    out = tmp_path / "alone"
    assert main([*args, "--dp-target-epsilon", "3", "--dp-delta", "0.001", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("DP-SGD epsilon") == 2 and "round 2/2" in err
    privacy = json.loads((out / "scores.json").read_text())["privacy"]
    # the target alone is planned over rounds x local epochs = 4 steps: calibrated noise spends nearly all of it
    assert privacy["steps"] == 4 and 2.9 < privacy["epsilon"] <= 3.0 and privacy["delta"] == 0.001
    assert (out / "model.pt").is_file()
    assert main([*args, "--dp-noise-multiplier", "-1"]) == 2
    assert "dp.noise_multiplier must be a positive number" in capsys.readouterr().err


def test_the_job_passes_dp_settings_to_the_script(tmp_path):
    from pharmafl.jobs import executor_args
    from pharmafl.jobs.export import JobOptions, export_run_job

    options = JobOptions(num_rounds=3, settings={"dp.target_epsilon": 4.0, "max_grad_norm": 0.5})
    words = executor_args(export_run_job("eicu_fedavg", tmp_path, options))["task_script_args"].split()
    flags = dict(zip(words[::2], words[1::2], strict=True))
    # a target alone is planned over the job's rounds x local epochs (3 x 5)
    assert flags == {"--dp-target-epsilon": "4.0", "--dp-max-grad-norm": "0.5", "--dp-epochs": "15"}


@pytest.mark.parametrize(
    ("options", "dp", "exhausted"),
    [
        ("--dp-target-epsilon 8 --dp-epochs 12", DPConfig(target_epsilon=8, epochs=12), False),
        ("--dp-target-epsilon 0.3 --dp-noise-multiplier 1", DPConfig(target_epsilon=0.3, noise_multiplier=1), True),
    ],
)
def test_the_audit_recomputes_what_a_site_spent_from_the_runs_script_arguments(south, options, dp, exhausted):
    """``spent_privacy`` gives the epsilon a site's trainer reached over the run's rounds, whether the budget lasted
    or ended training early."""
    from pharmafl.clinical.audit import spent_privacy

    config = MortalityConfig(batch_size=64, local_epochs=2, pos_weight="balanced")
    trainer = MortalityTrainer(south, config, dp=dp)
    for _ in range(3):
        trainer.train()
    spent = trainer.privacy()
    recomputed = spent_privacy(f"--batch-size 64 --local-epochs 2 {options}", config, 3, len(trainer.y_train))
    assert recomputed["steps"] == spent["steps"] and recomputed["epsilon"] == pytest.approx(spent["epsilon"])
    assert spent["epsilon"] <= dp.target_epsilon and spent["exhausted"] == exhausted
    assert spent_privacy("--batch-size 64", config, 3, len(trainer.y_train)) is None


def test_the_audit_command_sends_eicu_data_to_the_eicu_audit(eicu_regions, tmp_path, capsys):
    from pharmafl.cli import main

    command = ["audit", "membership", "--data", str(eicu_regions), "--out", str(tmp_path / "audit")]
    assert main([*command, "--set", "no_such=1"]) == 2  # refused by eicu_fedavg's settings: the eICU audit ran
    assert "has no setting no_such" in capsys.readouterr().err
    assert main([*command, "--centralized", str(eicu_regions)]) == 2
    assert "eicu data: the audit trains the centralized model itself" in capsys.readouterr().err
    assert main([*command, "--model", "x"]) == 2 and "--model is for binding-site data" in capsys.readouterr().err
