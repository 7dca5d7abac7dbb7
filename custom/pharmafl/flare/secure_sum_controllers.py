"""Server workflows of the masked secure sum: key setup before training, unmasking after each gather.

``SecureKeySetup`` runs once per job before Scatter-and-Gather: every site advertises its public keys, then sends
Shamir shares of its mask key, encrypted to each peer, which the server only stores. ``SecureScatterAndGather`` is
NVFLARE's ``ScatterAndGather`` with two additions: each train task names the round's participants, and between
gathering and aggregation an unmasking phase asks the sites that uploaded for the shares the server needs.
Both drive a ``MaskedSecureSumAggregator``, which holds the protocol state.
"""

from __future__ import annotations

import hashlib

import numpy as np
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from pharmafl.aggregation.secure_sum.protocol import SecureSumError
from pharmafl.flare.secure_sum_aggregator import MaskedSecureSumAggregator

ADVERTISE_TASK = "secagg_advertise"
SHARE_KEYS_TASK = "secagg_share_keys"
UNMASK_TASK = "secagg_unmask"
PARTICIPANTS_HEADER = "secagg_participants"


def _secure_aggregator(engine, aggregator_id: str) -> MaskedSecureSumAggregator:
    aggregator = engine.get_component(aggregator_id)
    if not isinstance(aggregator, MaskedSecureSumAggregator):
        raise TypeError(f"component '{aggregator_id}' must be a MaskedSecureSumAggregator, got {type(aggregator)}")
    return aggregator


def model_digest(model) -> str:
    """SHA-256 of a ModelLearnable's weights (names, shapes, bytes), to show whether a round changed the model."""
    digest = hashlib.sha256()
    weights = (model or {}).get(ModelLearnableKey.WEIGHTS) or {}
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(name.encode() + str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


class SecureKeySetup(Controller):
    def __init__(
        self,
        num_rounds: int,
        start_round: int = 0,
        aggregator_id: str = "aggregator",
        timeout: int = 300,
        task_check_period: float = 0.2,
    ):
        """Per-job key setup of the masked secure sum, before Scatter-and-Gather.

        Every connected site must take part. It makes one mask key per site and round, so the rounds must match
        the Scatter-and-Gather workflow's. The job stops with a clear message when a site does not answer, an
        advertisement does not verify, or there are fewer sites than the threshold.

        Args:
            num_rounds, start_round: the training rounds (as ``ScatterAndGather``'s): keys for rounds
                0 .. start_round + num_rounds - 1.
            aggregator_id: the ``MaskedSecureSumAggregator`` component.
            timeout: seconds each setup task may take.
            task_check_period: how often FLARE checks the tasks.
        """
        super().__init__(task_check_period=task_check_period)
        if not isinstance(timeout, int) or timeout < 0:
            raise ValueError(f"timeout must be a non-negative integer, got {timeout!r}")
        if not isinstance(num_rounds, int) or num_rounds < 1 or not isinstance(start_round, int) or start_round < 0:
            raise ValueError(f"need num_rounds >= 1 and start_round >= 0, got {num_rounds!r} and {start_round!r}")
        self.rounds = start_round + num_rounds
        self.aggregator_id = aggregator_id
        self.timeout = timeout
        self.aggregator: MaskedSecureSumAggregator | None = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        self.aggregator = _secure_aggregator(self._engine, self.aggregator_id)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        sites = sorted(client.name for client in self._engine.get_clients())
        try:
            config = self.aggregator.configure(len(sites), self.rounds, fl_ctx)
            self.log_info(fl_ctx, f"secure sum key setup for {sites}: threshold {config.threshold}")
            adverts = self._gather(
                ADVERTISE_TASK, {"config": config.to_dict(), "job_id": fl_ctx.get_job_id()}, sites, fl_ctx, abort_signal
            )
            checked = self.aggregator.register_advertisements([adverts[s]["advertisement"] for s in sites], fl_ctx)
            shares = self._gather(SHARE_KEYS_TASK, {"advertisements": checked}, sites, fl_ctx, abort_signal)
            for site in sites:
                self.aggregator.register_key_shares(site, shares[site]["key_shares"], fl_ctx)
        except (SecureSumError, ValueError) as err:
            self.system_panic(f"secure sum key setup failed: {err}", fl_ctx)
            return
        self.log_info(fl_ctx, f"secure sum key setup done: {len(sites)} sites hold shares of every mask key")

    def _gather(self, task_name: str, payload: dict, sites: list[str], fl_ctx: FLContext, abort_signal: Signal):
        answers: dict[str, Shareable] = {}

        def collect(client_task: ClientTask, fl_ctx: FLContext) -> None:
            if client_task.result.get_return_code(ReturnCode.OK) == ReturnCode.OK:
                answers[client_task.client.name] = client_task.result

        data = Shareable()
        data.update(payload)
        task = Task(name=task_name, data=data, timeout=self.timeout, result_received_cb=collect)
        self.broadcast_and_wait(task, fl_ctx, targets=sites, min_responses=len(sites), abort_signal=abort_signal)
        missing = sorted(set(sites) - set(answers))
        if missing:
            raise SecureSumError(f"{missing} did not complete the {task_name} step")
        return answers

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignoring late result of {task_name} from {client.name}")


class SecureScatterAndGather(ScatterAndGather):
    def __init__(self, *args, unmask_timeout: int = 300, **kwargs):
        """``ScatterAndGather`` whose rounds are masked secure sums (aggregator: ``MaskedSecureSumAggregator``).

        Each train task carries the round's participants. After gathering, the sites that uploaded are asked for
        their shares; with at least t answers the aggregator strips the masks. A round that cannot be unmasked
        (fewer than t uploads or answers) leaves the global model unchanged and is logged with the reason; when
        fewer than t sites can take part at all, the job stops. Every round's outcome and the global model's digest
        before and after it go to ``<run_dir>/secure_sum.jsonl``. With a server-blind aggregator the shareable
        generator must be ``BlindShareableGenerator`` (the server's model then never changes).

        Args:
            unmask_timeout: seconds the unmasking task may take.
            *args, **kwargs: as ``ScatterAndGather`` (set ``ignore_result_error`` true: a dropped site is expected).
        """
        super().__init__(*args, **kwargs)
        self.unmask_timeout = unmask_timeout
        self._participants: list[str] = []
        self._digest_before = ""

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        aggregator = _secure_aggregator(self._engine, self.aggregator_id)
        blind_generator = bool(getattr(self.shareable_gen, "server_blind", False))
        if aggregator.server_blind != blind_generator:
            self.system_panic(
                "server-blind secure sum needs both the aggregator's server_blind and a BlindShareableGenerator "
                f"(pharmafl.flare.secure_sum_blind); the aggregator has server_blind={aggregator.server_blind}, the "
                f"shareable generator is {type(self.shareable_gen).__name__}",
                fl_ctx,
            )

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if not isinstance(self.aggregator, MaskedSecureSumAggregator):
            return
        if event_type == AppEventType.ROUND_STARTED:
            self._digest_before = model_digest(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
            try:
                self._participants = self.aggregator.start_round(fl_ctx)
            except SecureSumError as err:
                self._participants = []
                self.aggregator.fail_round(str(err), fl_ctx)
                self.system_panic(f"secure sum cannot go on: {err}", fl_ctx)
        elif event_type == AppEventType.BEFORE_AGGREGATION:
            self._unmask(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            self.aggregator.log_round(
                fl_ctx,
                model_before=self._digest_before,
                model_after=model_digest(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)),
            )

    def _prepare_train_task_data(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        client_task.task.data.set_header(PARTICIPANTS_HEADER, list(self._participants))
        super()._prepare_train_task_data(client_task, fl_ctx)

    def _unmask(self, fl_ctx: FLContext) -> None:
        try:
            requests = self.aggregator.unmask_requests(fl_ctx)
        except SecureSumError as err:
            self.aggregator.fail_round(str(err), fl_ctx)
            return
        responses: dict[str, dict] = {}

        def collect(client_task: ClientTask, fl_ctx: FLContext) -> None:
            result = client_task.result
            if result.get_return_code(ReturnCode.OK) == ReturnCode.OK and "shares" in result:
                responses[client_task.client.name] = result["shares"]
            else:
                self.log_warning(fl_ctx, f"{client_task.client.name} returned no unmasking shares (dropped)")

        data = Shareable()
        data["round"] = self._current_round
        data["requests"] = requests
        task = Task(name=UNMASK_TASK, data=data, timeout=self.unmask_timeout, result_received_cb=collect)
        self.broadcast_and_wait(task, fl_ctx, targets=sorted(requests), min_responses=len(requests))
        try:
            self.aggregator.finish(responses, fl_ctx)
        except SecureSumError as err:
            self.aggregator.fail_round(str(err), fl_ctx)
