import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from pharmafl.core.errors import InputError
from pharmafl.flare.esm_lora_executor import FINAL_CARD_FILE, FINAL_STATE_FILE, ESMLoRAExecutor
from pharmafl.flare.site_executor import PRIVACY_BUDGET_SPENT, PRIVACY_FILE
from pharmafl.jobs import executor_args
from pharmafl.jobs.export import JobOptions, export_run_job
from pharmafl.privacy import accounting

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


def test_dp_records_its_spending_stops_at_the_budget_and_resumes_it(fl_ctx, gpsite_small, tiny_esm_config):
    target = accounting.epsilon(1.0, 1.0, 3, 1e-3) + 1e-6  # three steps fit; 38 chains, batch 64: Poisson rate 1
    dp = {"noise_multiplier": 1.0, "target_epsilon": target, "delta": 1e-3}
    training = {"batch_size": 64, "local_steps": 2, "max_length": 32}
    executor = started(fl_ctx, gpsite_small, tiny_esm_config, training, dp=dp)
    assert executor.dp == dp  # as given: FLARE's Job API exports the argument from the attribute
    dxo = from_shareable(executor.execute("train", task({}), fl_ctx, Signal()))
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 2 and dxo.data
    spent = json.loads((Path(executor.run_dir) / PRIVACY_FILE).read_text())
    assert spent["steps"] == 2 and 0 < spent["epsilon"] <= target and not spent["exhausted"]
    tags = {call.args[0] for call in fl_ctx.get_engine().get_component.return_value.add_scalar.call_args_list}
    assert "privacy/epsilon" in tags

    dxo = from_shareable(executor.execute("train", task(dxo.data, round_number=1), fl_ctx, Signal()))
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 1  # the budget ends the round after one step
    assert json.loads((Path(executor.run_dir) / PRIVACY_FILE).read_text())["exhausted"]
    weights = dxo.data
    reply = from_shareable(executor.execute("train", task(weights, round_number=2), fl_ctx, Signal()))
    assert reply.get_meta_prop(PRIVACY_BUDGET_SPENT) is True and reply.data == {}
    assert reply.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 0

    executor.handle_event(EventType.END_RUN, fl_ctx)  # the final adapter's card says what it cost
    card = json.loads((Path(executor.run_dir) / FINAL_CARD_FILE).read_text())
    assert card["privacy"]["steps"] == 3 and 0 < card["privacy"]["epsilon"] <= target
    assert card["privacy"]["privacy_unit"] == "one protein chain of this site"

    restarted = started(fl_ctx, gpsite_small, tiny_esm_config, training, dp=dp)  # same run folder: resumes
    reply = from_shareable(restarted.execute("train", task(weights, round_number=3), fl_ctx, Signal()))
    assert restarted.trainer.budget.steps == 3 and reply.get_meta_prop(PRIVACY_BUDGET_SPENT) is True


def test_dp_with_grad_noise_is_refused_and_a_target_alone_is_planned_over_the_rounds(tmp_path):
    with pytest.raises(InputError, match="grad_noise_std cannot be combined with DP-SGD"):
        ESMLoRAExecutor(training={"grad_noise_std": 0.1}, dp={"noise_multiplier": 1.0})
    options = JobOptions(num_rounds=4, settings={"dp.target_epsilon": 3.0})
    args = executor_args(export_run_job("esm2_lora_fedavg", tmp_path, options))
    assert args["dp"] == {"target_epsilon": 3.0, "epochs": 4}  # a DP epoch is one round of local_steps steps


def test_a_site_of_a_lower_rank_trains_its_own_rank_at_the_global_scaling(fl_ctx, gpsite_small, tiny_esm_config):
    """``site_ranks``: site-1 trains rank 2 under a rank-4 global adapter. It uploads rank-2 factors (``padded``:
    zero-padded to rank 4, the same product), applies the global alpha / r, takes the leading components of a
    global adapter, and its card records its rank."""
    from pharmafl.aggregation.fra_lora import find_lora_pairs, fra_lora_aggregate, leading_components

    executor = started(fl_ctx, gpsite_small, tiny_esm_config, site_ranks={"site-1": 2, "site-9": 4})
    own = from_shareable(executor.execute("train", task({}), fl_ctx, Signal())).data
    pairs = find_lora_pairs(own)
    assert pairs and all(own[a].shape[0] == 2 and own[b].shape[1] == 2 for a, b in pairs)
    scalings = {
        s["default"] for m in executor.trainer.model.modules() if isinstance(s := getattr(m, "scaling", None), dict)
    }
    assert scalings == {LORA["alpha"] / LORA["rank"]}

    # the global adapter (rank 4) from this site and another rank-2 one: the site trains on its leading 2 components
    rng = np.random.default_rng(0)
    other = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in own.items()}
    global_state = fra_lora_aggregate([own, other], [1.0, 1.0], rank=4).factors
    executor.execute("validate", task(global_state, round_number=1), fl_ctx, Signal())
    expected = leading_components(global_state, 2)
    assert all(np.allclose(executor.trainer.state()[k], v) for k, v in expected.items())

    executor.handle_event(EventType.END_RUN, fl_ctx)
    card = json.loads((Path(executor.run_dir) / FINAL_CARD_FILE).read_text())
    assert card["lora"]["rank"] == 2 and card["lora"]["alpha"] == LORA["alpha"] / 2

    padded = started(fl_ctx, gpsite_small, tiny_esm_config, site_ranks={"site-1": 2}, upload="padded")
    sent = from_shareable(padded.execute("train", task({}), fl_ctx, Signal())).data
    trained = padded.trainer.state()
    for a, b in pairs:
        assert sent[a].shape[0] == 4 and sent[b].shape[1] == 4
        np.testing.assert_allclose(sent[b] @ sent[a], trained[b] @ trained[a], atol=1e-6)
    with pytest.raises(ValueError, match="from 1 to lora.rank"):
        ESMLoRAExecutor(data_root=str(gpsite_small), model_config=tiny_esm_config, lora=LORA, site_ranks={"x": 8})
