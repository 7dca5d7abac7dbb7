"""Server-side store of a model given as named numpy arrays (the global LoRA adapter), and its locator.

The global adapter starts empty: every site builds the same initial adapter from the same seed, and
the first aggregation fills the store. Saved as ``<run_dir>/app_server/global_state.npz``.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.model_persistor import ModelPersistor

from pharmafl.core.paths import STATE_FILE

MODEL_NAME = "global_state"


class NumpyStatePersistor(ModelPersistor):
    def __init__(self, file_name: str = STATE_FILE):
        """Keep the global model as named arrays in ``<app dir>/<file_name>`` (empty until the first round).

        Args:
            file_name: file in the server's app folder.
        """
        super().__init__()
        self.file_name = file_name

    def _path(self, fl_ctx: FLContext) -> str:
        app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
        return os.path.join(app_dir, self.file_name)

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        path = self._path(fl_ctx)
        weights = {}
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as stored:
                weights = {name: stored[name] for name in stored.files}
        return make_model_learnable(weights, {})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = model.get(ModelLearnableKey.WEIGHTS) or {}
        np.savez(self._path(fl_ctx), **{name: np.asarray(value) for name, value in weights.items()})

    def get_model_inventory(self, fl_ctx: FLContext) -> dict:
        return {}


class NumpyStateLocator(ModelLocator):
    def __init__(self, persistor_id: str = "persistor"):
        """Hands the persisted global state to FLARE's GlobalModelEval for the final validation.

        Args:
            persistor_id: id of the ``NumpyStatePersistor`` component.
        """
        super().__init__()
        self.persistor_id = persistor_id

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        return [MODEL_NAME]

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        weights = persistor.load_model(fl_ctx)[ModelLearnableKey.WEIGHTS]
        return DXO(data_kind=DataKind.WEIGHTS, data=weights)
