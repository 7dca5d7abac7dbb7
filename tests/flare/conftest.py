from unittest.mock import MagicMock

import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants


@pytest.fixture
def fl_ctx(tmp_path):
    """A client context for site-1: a mocked engine whose run folder is tmp_path and whose components
    (the TensorBoard log writer) are one MagicMock."""
    engine = MagicMock()
    engine.get_workspace.return_value.get_run_dir.return_value = str(tmp_path)
    engine.get_component.return_value = MagicMock()
    context = FLContext()
    context.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    context.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=True, sticky=True)
    context.set_prop(ReservedKey.RUN_NUM, "job-1", private=True, sticky=True)
    return context


def task(weights, round_number=0):
    """A task as the server sends it: the global model's WEIGHTS and the round number."""
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_number)
    return shareable
