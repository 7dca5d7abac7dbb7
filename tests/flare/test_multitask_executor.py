import numpy as np
import pytest
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from pharmafl.flare.multitask_executor import FINAL_MODEL_FILE, HEAD_FILE, MultiTaskExecutor
from pharmafl.multitask.model import TrunkModel

from .conftest import task

HIDDEN = [32]
TRUNK = {"hidden_sizes": HIDDEN}


def global_trunk(n_features=32000, hidden=HIDDEN):
    return {k: v.numpy().copy() for k, v in TrunkModel(n_features, hidden).state_dict().items()}


@pytest.fixture
def started(fl_ctx, tmp_path, chembl_small):
    run_dir = tmp_path
    log_writer = fl_ctx.get_engine().get_component.return_value
    executor = MultiTaskExecutor(
        data_root=str(chembl_small), training={"local_epochs": 1, "batch_size": 256}, trunk=TRUNK
    )
    executor.handle_event(EventType.START_RUN, fl_ctx)
    return executor, fl_ctx, run_dir, log_writer


def test_train_returns_only_the_trunk_update_and_keeps_the_head(started):
    executor, fl_ctx, run_dir, log_writer = started
    weights = global_trunk()
    result = executor.execute("train", task(weights), fl_ctx, Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert set(dxo.data) == set(weights)  # no head.* leaves the executor
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) > 0
    assert any(np.abs(v).sum() > 0 for v in dxo.data.values())  # it trained
    assert (run_dir / HEAD_FILE).is_file()
    tags = {call.args[0] for call in log_writer.add_scalar.call_args_list}
    assert {"test/auc_pr", "validation/auc_pr"} <= tags


def test_head_persists_across_rounds_and_the_run(started):
    executor, fl_ctx, run_dir, _ = started
    executor.execute("train", task(global_trunk()), fl_ctx, Signal())
    head_after_round_0 = executor.trainer.head_state()
    executor.execute("train", task(global_trunk(), round_number=1), fl_ctx, Signal())
    head_after_round_1 = executor.trainer.head_state()
    # The head is trained on from where it was, not re-initialised each round.
    assert any(not np.allclose(head_after_round_0[k], head_after_round_1[k]) for k in head_after_round_0)
    executor.handle_event(EventType.END_RUN, fl_ctx)
    assert (run_dir / FINAL_MODEL_FILE).is_file()


def test_validate_reports_per_task_auc(started):
    executor, fl_ctx, _, _ = started
    executor.execute("train", task(global_trunk()), fl_ctx, Signal())
    dxo = from_shareable(executor.execute("validate", task(global_trunk()), fl_ctx, Signal()))
    assert dxo.data_kind == DataKind.METRICS
    assert dxo.data["tasks_evaluated"] == len(dxo.data["per_task"]) > 0
    for metrics in dxo.data["per_task"].values():
        assert 0.0 <= metrics["auc_roc"] <= 1.0 and 0.0 <= metrics["auc_pr"] <= 1.0


def test_upload_all_sends_the_head_too(tmp_path, chembl_small, started):
    _, fl_ctx, _, _ = started
    executor = MultiTaskExecutor(data_root=str(chembl_small), trunk=TRUNK, upload="all")
    executor.handle_event(EventType.START_RUN, fl_ctx)
    dxo = from_shareable(executor.execute("train", task(global_trunk()), fl_ctx, Signal()))
    assert any(k.startswith("head.") for k in dxo.data)


def test_mismatched_trunk_and_missing_data_fail_cleanly(started, tmp_path):
    executor, fl_ctx, _, _ = started
    result = executor.execute("train", task(global_trunk(n_features=1024)), fl_ctx, Signal())
    assert result.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    missing = MultiTaskExecutor(data_root=str(tmp_path / "nowhere"), trunk=TRUNK)
    missing.handle_event(EventType.START_RUN, fl_ctx)
    assert missing.execute("train", task(global_trunk()), fl_ctx, Signal()).get_return_code() == (
        ReturnCode.EXECUTION_EXCEPTION
    )
    assert executor.execute("other", task(global_trunk()), fl_ctx, Signal()).get_return_code() == (
        ReturnCode.TASK_UNKNOWN
    )


def test_regression_head_stays_home_and_predict_gives_its_values(started, chembl_small, tmp_path):
    from pharmafl.multitask.predict import MODEL_CARD, predict_smiles_file
    from pharmafl.multitask.train import predict_values

    _, fl_ctx, run_dir, _ = started
    executor = MultiTaskExecutor(
        data_root=str(chembl_small), training={"batch_size": 256, "regression_weight": 1.0}, trunk=TRUNK
    )
    executor.handle_event(EventType.START_RUN, fl_ctx)
    weights = global_trunk()
    dxo = from_shareable(executor.execute("train", task(weights), fl_ctx, Signal()))
    assert set(dxo.data) == set(weights)  # the regression head is private like the classification head
    trainer = executor.trainer
    regression_keys = {k for k in trainer.head_state() if k.startswith("regression_head.")}
    assert {"regression_head.linear.weight", "regression_head.mean", "regression_head.std"} <= regression_keys
    metrics = from_shareable(executor.execute("validate", task(weights), fl_ctx, Signal())).data
    regression = metrics["regression"]
    assert regression["tasks_evaluated"] == len(regression["per_task"]) > 0
    assert all(np.isfinite(m["rmse"]) and m["r2"] <= 1 for m in regression["per_task"].values())
    executor.handle_event(EventType.END_RUN, fl_ctx)

    # predict on the site's own test compounds gives the regression head's values, one column per task
    rows = trainer.data.rows_in_folds([trainer.test_fold])
    compounds = (chembl_small / "site-1" / "compounds.csv").read_text().splitlines()[1:]
    (tmp_path / "new.csv").write_text("smiles\n" + "\n".join(compounds[i] for i in rows) + "\n")
    predict_smiles_file(run_dir, tmp_path / "new.csv", tmp_path / "preds.csv")
    import json

    import pandas as pd

    card = json.loads((run_dir / MODEL_CARD).read_text())
    assert card["regression_tasks"] == trainer.regression_task_ids
    predicted = pd.read_csv(tmp_path / "preds.csv")[card["regression_tasks"]].to_numpy()
    np.testing.assert_allclose(predicted, predict_values(trainer.model, trainer.data.X, rows), rtol=1e-5, atol=1e-5)


def test_settings_come_from_their_dataclasses_and_unknown_ones_are_refused(chembl_small):
    from pharmafl.core.errors import InputError
    from pharmafl.multitask.train import TrainConfig

    executor = MultiTaskExecutor(data_root=str(chembl_small), training={"dropout": 0.5})
    assert executor.config == TrainConfig(dropout=0.5)  # every other default is TrainConfig's own
    with pytest.raises(InputError, match="unknown training setting hidden_sizes; the training settings are"):
        MultiTaskExecutor(training={"hidden_sizes": [32]})
    with pytest.raises(InputError, match="unknown trunk setting width"):
        MultiTaskExecutor(trunk={"width": 32})
