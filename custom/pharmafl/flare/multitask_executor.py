"""Executor for MELLODDY-style multi-task training: global trunk in, trunk update out, head stays home."""

from __future__ import annotations

import json
import os

import torch
from nvflare.apis.dxo import DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.core.errors import InputError
from pharmafl.flare.site_executor import SiteTrainingExecutor, site_data_dir
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.model import trunk_geometry
from pharmafl.multitask.predict import MODEL_CARD, model_card
from pharmafl.multitask.train import MultiTaskTrainer, TrainConfig

HEAD_FILE = "head.pt"
FINAL_MODEL_FILE = "local_model.pt"


class MultiTaskExecutor(SiteTrainingExecutor):
    upload_kind = DataKind.WEIGHT_DIFF
    streamed_metrics = ("auc_roc", "auc_pr")
    data_kind = "chem"  # trains on `pharmafl prepare chem` folders (checked before the simulator starts)

    def __init__(
        self,
        data_root: str = "",
        dropout: float = 0.2,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        local_epochs: int = 1,
        validation_fold: int = 1,
        seed: int = 0,
        regression_weight: float = 0.0,
        upload: str = "trunk",
        log_writer_id: str = "log_writer",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
    ):
        """Train the shared trunk with this site's private head.

        The hidden layer sizes come from the global trunk the server sends, so the server's
        persistor is the one place they are configured.

        Args:
            data_root: folder holding one prepared folder per site (``pharmafl prepare chem``);
                empty means the ``PHARMAFL_DATA`` environment variable. ``$VARS`` and ``~`` expand.
            dropout, learning_rate, weight_decay, batch_size, local_epochs, validation_fold, seed,
                regression_weight: local training hyperparameters (see ``TrainConfig``); a positive
                ``regression_weight`` trains the site's private regression head next to its
                classification head.
            upload: ``trunk`` (default: only ``trunk.*`` leaves the executor) or ``all`` (trunk and
                head; for testing that a site's privacy filter removes the head).
            log_writer_id: id of a FLARE ``TBWriter`` component; metrics stream to the server's
                TensorBoard through it when present.
        """
        super().__init__(data_root, log_writer_id, train_task_name, validate_task_name)
        if upload not in ("trunk", "all"):
            raise ValueError(f"upload must be 'trunk' or 'all', got {upload!r}")
        self.config = TrainConfig(
            dropout=dropout,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            batch_size=batch_size,
            local_epochs=local_epochs,
            validation_fold=validation_fold,
            seed=seed,
            regression_weight=regression_weight,
        )
        self.upload = upload
        self.global_trunk: dict = {}

    def prepare(self, global_weights: dict, fl_ctx: FLContext) -> MultiTaskTrainer:
        if not global_weights:
            raise ValueError("the server sent no global trunk")
        trainer = self.trainer or self._new_trainer(global_weights, fl_ctx)
        trainer.load_trunk(global_weights)
        self.global_trunk = global_weights
        return trainer

    def train_round(self, trainer: MultiTaskTrainer, fl_ctx: FLContext, abort_signal: Signal) -> tuple[int, dict]:
        steps = trainer.train(should_stop=lambda: abort_signal.triggered, progress=self.progress)
        torch.save(trainer.head_state(), os.path.join(self.run_dir, HEAD_FILE))
        trunk = trainer.trunk_weights()
        update = {name: trunk[name] - self.global_trunk[name] for name in self.global_trunk}
        if self.upload == "all":
            update.update({k: v.numpy() for k, v in trainer.head_state().items()})
        return steps, update

    def evaluate(self, trainer: MultiTaskTrainer) -> dict[str, dict]:
        return {"test": trainer.evaluate(), "validation": trainer.evaluate(self.config.validation_fold)}

    def validation_result(self, metrics: dict[str, dict]) -> dict:
        # Per-task AUCs on the test fold, plus the validation-fold means.
        validation = {k: v for k, v in metrics["validation"].items() if k != "per_task"}
        return {**metrics["test"], "validation": validation}

    def save_final(self, trainer: MultiTaskTrainer, fl_ctx: FLContext) -> None:
        path = os.path.join(self.run_dir, FINAL_MODEL_FILE)
        torch.save(trainer.model.state_dict(), path)
        card = model_card(
            trainer.data, trainer.model.trunk.hidden_sizes, self.config.dropout, trainer.regression_task_ids
        )
        with open(os.path.join(self.run_dir, MODEL_CARD), "w") as f:
            json.dump(card, f, indent=2)
        self.log_info(fl_ctx, f"saved this site's final model (trunk + private head) to {path}, for `pharmafl predict`")

    def _new_trainer(self, global_trunk: dict, fl_ctx: FLContext) -> MultiTaskTrainer:
        site = fl_ctx.get_identity_name()
        data = load_site(site_data_dir(self.data_root, site))
        n_features, hidden_sizes = trunk_geometry(global_trunk)
        if n_features != data.n_features:
            raise InputError(
                f"the global trunk expects {n_features} fingerprint bits but {site}'s data has "
                f"{data.n_features}; prepare the data with --bits {n_features} or change the job"
            )
        self.trainer = MultiTaskTrainer(data, self.config, hidden_sizes)
        head_path = os.path.join(self.run_dir, HEAD_FILE)
        if os.path.exists(head_path):  # resume: the site's head survives a restart of the run
            self.trainer.load_head(torch.load(head_path))
        self.log_info(
            fl_ctx,
            f"{site}: {data.X.shape[0]} compounds, {data.n_tasks} tasks, trunk {n_features}->{hidden_sizes}",
        )
        return self.trainer
