import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from pharmafl.flare.fedavg_aggregator import FedAvgAggregator

SHAPES = {"trunk.input.weight": (6, 4), "trunk.input_bias": (4,)}


def make_context(round_number=0, global_weights=None):
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=True)
    if global_weights is not None:
        model = ModelLearnable()
        model[ModelLearnableKey.WEIGHTS] = global_weights
        model[ModelLearnableKey.META] = {}
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, model, private=True, sticky=True)
    return fl_ctx


def contribution(site, data, steps=10, round_number=0, kind=DataKind.WEIGHT_DIFF):
    shareable = DXO(data_kind=kind, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return shareable


def update(value):
    return {name: np.full(shape, value, dtype=np.float32) for name, shape in SHAPES.items()}


def global_weights():
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}


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
