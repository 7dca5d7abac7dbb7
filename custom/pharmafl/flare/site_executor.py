"""The FLARE side every pharmafl training executor shares: task dispatch, errors, metrics streaming, run folder.

A subclass says how to get its trainer ready with the global model (``prepare``), what one round of local
training uploads (``train_round``), how it scores a model (``evaluate``) and what a site keeps at the end
(``save_final``). Everything here is the same for the multi-task and the ESM-2 LoRA executors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.core.errors import InputError
from pharmafl.core.paths import DATA_ENV
from pharmafl.core.progress import PROGRESS_TAG, TASK_FAILED, StepReporter
from pharmafl.privacy.report import PRIVACY_FILE

#: meta key of a training reply from a site whose DP budget is spent: it sends no update (aggregators skip it)
PRIVACY_BUDGET_SPENT = "pharmafl_privacy_budget_spent"


def site_data_dir(data_root: str, site: str) -> str:
    """Where a site's prepared data lives: ``<data_root>/<site>``, data_root from the job or $PHARMAFL_DATA."""
    root = os.path.expanduser(os.path.expandvars(data_root or os.environ.get(DATA_ENV, "")))
    if not root:
        raise InputError(f"no data location: set the executor's data_root or the {DATA_ENV} environment variable")
    return os.path.join(root, site)


class SiteTrainingExecutor(Executor):
    #: data kind of the upload (WEIGHT_DIFF for the trunk update, WEIGHTS for LoRA factors)
    upload_kind = DataKind.WEIGHTS
    #: metric names streamed to TensorBoard, per metric set
    streamed_metrics: Iterable[str] = ()
    #: score each round's global model before training on it (the per-round curve); the final model is always scored
    score_rounds = True

    def __init__(self, data_root: str, log_writer_id: str, train_task_name: str, validate_task_name: str):
        super().__init__()
        self.data_root = data_root
        self.log_writer_id = log_writer_id
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.trainer = None
        self.run_dir = ""
        self.log_writer = None
        self.last_round = -1
        self.progress = StepReporter(lambda _line: None)  # train_round passes it to its trainer

    # -- what a subclass provides
    def prepare(self, global_weights: dict, fl_ctx: FLContext):
        """The site's trainer, holding the global model it was sent (InputError/ValueError for bad input)."""
        raise NotImplementedError

    def train_round(self, trainer, fl_ctx: FLContext, abort_signal: Signal) -> tuple[int, dict]:
        """(local steps, arrays to upload); the trainer reports its steps to ``self.progress``."""
        raise NotImplementedError

    def evaluate(self, trainer) -> dict[str, dict]:
        """Metric sets by name (e.g. ``test``, ``validation``); each a dict of metrics."""
        raise NotImplementedError

    def save_final(self, trainer, fl_ctx: FLContext) -> None:
        """Keep the site's final model in ``self.run_dir`` at the end of the run."""

    def validation_result(self, metrics: dict[str, dict]) -> dict:
        """The METRICS payload of the ``validate`` task."""
        return metrics

    # -- the shared FLARE side
    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            self.run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.log_writer = engine.get_component(self.log_writer_id) if self.log_writer_id else None
        elif event_type == EventType.END_RUN and self.trainer is not None:
            self.save_final(self.trainer, fl_ctx)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (self.train_task_name, self.validate_task_name):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        try:
            dxo = from_shareable(shareable)
            if dxo.data_kind != DataKind.WEIGHTS:
                raise ValueError(f"expected global model WEIGHTS, got {dxo.data_kind}")
            trainer = self.prepare(dxo.data or {}, fl_ctx)
        except (InputError, ValueError) as err:
            self.log_error(fl_ctx, f"{TASK_FAILED} {site} cannot run {task_name}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if task_name == self.validate_task_name:
            # The final global model is scored one step after the last training round.
            metrics = self.evaluate_and_stream(trainer, self.last_round + 1)
            self.log_info(fl_ctx, f"{PROGRESS_TAG} {site} final global model: {self._summary(metrics)}")
            return DXO(data_kind=DataKind.METRICS, data=self.validation_result(metrics)).to_shareable()
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        if self.score_rounds:
            # Score the global model with this site's private parts first: the per-round curve of the federation.
            metrics = self.evaluate_and_stream(trainer, current_round)
            self.log_info(fl_ctx, f"{PROGRESS_TAG} {site} round {current_round} global model: {self._summary(metrics)}")
        self.last_round = current_round
        say = lambda line: self.log_info(fl_ctx, f"{PROGRESS_TAG} {line}")  # noqa: E731
        self.progress = StepReporter(say, prefix=f"{site} round {current_round} ")
        budget = getattr(trainer, "budget", None)
        if budget is not None and budget.exhausted:
            self.log_info(
                fl_ctx,
                f"{PROGRESS_TAG} {site} round {current_round}: privacy budget spent (epsilon {budget.epsilon:.3f} of "
                f"{budget.config.target_epsilon}, delta {budget.delta:.2g}); no further training, nothing uploaded",
            )
            return DXO(
                data_kind=self.upload_kind,
                data={},
                meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0, PRIVACY_BUDGET_SPENT: True},
            ).to_shareable()
        steps, upload = self.train_round(trainer, fl_ctx, abort_signal)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        if self.log_writer is not None and np.isfinite(self.progress.mean_loss):
            self.log_writer.add_scalar("train/loss", self.progress.mean_loss, global_step=current_round)
        self.log_info(
            fl_ctx,
            f"{site} round {current_round}: {steps} local steps, mean training loss {self.progress.mean_loss:.4f}, "
            f"uploading {len(upload)} arrays",
        )
        return DXO(
            data_kind=self.upload_kind, data=upload, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}
        ).to_shareable()

    def record_privacy(self, budget, fl_ctx: FLContext) -> None:
        """After a round of DP-SGD: epsilon to TensorBoard and the log, the spending to the run folder."""
        summary = budget.summary()
        if self.log_writer is not None:
            self.log_writer.add_scalar("privacy/epsilon", summary["epsilon"], global_step=self.last_round)
        with open(os.path.join(self.run_dir, PRIVACY_FILE), "w") as f:
            json.dump({**summary, "state": budget.state()}, f, indent=2)
        spent = " (budget spent: this site stops training)" if summary["exhausted"] else ""
        self.log_info(
            fl_ctx,
            f"{PROGRESS_TAG} {fl_ctx.get_identity_name()} round {self.last_round}: DP-SGD epsilon "
            f"{summary['epsilon']:.3f} at delta {summary['delta']:.2g} after {summary['steps']} steps "
            f"(noise multiplier {summary['noise_multiplier']:.3f}, target {summary['target_epsilon']}){spent}",
        )

    def resume_privacy(self, budget, fl_ctx: FLContext) -> None:
        """A restarted run resumes what its site had spent, never a fresh budget."""
        path = os.path.join(self.run_dir, PRIVACY_FILE)
        if os.path.exists(path):
            with open(path) as f:
                budget.load_state(json.load(f)["state"])
            self.log_info(fl_ctx, f"resumed the DP budget: {budget.steps} steps already spent")

    def evaluate_and_stream(self, trainer, step: int) -> dict[str, dict]:
        """``evaluate``, streamed to the server's TensorBoard at ``step`` as ``<set>/<metric>``."""
        metrics = self.evaluate(trainer)
        if self.log_writer is not None:
            for prefix, values in metrics.items():
                for name in self.streamed_metrics:
                    if np.isfinite(values[name]):
                        self.log_writer.add_scalar(f"{prefix}/{name}", values[name], global_step=step)
        return metrics

    def _summary(self, metrics: dict[str, dict]) -> str:
        return "; ".join(
            f"{prefix} " + ", ".join(f"{name} {values[name]:.4f}" for name in self.streamed_metrics if name in values)
            for prefix, values in metrics.items()
        )
