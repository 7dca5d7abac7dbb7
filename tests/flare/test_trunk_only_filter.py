import json
import math
from unittest.mock import MagicMock

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace

from pharmafl.core.report import SITE_METRICS_FILE
from pharmafl.flare.trunk_only_filter import TrunkOnlyFilter, split_metrics

TASK_IDS = ("CHEMBL1614421_6.5", "pharma-a:assay-0042", "secret_target_x")


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


def _validation_result() -> dict:
    """What MultiTaskExecutor's ``validate`` returns: test-fold means, per-task AUCs, validation-fold means."""
    per_task = {task: {"auc_roc": 0.7 + i / 10, "auc_pr": 0.4 + i / 10} for i, task in enumerate(TASK_IDS)}
    return {
        "auc_roc": 0.8,
        "auc_pr": np.float64(0.5),
        "tasks_evaluated": 3,
        "per_task": per_task,
        "validation": {"auc_roc": 0.75, "auc_pr": float("nan"), "tasks_evaluated": 2},
    }


def _site_ctx(tmp_path, job_id="job-7"):
    for folder in ("startup", "local"):
        (tmp_path / folder).mkdir(exist_ok=True)
    engine = MagicMock()
    engine.get_workspace.return_value = Workspace(root_dir=str(tmp_path), site_name="pharma-a")
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=True)
    return ctx


def test_metrics_leave_without_task_ids_and_stay_in_full_at_the_site(tmp_path):
    ctx = _site_ctx(tmp_path)
    shareable = DXO(data_kind=DataKind.METRICS, data=_validation_result()).to_shareable()
    assert all(task in str(shareable) for task in TASK_IDS)  # what the server would have received
    filtered = TrunkOnlyFilter().process(shareable, ctx)
    for task in TASK_IDS:
        assert task not in str(filtered)
    result = from_shareable(filtered)
    assert set(result.data) == {"auc_roc", "auc_pr", "tasks_evaluated", "validation"}
    assert result.data["auc_pr"] == 0.5 and result.data["validation"]["tasks_evaluated"] == 2
    saved = json.loads((tmp_path / "job-7" / SITE_METRICS_FILE).read_text())
    assert set(saved["per_task"]) == set(TASK_IDS) and saved["per_task"][TASK_IDS[2]]["auc_pr"] == pytest.approx(0.6)
    assert math.isnan(saved["validation"]["auc_pr"])


def test_a_second_pass_keeps_the_full_site_file(tmp_path):
    # A POC site runs the scope's TrunkOnlyFilter and the job's: the second sees nothing to remove.
    ctx = _site_ctx(tmp_path)
    shareable = DXO(data_kind=DataKind.METRICS, data=_validation_result()).to_shareable()
    TrunkOnlyFilter().process(TrunkOnlyFilter().process(shareable, ctx), ctx)
    assert set(json.loads((tmp_path / "job-7" / SITE_METRICS_FILE).read_text())["per_task"]) == set(TASK_IDS)


@pytest.mark.parametrize(
    "leak",
    [
        {"CHEMBL1614421_6.5": 0.7},  # a scalar keyed by a task id
        {"auc_pr": {"CHEMBL1614421_6.5": 0.7}},  # one level, keyed by a task id
        {"validation": {"per_task": {"CHEMBL1614421_6.5": {"auc_pr": 0.7}}}},
        {"tasks": ["CHEMBL1614421_6.5"]},
        {"auc_roc": "CHEMBL1614421_6.5"},
    ],
)
def test_only_named_aggregates_leave(leak):
    kept, removed = split_metrics({"auc_pr": 0.5, **leak}, ("auc_roc", "auc_pr", "validation"))
    assert "CHEMBL1614421_6.5" not in json.dumps(kept) and removed == 1


def test_metrics_without_anything_to_remove_pass_untouched():
    shareable = DXO(data_kind=DataKind.METRICS, data={"auc_pr": 0.5, "validation": {"auc_pr": 0.4}}).to_shareable()
    result = from_shareable(TrunkOnlyFilter().process(shareable, FLContext()))
    assert result.data == {"auc_pr": 0.5, "validation": {"auc_pr": 0.4}}
    assert "TrunkOnlyFilter" not in (result.get_filter_history() or [])


def test_metrics_are_stripped_even_without_a_run_folder():
    shareable = DXO(data_kind=DataKind.METRICS, data=_validation_result()).to_shareable()
    assert TASK_IDS[0] not in str(TrunkOnlyFilter().process(shareable, FLContext()))


def test_rejects_empty_prefix_and_bad_metric_names():
    with pytest.raises(ValueError):
        TrunkOnlyFilter(allowed_prefix="")
    with pytest.raises(ValueError):
        TrunkOnlyFilter(metric_names=["auc_pr", ""])
