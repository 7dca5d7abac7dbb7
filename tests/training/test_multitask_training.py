import numpy as np
import pytest

from pharmafl.chem.dataset import load_site
from pharmafl.training.multitask import MultiTaskTrainer, TrainConfig


@pytest.fixture(scope="module")
def site(chembl_small):
    return load_site(str(chembl_small / "site-1"))


def test_training_folds_exclude_test_and_validation(site):
    trainer = MultiTaskTrainer(site, TrainConfig(validation_fold=1), [32])
    folds = set(np.unique(site.folds[trainer.train_rows]))
    assert folds and not folds & {trainer.test_fold, 1}
    with pytest.raises(ValueError, match="test fold"):
        MultiTaskTrainer(site, TrainConfig(validation_fold=trainer.test_fold), [32])


def test_test_fold_scores_exactly_the_tasks_passing_the_evaluation_quorum(site):
    result = MultiTaskTrainer(site, TrainConfig(), [32]).evaluate()
    assert result["tasks_evaluated"] == int(site.eval_task_mask.sum()) > 0
    assert set(result["per_task"]) == set(site.tasks.loc[site.eval_task_mask, "task_id"])


def test_training_learns(site):
    trainer = MultiTaskTrainer(site, TrainConfig(batch_size=64), [64])
    before = trainer.evaluate(1)["auc_roc"]
    steps = trainer.train(epochs=3)
    assert steps == 3 * int(np.ceil(len(trainer.train_rows) / 64))
    assert trainer.evaluate(1)["auc_roc"] > before + 0.05


def test_same_seed_same_model(site):
    first, second = (MultiTaskTrainer(site, TrainConfig(seed=3), [16]) for _ in range(2))
    first.train(epochs=1)
    second.train(epochs=1)
    for name, value in first.trunk_weights().items():
        np.testing.assert_array_equal(value, second.trunk_weights()[name])
