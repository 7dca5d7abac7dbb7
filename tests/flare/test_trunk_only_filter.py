import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

from pharmafl.flare.trunk_only_filter import TrunkOnlyFilter


def test_removes_everything_but_the_trunk():
    data = {
        "trunk.input.weight": np.ones((3, 2)),
        "trunk.input_bias": np.ones(2),
        "head.weight": np.ones((4, 2)),
        "head.bias": np.ones(4),
    }
    shareable = DXO(data_kind=DataKind.WEIGHT_DIFF, data=data).to_shareable()
    result = from_shareable(TrunkOnlyFilter().process(shareable, FLContext()))
    assert sorted(result.data) == ["trunk.input.weight", "trunk.input_bias"]
    np.testing.assert_array_equal(result.data["trunk.input_bias"], 1.0)
    assert "TrunkOnlyFilter" in result.get_filter_history()


def test_leaves_metrics_alone():
    shareable = DXO(data_kind=DataKind.METRICS, data={"auc_pr": 0.5}).to_shareable()
    result = from_shareable(TrunkOnlyFilter().process(shareable, FLContext()))
    assert result.data == {"auc_pr": 0.5}


def test_rejects_empty_prefix():
    with pytest.raises(ValueError):
        TrunkOnlyFilter(allowed_prefix="")
