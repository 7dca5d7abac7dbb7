import json
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from nvflare.apis.client import Client
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ServerCommandKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.shareable import ReservedHeaderKey
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG, FedAvgAggregator

SHAPES = {"trunk.input.weight": (6, 4), "trunk.input_bias": (4,)}
AS_AUTHENTICATED = object()  # contribution(): the client claims the name FLARE authenticated


def make_context(round_number=0, global_weights=None, run_dir=None):
    """A server context; with ``run_dir``, an engine whose run folder it is (contributions.jsonl lands there)."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=True)
    if global_weights is not None:
        model = ModelLearnable()
        model[ModelLearnableKey.WEIGHTS] = global_weights
        model[ModelLearnableKey.META] = {}
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=True)
    if run_dir is not None:
        engine = MagicMock()
        engine.get_workspace.return_value.get_run_dir.return_value = str(run_dir)
        fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
        fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=True, sticky=True)
    return fl_ctx


def as_flare_delivers(shareable, site, task_id="task-1"):
    """What FLARE's server adds to a submission before ScatterAndGather hands it to the aggregator.

    The command agent sets ``FL_CLIENT`` to the ``Client`` it found for the session token; the server runner
    sets the task id. The peer props, in contrast, are whatever the client wrote.
    """
    if site is not None:
        shareable.set_header(ServerCommandKey.FL_CLIENT, Client(site, token=f"token-of-{site}"))
    if task_id is not None:
        shareable.set_header(ReservedHeaderKey.TASK_ID, task_id)
    return shareable


def contribution(
    site, data, steps=10, round_number=0, kind=DataKind.WEIGHT_DIFF, claimed=AS_AUTHENTICATED, task_id="task-1"
):
    """A result from the client FLARE authenticated as ``site`` (None: no authenticated sender) claiming ``claimed``."""
    shareable = DXO(data_kind=kind, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    claimed = site if claimed is AS_AUTHENTICATED else claimed
    if claimed is not None:
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: claimed})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return as_flare_delivers(shareable, site, task_id)


def update(value, dtype=np.float32):
    return {name: np.full(shape, value, dtype=dtype) for name, shape in SHAPES.items()}


def global_weights(dtype=np.float32):
    return {name: np.zeros(shape, dtype=dtype) for name, shape in SHAPES.items()}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / CONTRIBUTIONS_LOG).read_text().splitlines()]


def test_weighted_by_steps():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights())
    assert aggregator.accept(contribution("site-1", update(1.0), steps=10), fl_ctx)
    assert aggregator.accept(contribution("site-2", update(4.0), steps=30), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    assert result.data_kind == DataKind.WEIGHT_DIFF
    np.testing.assert_allclose(result.data["trunk.input_bias"], np.full(4, (10 * 1 + 30 * 4) / 40))


def test_bad_contributions_are_excluded_and_the_round_completes():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(round_number=3, global_weights=global_weights())
    nan_update = update(1.0)
    nan_update["trunk.input.weight"][0, 0] = np.nan
    wrong_shape = update(1.0)
    wrong_shape["trunk.input.weight"] = np.ones((5, 4), dtype=np.float32)
    with_head = {**update(1.0), "head.weight": np.ones((2, 4), dtype=np.float32)}
    missing_key = {"trunk.input.weight": np.ones((6, 4), dtype=np.float32)}
    rejected = [
        contribution("site-1", nan_update, round_number=3),
        contribution("site-2", wrong_shape, round_number=3),
        contribution("site-3", with_head, round_number=3),
        contribution("site-4", missing_key, round_number=3),
        contribution("site-5", update(9.0), round_number=2),  # stale
        contribution("site-6", update(9.0), round_number=3, kind=DataKind.WEIGHTS),
        contribution("site-7", update(9.0), steps=float("nan"), round_number=3),
    ]
    for shareable in rejected:
        assert not aggregator.accept(shareable, fl_ctx)
    assert aggregator.accept(contribution("site-8", update(2.0), round_number=3), fl_ctx)
    assert not aggregator.accept(contribution("site-8", update(7.0), round_number=3), fl_ctx)  # second one
    result = from_shareable(aggregator.aggregate(fl_ctx))
    for value in result.data.values():
        np.testing.assert_array_equal(value, 2.0)  # only the valid contribution counts
    reasons = [r["reason"] for r in aggregator.rejections]
    assert len(reasons) == 8
    assert any("NaN" in r for r in reasons) and any("shape" in r for r in reasons)
    assert any("stale" in r for r in reasons) and any("second contribution" in r for r in reasons)
    assert any("head.weight" in r for r in reasons)


def test_no_valid_contribution_leaves_the_model_unchanged():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights())
    assert not aggregator.accept(contribution("site-1", {"x": np.ones(2)}), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    assert result.data == {}


def test_reset_forgets_the_round():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights())
    assert aggregator.accept(contribution("site-1", update(1.0)), fl_ctx)
    aggregator.reset(fl_ctx)
    assert aggregator.accept(contribution("site-1", update(3.0)), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    np.testing.assert_array_equal(result.data["trunk.input_bias"], 3.0)


@pytest.mark.parametrize(
    "steps",
    [True, np.bool_(True), 1e308, float("inf"), float("nan"), 0, 0.0, -5, "10", None, 10**400, 1e6 + 1, 1j, [10]],
)
def test_a_client_cannot_weigh_in_with_an_absurd_or_non_numeric_weight(tmp_path, steps):
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights(), run_dir=tmp_path)
    assert not aggregator.accept(contribution("site-1", update(100.0), steps=steps), fl_ctx)
    assert aggregator.accept(contribution("site-2", update(1.0), steps=10), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    np.testing.assert_array_equal(result.data["trunk.input_bias"], 1.0)  # the bad weight moved nothing
    rejected = records(tmp_path)[0]
    assert rejected["site"] == "site-1" and not rejected["accepted"] and "invalid weight" in rejected["reason"]


@pytest.mark.parametrize("steps", [np.int64(7), np.float32(2.5), np.uint8(3), 1e6, 1])
def test_numpy_scalars_and_the_largest_allowed_weight_are_accepted(steps):
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights())
    assert aggregator.accept(contribution("site-1", update(1.0), steps=steps), fl_ctx)
    meta = from_shareable(aggregator.aggregate(fl_ctx)).meta
    assert meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == float(steps)


def test_max_weight_caps_the_weight():
    aggregator = FedAvgAggregator(max_weight=100)
    fl_ctx = make_context(global_weights=global_weights())
    assert not aggregator.accept(contribution("site-1", update(1.0), steps=101), fl_ctx)
    assert aggregator.accept(contribution("site-2", update(1.0), steps=100), fl_ctx)


@pytest.mark.parametrize("max_weight", [0, -1, float("inf"), float("nan"), True, "1e6", None, 10**400])
def test_invalid_max_weight_is_refused_up_front(max_weight):
    with pytest.raises(ValueError, match="max_weight"):
        FedAvgAggregator(max_weight=max_weight)


def _bad_arrays():
    shape = SHAPES["trunk.input.weight"]
    return {
        "bool": np.ones(shape, dtype=bool),
        "int8": np.ones(shape, dtype=np.int8),
        "uint8": np.ones(shape, dtype=np.uint8),
        "int64": np.ones(shape, dtype=np.int64),
        "complex": np.ones(shape, dtype=np.complex128),
        "object": np.full(shape, 1.0, dtype=object),
        "torch": torch.ones(shape),
        "list": np.ones(shape).tolist(),
        "masked": np.ma.masked_array(np.ones(shape), mask=np.ones(shape, dtype=bool)),
        "big-endian": np.ones(shape, dtype=">f4"),
    }


@pytest.mark.parametrize("kind", sorted(_bad_arrays()))
def test_only_float16_32_64_numpy_arrays_are_accepted(tmp_path, kind):
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights(), run_dir=tmp_path)
    bad = {**update(1.0), "trunk.input.weight": _bad_arrays()[kind]}
    assert not aggregator.accept(contribution("site-1", bad), fl_ctx)
    [record] = records(tmp_path)
    assert not record["accepted"] and "'trunk.input.weight'" in record["reason"]
    assert "dtype" in record["reason"] or "not a numpy float array" in record["reason"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_contributions_are_averaged_in_float64_and_returned_in_the_global_dtype(dtype):
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights(np.float32))
    # float16 near its largest value times a weight of 1e6 overflows unless it is widened before weighting.
    assert aggregator.accept(contribution("site-1", update(60000.0, dtype), steps=1e6), fl_ctx)
    assert aggregator.accept(contribution("site-2", update(0.5, np.float64), steps=1), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx)).data
    expected = (1e6 * 60000.0 + 0.5) / (1e6 + 1)
    for value in result.values():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_without_a_global_model_the_first_accepted_update_sets_the_dtype():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context()
    assert aggregator.accept(contribution("site-2", update(1.0, np.float64)), fl_ctx)  # first in, last by name
    assert aggregator.accept(contribution("site-1", update(2.0, np.float16)), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx)).data
    assert all(value.dtype == np.float64 for value in result.values())


def test_a_float64_contribution_that_would_overflow_the_float32_model_is_refused():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights(np.float32))
    assert not aggregator.accept(contribution("site-1", update(1e39, np.float64)), fl_ctx)
    assert aggregator.accept(contribution("site-2", update(1.0)), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx)).data
    assert all(np.all(np.isfinite(value)) for value in result.values())
    assert "float32 range" in aggregator.rejections[0]["reason"]


def test_the_contributor_is_the_client_flare_authenticated_not_the_name_it_claims(tmp_path):
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights(), run_dir=tmp_path)
    assert not aggregator.accept(contribution("site-1", update(9.0), claimed="site-2"), fl_ctx)
    assert not aggregator.accept(contribution(None, update(9.0), claimed="site-3"), fl_ctx)
    assert aggregator.accept(contribution("site-4", update(1.0), claimed=None), fl_ctx)  # no claim: FLARE's word
    spoofed, unauthenticated, accepted = records(tmp_path)
    assert spoofed["site"] == "site-1" and "claims to be 'site-2' but FLARE authenticated 'site-1'" in spoofed["reason"]
    assert unauthenticated["site"] == "site-3" and not unauthenticated["authenticated"]
    assert "no authenticated sender" in unauthenticated["reason"]
    assert accepted["site"] == "site-4" and accepted["authenticated"] is True and accepted["accepted"]


def test_a_client_cannot_contribute_twice_under_invented_names():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights())
    assert aggregator.accept(contribution("site-1", update(1.0)), fl_ctx)
    for invented in ("site-7", "site-8"):
        assert not aggregator.accept(contribution("site-1", update(50.0), claimed=invented), fl_ctx)
    assert not aggregator.accept(contribution("site-1", update(50.0), claimed=None), fl_ctx)
    assert "second contribution" in aggregator.rejections[-1]["reason"]
    result = from_shareable(aggregator.aggregate(fl_ctx)).data
    np.testing.assert_array_equal(result["trunk.input_bias"], 1.0)


def test_a_result_without_the_server_runners_task_id_is_refused():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights())
    assert not aggregator.accept(contribution("site-1", update(1.0), task_id=None), fl_ctx)
    assert "no task id" in aggregator.rejections[0]["reason"]


def test_a_late_or_forged_task_result_is_refused_through_flares_own_submission_path(tmp_path):
    """FLARE's WFCommServer finds no standing task for the id, fires the event, then hands the result on."""
    aggregator = FedAvgAggregator()
    fl_ctx = make_context(global_weights=global_weights(), run_dir=tmp_path)
    fl_ctx.get_engine().fire_event.side_effect = aggregator.handle_event
    communicator = WFCommServer()
    communicator.controller = MagicMock()
    # What ScatterAndGather.process_result_of_unknown_task does with a train result: aggregator.accept.
    communicator.controller.process_result_of_unknown_task.side_effect = (
        lambda client, task_name, task_id, result, ctx: aggregator.accept(result, ctx)
    )
    late = contribution("site-1", update(5.0), task_id="no-such-task")
    communicator.process_submission(Client("site-1", "token"), "train", "no-such-task", late, fl_ctx)
    assert communicator.controller.process_result_of_unknown_task.called
    [record] = records(tmp_path)
    assert not record["accepted"] and "not standing" in record["reason"] and "no-such-task" in record["reason"]
    assert aggregator.accept(contribution("site-1", update(1.0)), fl_ctx)  # the mark ended with the late result


def test_the_unknown_task_mark_covers_only_that_submission():
    aggregator = FedAvgAggregator()
    late_ctx, standing_ctx = (
        make_context(global_weights=global_weights()),
        make_context(global_weights=global_weights()),
    )
    aggregator.handle_event(EventType.BEFORE_PROCESS_RESULT_OF_UNKNOWN_TASK, late_ctx)
    assert not aggregator.accept(contribution("site-1", update(1.0)), late_ctx)
    assert aggregator.accept(contribution("site-2", update(1.0)), standing_ctx)


def test_a_payload_with_keys_of_mixed_types_is_refused_not_a_crash():
    aggregator = FedAvgAggregator()
    fl_ctx = make_context()
    assert not aggregator.accept(contribution("site-1", {1: np.ones(2), "a": np.ones(2)}), fl_ctx)
    assert "not strings" in aggregator.rejections[0]["reason"]
