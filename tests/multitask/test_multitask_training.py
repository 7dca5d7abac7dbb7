import numpy as np
import pytest

from pharmafl.core.errors import InputError
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.model import TrunkConfig
from pharmafl.multitask.train import MultiTaskTrainer, TrainConfig


@pytest.fixture(scope="module")
def site(chembl_small):
    return load_site(str(chembl_small / "site-1"))


def trunk(width: int) -> TrunkConfig:
    return TrunkConfig(n_features=32000, hidden_sizes=(width,))  # chembl_small: 32,000-bit fingerprints


def test_a_trunk_of_another_width_than_the_data_is_refused_by_name(site):
    with pytest.raises(InputError, match="the trunk expects 1024 fingerprint bits .* --bits 1024"):
        MultiTaskTrainer(site, TrainConfig(), TrunkConfig(n_features=1024, hidden_sizes=(16,)))


def test_training_folds_exclude_test_and_validation(site):
    trainer = MultiTaskTrainer(site, TrainConfig(validation_fold=1), trunk(32))
    folds = set(np.unique(site.folds[trainer.train_rows]))
    assert folds and not folds & {trainer.test_fold, 1}
    with pytest.raises(ValueError, match="test fold"):
        MultiTaskTrainer(site, TrainConfig(validation_fold=trainer.test_fold), trunk(32))


def test_test_fold_scores_exactly_the_tasks_passing_the_evaluation_quorum(site):
    result = MultiTaskTrainer(site, TrainConfig(), trunk(32)).evaluate()
    assert result["tasks_evaluated"] == int(site.eval_task_mask.sum()) > 0
    assert set(result["per_task"]) == set(site.tasks.loc[site.eval_task_mask, "task_id"])


def test_training_learns(site):
    trainer = MultiTaskTrainer(site, TrainConfig(batch_size=64), trunk(64))
    before = trainer.evaluate(1)["auc_roc"]
    steps = trainer.train(epochs=3)
    assert steps == 3 * int(np.ceil(len(trainer.train_rows) / 64))
    assert trainer.evaluate(1)["auc_roc"] > before + 0.05


def test_same_seed_same_model(site):
    first, second = (MultiTaskTrainer(site, TrainConfig(seed=3), trunk(16)) for _ in range(2))
    first.train(epochs=1)
    second.train(epochs=1)
    for name, value in first.trunk_weights().items():
        np.testing.assert_array_equal(value, second.trunk_weights()[name])


def test_regression_weight_zero_trains_exactly_as_without_a_regression_head(site):
    assert site.regression is not None and site.regression.n_tasks > 0
    plain = MultiTaskTrainer(site, TrainConfig(seed=1), trunk(16))
    without = MultiTaskTrainer(site.__class__(**{**site.__dict__, "regression": None}), TrainConfig(seed=1), trunk(16))
    plain.train(epochs=1)
    without.train(epochs=1)
    assert plain.model.regression_head is None
    for name, value in plain.trunk_weights().items():
        np.testing.assert_array_equal(value, without.trunk_weights()[name])


def test_censored_loss_penalises_a_bound_only_on_its_wrong_side(site):
    import torch

    from pharmafl.multitask.dataset import CENSOR_ABOVE, CENSOR_BELOW, CENSOR_EXACT

    trainer = MultiTaskTrainer(site, TrainConfig(regression_weight=1.0), trunk(16))
    head = trainer.model.regression_head
    row = int(trainer.regression.censor.nonzero()[0][0])
    task = int(trainer.regression.censor[row].nonzero()[1][0])
    hidden = torch.zeros(1, 16)
    with torch.no_grad():  # the head predicts exactly 1 standard unit above the task's mean
        head.linear.weight.zero_()
        head.linear.bias.zero_()
        head.linear.bias[task] = 1.0
    regression = trainer.regression
    for code, value, expected in [
        (CENSOR_EXACT, head.mean[task] + 3 * head.std[task], 4.0),  # (1 - 3)^2
        (CENSOR_ABOVE, head.mean[task] + 3 * head.std[task], 4.0),  # "> 3": predicted 1 is below the bound
        (CENSOR_ABOVE, head.mean[task] - 3 * head.std[task], 0.0),  # "> -3": 1 satisfies it
        (CENSOR_BELOW, head.mean[task] - 3 * head.std[task], 16.0),  # "< -3": 1 is above the bound
        (CENSOR_BELOW, head.mean[task] + 3 * head.std[task], 0.0),
    ]:
        censor, values = regression.censor.tolil(), regression.values.tolil()
        censor[row, :], values[row, :] = 0, 0
        censor[row, task], values[row, task] = code, float(value)
        trainer.regression = regression.__class__(values.tocsr(), censor.tocsr(), regression.tasks)
        loss = trainer._censored_mse(hidden, np.array([row]))
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_regression_head_learns_the_training_values(site):
    trainer = MultiTaskTrainer(site, TrainConfig(regression_weight=1.0, batch_size=64), trunk(64))
    before = trainer.evaluate_regression(trainer.train_rows)
    trainer.train(epochs=5)
    after = trainer.evaluate_regression(trainer.train_rows)
    assert after["tasks_evaluated"] > 0
    assert after["rmse"] < before["rmse"] and after["r2"] > before["r2"] + 0.2


def test_a_partner_without_regression_tasks_trains_no_regression_head(site):
    empty = site.regression.__class__(
        site.regression.values[:, :0], site.regression.censor[:, :0], site.regression.tasks.iloc[:0]
    )
    trainer = MultiTaskTrainer(
        site.__class__(**{**site.__dict__, "regression": empty}), TrainConfig(regression_weight=1), trunk(16)
    )
    assert trainer.model.regression_head is None and trainer.regression_task_ids == []
    assert trainer.train(epochs=1) > 0 and "regression" not in trainer.evaluate()
