from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from pharmafl.flare.esm_lora_executor import FINAL_STATE_FILE, ESMLoRAExecutor

from .conftest import task

SMALL = {"batch_size": 4, "local_steps": 3, "max_length": 64, "learning_rate": 1e-2}
LORA = {"rank": 4, "alpha": 8}


def started(fl_ctx, data_root, model_config, training=None, **kwargs) -> ESMLoRAExecutor:
    executor = ESMLoRAExecutor(
        data_root=str(data_root),
        model_config=model_config,
        training={**SMALL, **(training or {})},
        lora=LORA,
        **kwargs,
    )
    executor.handle_event(EventType.START_RUN, fl_ctx)
    return executor


def test_train_uploads_the_lora_state_and_streams_metrics(fl_ctx, gpsite_small, tiny_esm_config):
    executor = started(fl_ctx, gpsite_small, tiny_esm_config)
    result = executor.execute("train", task({}), fl_ctx, Signal())  # round 0: no global state yet
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHTS
    initial = executor.trainer.state()
    assert set(dxo.data) == set(initial)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 3
    assert any(np.abs(v).sum() > 0 for k, v in dxo.data.items() if k.endswith(".lora_B.weight"))
    tags = {call.args[0] for call in fl_ctx.get_engine().get_component.return_value.add_scalar.call_args_list}
    assert {"test/f1", "test/mcc", "common/f1", "common/auc_roc"} <= tags

    # Later rounds load the global state the server sends before working on it.
    zeroed = {k: np.zeros_like(v) if k.endswith(".lora_B.weight") else v for k, v in dxo.data.items()}
    result = executor.execute("validate", task(zeroed, round_number=1), fl_ctx, Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert all(np.array_equal(executor.trainer.state()[k], v) for k, v in zeroed.items())

    executor.handle_event(EventType.END_RUN, fl_ctx)  # the site keeps its final adapter and head
    with np.load(Path(executor.run_dir) / FINAL_STATE_FILE) as saved:
        assert set(saved.files) == set(zeroed)


def test_upload_delta_sends_module_deltas(fl_ctx, gpsite_small, tiny_esm_config):
    executor = started(fl_ctx, gpsite_small, tiny_esm_config, upload="delta")
    dxo = from_shareable(executor.execute("train", task({}), fl_ctx, Signal()))
    state = executor.trainer.state()
    modules = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    assert set(dxo.data) == {m + ".delta" for m in modules} | {k for k in state if ".lora_" not in k}
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) > 0


def test_validate_returns_site_and_common_metrics(fl_ctx, gpsite_small, tiny_esm_config):
    executor = started(fl_ctx, gpsite_small, tiny_esm_config)
    weights = from_shareable(executor.execute("train", task({}), fl_ctx, Signal())).data
    dxo = from_shareable(executor.execute("validate", task(weights), fl_ctx, Signal()))
    assert dxo.data_kind == DataKind.METRICS
    assert set(dxo.data) == {"site", "common"}
    for metrics in dxo.data.values():
        assert {"accuracy", "precision", "recall", "f1", "mcc", "auc_roc"} <= set(metrics)
        assert 0.0 <= metrics["f1"] <= 1.0


def test_bad_input_fails_cleanly(fl_ctx, gpsite_small, tiny_esm_config, tmp_path):
    missing = started(fl_ctx, tmp_path / "nowhere", tiny_esm_config)
    assert missing.execute("train", task({}), fl_ctx, Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    no_model = started(fl_ctx, gpsite_small, None, model=str(tmp_path / "no_such_model"))
    assert no_model.execute("train", task({}), fl_ctx, Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    executor = started(fl_ctx, gpsite_small, tiny_esm_config)
    wrong = task({"not.a.lora.key": np.zeros(2, np.float32)})
    assert executor.execute("train", wrong, fl_ctx, Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert executor.execute("other", task({}), fl_ctx, Signal()).get_return_code() == ReturnCode.TASK_UNKNOWN
    with pytest.raises(ValueError):
        ESMLoRAExecutor(upload="both")


@pytest.mark.parametrize("optimizer_state, moments_kept", [("keep", True), ("reset", False)])
def test_optimizer_moments_across_rounds(fl_ctx, gpsite_small, tiny_esm_config, optimizer_state, moments_kept):
    executor = started(fl_ctx, gpsite_small, tiny_esm_config, optimizer_state=optimizer_state)
    weights = from_shareable(executor.execute("train", task({}), fl_ctx, Signal())).data
    assert executor.trainer.optimizer.state  # AdamW built moments in round 0
    executor.prepare(weights, fl_ctx)  # the next round's global model arrives
    assert bool(executor.trainer.optimizer.state) == moments_kept
    with pytest.raises(ValueError, match="optimizer_state"):
        ESMLoRAExecutor(optimizer_state="forget")
