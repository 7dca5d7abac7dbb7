"""Executor for MELLODDY-style multi-task training: global trunk in, trunk update out, head stays home."""

from __future__ import annotations

import json
import os

import torch
from nvflare.apis.dxo import DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.core.settings import settings
from pharmafl.flare.site_executor import SiteTrainingExecutor, site_data_dir
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.model import TrunkConfig
from pharmafl.multitask.predict import MODEL_CARD, model_card
from pharmafl.multitask.train import SETTINGS, MultiTaskTrainer, TrainConfig
from pharmafl.privacy.dp_sgd import DPConfig

HEAD_FILE = "head.pt"
FINAL_MODEL_FILE = "local_model.pt"


class MultiTaskExecutor(SiteTrainingExecutor):
    upload_kind = DataKind.WEIGHT_DIFF
    streamed_metrics = ("auc_roc", "auc_pr")
    data_kind = "chem"  # trains on `pharmafl prepare chem` folders (checked before the simulator starts)

    #: the setting groups of the executor's arguments, each a dataclass holding its defaults
    SETTINGS = SETTINGS

    def __init__(
        self,
        data_root: str = "",
        training: dict | None = None,
        trunk: dict | None = None,
        dp: dict | None = None,
        upload: str = "trunk",
        log_writer_id: str = "log_writer",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
    ):
        """Train the shared trunk with this site's private head.

        Args:
            data_root: folder holding one prepared folder per site (``pharmafl prepare chem``);
                empty means the ``PHARMAFL_DATA`` environment variable. ``$VARS`` and ``~`` expand.
            training: local training settings, the ``TrainConfig`` fields that differ from its defaults
                (e.g. ``{"dropout": 0.5}``); a positive ``regression_weight`` trains the site's private
                regression head next to its classification head.
            trunk: the ``TrunkConfig`` the server's model was built with (its job builder passes the same one to
                both); the global trunk a site receives must have this geometry.
            dp: DP-SGD at this site, the ``DPConfig`` fields (``target_epsilon`` and/or ``noise_multiplier``,
                ``max_grad_norm``, ``delta``, ``epochs``, ``accountant``); None or empty trains without DP. The epsilon
                spent streams to TensorBoard as ``privacy/epsilon`` and is saved with the site's model; a site whose
                budget is spent stops training and says so.
            upload: ``trunk`` (default: only ``trunk.*`` leaves the executor) or ``all`` (trunk and
                head; for testing that a site's privacy filter removes the head).
            log_writer_id: id of a FLARE ``TBWriter`` component; metrics stream to the server's
                TensorBoard through it when present.
        """
        super().__init__(data_root, log_writer_id, train_task_name, validate_task_name)
        if upload not in ("trunk", "all"):
            raise ValueError(f"upload must be 'trunk' or 'all', got {upload!r}")
        # the arguments as given (FLARE's Job API exports a component from its attributes), then as settings
        self.training, self.trunk, self.dp = training, trunk, dp
        self.config = settings(TrainConfig, training, "training")
        self.trunk_config = settings(TrunkConfig, trunk, "trunk")
        self.dp_config = settings(DPConfig, dp, "dp")
        self.upload = upload
        self.global_trunk: dict = {}

    def prepare(self, global_weights: dict, fl_ctx: FLContext) -> MultiTaskTrainer:
        if not global_weights:
            raise ValueError("the server sent no global trunk")
        trainer = self.trainer or self._new_trainer(fl_ctx)
        trainer.load_trunk(global_weights)
        self.global_trunk = global_weights
        return trainer

    def train_round(self, trainer: MultiTaskTrainer, fl_ctx: FLContext, abort_signal: Signal) -> tuple[int, dict]:
        steps = trainer.train(should_stop=lambda: abort_signal.triggered, progress=self.progress)
        torch.save(trainer.head_state(), os.path.join(self.run_dir, HEAD_FILE))
        if trainer.budget is not None:
            self.record_privacy(trainer.budget, fl_ctx)
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
        if trainer.budget is not None:
            card["privacy"] = trainer.budget.summary()
        with open(os.path.join(self.run_dir, MODEL_CARD), "w") as f:
            json.dump(card, f, indent=2)
        self.log_info(fl_ctx, f"saved this site's final model (trunk + private head) to {path}, for `pharmafl predict`")

    def _new_trainer(self, fl_ctx: FLContext) -> MultiTaskTrainer:
        site = fl_ctx.get_identity_name()
        data = load_site(site_data_dir(self.data_root, site))
        self.trainer = MultiTaskTrainer(data, self.config, self.trunk_config, self.dp_config)
        head_path = os.path.join(self.run_dir, HEAD_FILE)
        if os.path.exists(head_path):  # resume: the site's head survives a restart of the run
            self.trainer.load_head(torch.load(head_path))
        if self.trainer.budget is not None:
            self.resume_privacy(self.trainer.budget, fl_ctx)
        self.log_info(
            fl_ctx,
            f"{site}: {data.X.shape[0]} compounds, {data.n_tasks} tasks, "
            f"trunk {self.trunk_config.n_features}->{list(self.trunk_config.hidden_sizes)}",
        )
        return self.trainer
