"""Executor for MELLODDY-style multi-task training: global trunk in, trunk update out, head stays home."""

from __future__ import annotations

import os

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.chem.dataset import SiteData, load_site
from pharmafl.errors import UserError
from pharmafl.models.multitask import trunk_geometry
from pharmafl.training.multitask import MultiTaskTrainer, TrainConfig

DATA_ENV = "PHARMAFL_DATA"
HEAD_FILE = "head.pt"
FINAL_MODEL_FILE = "local_model.pt"


def site_data_dir(data_root: str, site: str) -> str:
    """Where a site's prepared data lives: ``<data_root>/<site>``, data_root from the job or $PHARMAFL_DATA."""
    root = os.path.expanduser(os.path.expandvars(data_root or os.environ.get(DATA_ENV, "")))
    if not root:
        raise UserError(f"no data location: set the executor's data_root or the {DATA_ENV} environment variable")
    return os.path.join(root, site)


class MultiTaskExecutor(Executor):
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
            dropout, learning_rate, weight_decay, batch_size, local_epochs, validation_fold, seed:
                local training hyperparameters (see ``TrainConfig``).
            upload: ``trunk`` (default: only ``trunk.*`` leaves the executor) or ``all`` (trunk and
                head; for testing that a site's privacy filter removes the head).
            log_writer_id: id of a FLARE ``TBWriter`` component; metrics stream to the server's
                TensorBoard through it when present.
        """
        super().__init__()
        if upload not in ("trunk", "all"):
            raise ValueError(f"upload must be 'trunk' or 'all', got {upload!r}")
        self.data_root = data_root
        self.config = TrainConfig(
            dropout=dropout,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            batch_size=batch_size,
            local_epochs=local_epochs,
            validation_fold=validation_fold,
            seed=seed,
        )
        self.upload = upload
        self.log_writer_id = log_writer_id
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.trainer: MultiTaskTrainer | None = None
        self.data: SiteData | None = None
        self.run_dir = ""
        self.log_writer = None
        self.last_round = -1

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            self.run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.log_writer = engine.get_component(self.log_writer_id) if self.log_writer_id else None
        elif event_type == EventType.END_RUN and self.trainer is not None:
            path = os.path.join(self.run_dir, FINAL_MODEL_FILE)
            torch.save(self.trainer.model.state_dict(), path)
            self.log_info(fl_ctx, f"saved this site's final model (trunk + private head) to {path}")

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task_name, self.validate_task_name):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            dxo = from_shareable(shareable)
            if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
                raise ValueError(f"expected global trunk WEIGHTS, got {dxo.data_kind}")
            trainer = self._trainer(dxo.data, fl_ctx)
            trainer.load_trunk(dxo.data)
        except (UserError, ValueError) as err:
            self.log_error(fl_ctx, f"cannot run {task_name}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        if task_name == self.validate_task_name:
            return self._validate(trainer, fl_ctx)
        return self._train(trainer, dxo.data, fl_ctx, abort_signal, current_round)

    def _train(self, trainer: MultiTaskTrainer, global_trunk: dict, fl_ctx, abort_signal, current_round) -> Shareable:
        # Score the global trunk with this site's head first: the per-round curve of the federated model.
        self._evaluate_and_stream(fl_ctx, trainer, current_round)
        self.last_round = current_round
        steps = trainer.train(
            should_stop=lambda: abort_signal.triggered, progress=lambda msg: self.log_info(fl_ctx, msg)
        )
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        torch.save(trainer.head_state(), os.path.join(self.run_dir, HEAD_FILE))
        trunk = trainer.trunk_weights()
        update = {name: trunk[name] - global_trunk[name] for name in global_trunk}
        if self.upload == "all":
            update.update({k: v.numpy() for k, v in trainer.head_state().items()})
        self.log_info(fl_ctx, f"round {current_round}: {steps} local steps, uploading {len(update)} arrays")
        return DXO(
            data_kind=DataKind.WEIGHT_DIFF, data=update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}
        ).to_shareable()

    def _validate(self, trainer: MultiTaskTrainer, fl_ctx: FLContext) -> Shareable:
        # The final global trunk is scored one step after the last training round.
        metrics, validation = self._evaluate_and_stream(fl_ctx, trainer, self.last_round + 1)
        self.log_info(
            fl_ctx,
            f"test fold: mean AUC-ROC {metrics['auc_roc']:.4f}, AUC-PR {metrics['auc_pr']:.4f} "
            f"over {metrics['tasks_evaluated']} tasks",
        )
        data = {**metrics, "validation": {k: v for k, v in validation.items() if k != "per_task"}}
        return DXO(data_kind=DataKind.METRICS, data=data).to_shareable()

    def _trainer(self, global_trunk: dict, fl_ctx: FLContext) -> MultiTaskTrainer:
        if self.trainer is not None:
            return self.trainer
        site = fl_ctx.get_identity_name()
        self.data = load_site(site_data_dir(self.data_root, site))
        n_features, hidden_sizes = trunk_geometry(global_trunk)
        if n_features != self.data.n_features:
            raise UserError(
                f"the global trunk expects {n_features} fingerprint bits but {site}'s data has "
                f"{self.data.n_features}; prepare the data with --bits {n_features} or change the job"
            )
        self.trainer = MultiTaskTrainer(self.data, self.config, hidden_sizes)
        head_path = os.path.join(self.run_dir, HEAD_FILE)
        if os.path.exists(head_path):  # resume: the site's head survives a restart of the run
            self.trainer.load_head(torch.load(head_path))
        self.log_info(
            fl_ctx,
            f"{site}: {self.data.X.shape[0]} compounds, {self.data.n_tasks} tasks, trunk {n_features}->{hidden_sizes}",
        )
        return self.trainer

    def _evaluate_and_stream(self, fl_ctx: FLContext, trainer: MultiTaskTrainer, step: int) -> tuple[dict, dict]:
        """Test- and validation-fold metrics, streamed to the server's TensorBoard at ``step``."""
        test = trainer.evaluate()
        validation = trainer.evaluate(self.config.validation_fold)
        if self.log_writer is not None:
            for prefix, metrics in (("test", test), ("validation", validation)):
                for name in ("auc_roc", "auc_pr"):
                    if np.isfinite(metrics[name]):
                        self.log_writer.add_scalar(f"{prefix}/{name}", metrics[name], global_step=step)
        return test, validation
