"""Server workflow of the masked secure sum: key setup, then rounds of train, consistency check and unmasking.

One FLARE controller owns every phase of the protocol (as Flower's SecAgg+ workflow does), through FLARE's public
controller API only: ``broadcast_and_wait`` for each phase, the authenticated sender of every result
(``client_task.client.name``), the job's persistor and shareable generator for the model. Per round:

1. ``train`` to the round's participants, carrying the participant list and the ledger so far; each site's result
   filter replaces its update by a signed masked upload, which is checked and summed here;
2. ``secagg_consistency`` to the sites whose uploads were accepted (U): each signs U;
3. ``secagg_unmask`` to the signers, with every signature: each reveals its shares if t signed the same U;
4. the masks are stripped, the mean (FRA-LoRA: its factorisation; server-blind: the still group-masked sum) goes
   through the shareable generator into the global model, and the round's record is chained onto the ledger.

A round that cannot be unmasked (fewer than t uploads, signatures or answers) leaves the global model as it was and
is recorded with the reason; when fewer than t sites can take part at all, the job stops. After the last round every
site gets the whole ledger (``secagg_ledger``) to check.

Files in the server's run folder: ``ledger.jsonl`` (the hash-chained records) and ``contributions.jsonl`` (every
upload received, accepted or not, with the reason).
"""

from __future__ import annotations

import time

import numpy as np
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.learnable_persistor import LearnablePersistor
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from pharmafl.aggregation.fra_lora import RESIDUAL_POLICIES, fra_lora_from_deltas
from pharmafl.consortium.approval import app_hash
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.flare.run_records import append_run_record, run_dir_of
from pharmafl.secure_sum.config import SecureSumConfig
from pharmafl.secure_sum.keys import Advertisement
from pharmafl.secure_sum.ledger import LEDGER_FILE, Ledger, model_digest, round_record, setup_record
from pharmafl.secure_sum.protocol import MaskedUpload, SecureSumError, SecureSumResult, SecureSumServer

ADVERTISE_TASK = "secagg_advertise"
SHARE_KEYS_TASK = "secagg_share_keys"
CONSISTENCY_TASK = "secagg_consistency"
UNMASK_TASK = "secagg_unmask"
LEDGER_TASK = "secagg_ledger"
PARTICIPANTS_HEADER = "secagg_participants"
LEDGER_HEADER = "secagg_ledger"
SECURE_META = "secure_sum_kind"  # DXO meta of a masked upload: the data kind of the update it hides
BLIND_META = "secure_sum_blind"  # DXO meta of a server-blind aggregate or global-model payload
SETTINGS = ("threshold", "clip", "max_weight", "fraction_bits", "modulus_bits", "neighbours", "server_blind")


class SecureSumWorkflow(Controller):
    def __init__(
        self,
        num_rounds: int = 5,
        min_clients: int = 0,
        wait_time_after_min_received: int = 60,
        train_timeout: int = 1800,
        task_timeout: int = 300,
        train_task_name: str = AppConstants.TASK_TRAIN,
        persistor_id: str = "persistor",
        shareable_generator_id: str = "shareable_generator",
        secure_sum: dict | None = None,
        aggregation: str = "mean",
        fra_lora: dict | None = None,
        weigh_by_local_steps: bool = True,
        output_data_kind: str = DataKind.WEIGHT_DIFF,
        require_signed: bool = False,
        root_ca_path: str = "",
        task_check_period: float = 0.5,
    ):
        """Scatter-and-gather rounds whose aggregate is a masked secure sum; the server never sees one update.

        Args:
            num_rounds: training rounds (mask keys are made for rounds 0 .. num_rounds - 1).
            min_clients: uploads after which a round waits only ``wait_time_after_min_received`` more seconds for the
                rest; 0: the threshold t. A site that vanishes then costs the round that wait (or ``train_timeout``).
            wait_time_after_min_received: seconds to wait for the other sites once ``min_clients`` answered, in
                every phase.
            train_timeout: seconds a training round may take at most (finite: a vanished site must not block).
            task_timeout: seconds the key setup, consistency, unmasking and ledger tasks may take.
            train_task_name: the task whose results are masked.
            persistor_id, shareable_generator_id: the model's persistor and shareable generator (a
                ``BlindShareableGenerator`` for the server-blind mode).
            secure_sum: the protocol's settings (``SecureSumConfig`` fields: threshold (0: a majority of the sites at
                key setup), clip, max_weight, fraction_bits, modulus_bits, neighbours, server_blind).
            aggregation: ``mean`` (FedAvg of the updates) or ``fra-lora`` (the mean of the clients' ``<module>.delta``
                truncated by FRA-LoRA; the result replaces the global adapter).
            fra_lora: ``{"rank": 16, "residual_policy": "drop"}`` for ``aggregation="fra-lora"``.
            weigh_by_local_steps: weigh by ``NUM_STEPS_CURRENT_ROUND`` (else every site weighs 1).
            output_data_kind: data kind of the mean (``WEIGHT_DIFF`` for updates; FRA-LoRA always gives ``WEIGHTS``).
            require_signed: refuse advertisements not signed by a startup-kit key (each site enforces its own policy).
            root_ca_path: consortium root CA; "" uses ``<workspace>/startup/rootCA.pem`` when it exists.
            task_check_period: how often FLARE checks the tasks.
        """
        super().__init__(task_check_period=task_check_period)
        for name, value, low in (
            ("num_rounds", num_rounds, 1),
            ("min_clients", min_clients, 0),
            ("wait_time_after_min_received", wait_time_after_min_received, 0),
            ("train_timeout", train_timeout, 1),
            ("task_timeout", task_timeout, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        settings = dict(secure_sum or {})
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown secure_sum settings {unknown}; known: {list(SETTINGS)}")
        threshold = settings.pop("threshold", 0)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"threshold must be 0 (a majority) or a positive integer, got {threshold!r}")
        fra = {"rank": 16, "residual_policy": "drop", **(fra_lora or {})}
        if set(fra) != {"rank", "residual_policy"} or fra["residual_policy"] not in RESIDUAL_POLICIES:
            raise ValueError(f"fra_lora must be {{'rank': int, 'residual_policy': one of {RESIDUAL_POLICIES}}}")
        if output_data_kind not in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            raise ValueError(f"output_data_kind must be WEIGHT_DIFF or WEIGHTS, got {output_data_kind!r}")
        # the shared settings are checked now (overflow for one site, blind with FRA-LoRA), again at key setup
        self.settings = dict(settings, aggregation=aggregation, require_signed=bool(require_signed))
        SecureSumConfig(threshold=max(threshold, 1), **self.settings).fixed_point(1)
        # the arguments as given, which FLARE's Job API exports a component from
        self.secure_sum, self.aggregation, self.require_signed = dict(secure_sum or {}), aggregation, require_signed
        self.wait_time_after_min_received, self.task_check_period = wait_time_after_min_received, task_check_period
        self.threshold = threshold
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.wait_time = wait_time_after_min_received
        self.train_timeout, self.task_timeout = train_timeout, task_timeout
        self.train_task_name = train_task_name
        self.persistor_id, self.shareable_generator_id = persistor_id, shareable_generator_id
        self.fra_lora, self.fra_settings = fra_lora, fra
        self.weigh_by_local_steps = weigh_by_local_steps
        self.output_data_kind = DataKind.WEIGHTS if aggregation == "fra-lora" else output_data_kind
        self.root_ca_path = root_ca_path
        self.persistor: LearnablePersistor | None = None
        self.shareable_gen: ShareableGenerator | None = None
        self.model: ModelLearnable | None = None
        self.server: SecureSumServer | None = None
        self.config: SecureSumConfig | None = None
        self.ledger = Ledger()
        self.residual = None

    @property
    def server_blind(self) -> bool:
        return bool(self.settings.get("server_blind"))

    # -- FLARE lifecycle
    def start_controller(self, fl_ctx: FLContext) -> None:
        self.persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        self.shareable_gen = fl_ctx.get_engine().get_component(self.shareable_generator_id)
        if not isinstance(self.persistor, LearnablePersistor):
            self.system_panic(f"'{self.persistor_id}' must be a LearnablePersistor, got {type(self.persistor)}", fl_ctx)
            return
        if not isinstance(self.shareable_gen, ShareableGenerator):
            self.system_panic(f"'{self.shareable_generator_id}' must be a ShareableGenerator", fl_ctx)
            return
        blind_generator = bool(getattr(self.shareable_gen, "server_blind", False))
        if blind_generator != self.server_blind:
            self.system_panic(
                "server-blind secure sum needs both the workflow's server_blind and a BlindShareableGenerator "
                f"(pharmafl.flare.secure_sum_blind); server_blind={self.server_blind}, the shareable generator is "
                f"{type(self.shareable_gen).__name__}",
                fl_ctx,
            )
            return
        fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        self.model = self.persistor.load(fl_ctx)
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self.model, private=True, sticky=True)
        self.fire_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
        run_dir = run_dir_of(fl_ctx)
        self.ledger = Ledger(f"{run_dir}/{LEDGER_FILE}" if run_dir else None)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        self.log_warning(fl_ctx, f"ignoring a result of {task_name} from {client.name}: not a standing task")

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        sites = sorted(client.name for client in fl_ctx.get_engine().get_clients())
        try:
            self.key_setup(sites, fl_ctx, abort_signal)
        except (SecureSumError, ValueError) as err:
            self.system_panic(f"secure sum key setup failed: {err}", fl_ctx)
            return
        self.fire_event(AppEventType.TRAINING_STARTED, fl_ctx)
        for round_number in range(self.num_rounds):
            if abort_signal.triggered or not self.run_round(round_number, fl_ctx, abort_signal):
                return
        self._broadcast(LEDGER_TASK, {"ledger": self.ledger.records}, self.server.participants(), fl_ctx, abort_signal)
        self.fire_event(AppEventType.TRAINING_FINISHED, fl_ctx)
        self.log_info(fl_ctx, f"secure sum: {self.num_rounds} rounds done; ledger head {self.ledger.head}")

    # -- key setup
    def key_setup(self, sites: list[str], fl_ctx: FLContext, abort_signal: Signal) -> None:
        threshold = self.threshold or len(sites) // 2 + 1
        if threshold > len(sites):
            raise ValueError(f"threshold {threshold} is larger than the {len(sites)} sites of the job")
        self.config = SecureSumConfig(threshold=threshold, rounds=self.num_rounds, **self.settings)
        self.config.fixed_point(len(sites))  # refuse an overflowing configuration before any key is made
        self.server = SecureSumServer(fl_ctx.get_job_id(), self.config, self._root_ca(fl_ctx))
        self.log_info(fl_ctx, f"secure sum key setup for {sites}: threshold {threshold}")
        payload = {"config": self.config.to_dict(), "job_id": fl_ctx.get_job_id(), "sites": sites}
        answers = self._broadcast(ADVERTISE_TASK, payload, sites, fl_ctx, abort_signal, everyone=True)
        adverts = self.server.register_advertisements(
            [Advertisement.from_dict(answers[site]["advertisement"]) for site in sites]
        )
        signed = "signed by startup kits" if self.server.root_ca_pem else "NOT authenticated (no root CA)"
        self.log_info(fl_ctx, f"secure sum: {len(adverts)} sites advertised keys, {signed}")
        payload = {"advertisements": [advert.to_dict() for advert in adverts]}
        shares = self._broadcast(SHARE_KEYS_TASK, payload, sites, fl_ctx, abort_signal, everyone=True)
        for site in sites:
            self.server.register_key_shares(site, shares[site]["key_shares"])
        if self.server_blind:
            self.shareable_gen.set_group_seeds(dict(self.server.group_seed_ciphertexts))
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        app_sha256 = app_hash(app_root, skip_bytecode_caches=True) if app_root else ""
        self.ledger.append(
            setup_record(fl_ctx.get_job_id(), app_sha256, self.config.to_dict(), sites, adverts, self._model_digest())
        )
        self.log_info(fl_ctx, f"secure sum key setup done: {len(sites)} sites hold shares of every mask key")

    # -- one round
    def run_round(self, round_number: int, fl_ctx: FLContext, abort_signal: Signal) -> bool:
        """One round; False when the job cannot go on (fewer than t sites left)."""
        self.log_info(fl_ctx, f"Round {round_number} started.")
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self.model, private=True, sticky=True)
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=True)
        self.fire_event(AppEventType.ROUND_STARTED, fl_ctx)
        before = self._model_digest()
        try:
            participants = self.server.start_round(round_number, self._expected_layout())
        except SecureSumError as err:
            self._record_round(round_number, before, None, reason=str(err), fl_ctx=fl_ctx)
            self.system_panic(f"secure sum cannot go on: {err}", fl_ctx)
            return False
        data = self.shareable_gen.learnable_to_shareable(self.model, fl_ctx)
        data.set_header(AppConstants.CURRENT_ROUND, round_number)
        data.set_header(AppConstants.NUM_ROUNDS, self.num_rounds)
        data.set_header(PARTICIPANTS_HEADER, participants)
        data.set_header(LEDGER_HEADER, self.ledger.records)
        data.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
        task = Task(
            self.train_task_name,
            data,
            timeout=self.train_timeout,
            result_received_cb=lambda client_task, fl_ctx: self._receive_upload(client_task, round_number, fl_ctx),
        )
        minimum = min(self.min_clients or self.config.threshold, len(participants))
        self.broadcast_and_wait(task, fl_ctx, participants, minimum, self.wait_time, abort_signal)
        if abort_signal.triggered:
            return False
        try:
            result = self.unmask(round_number, fl_ctx, abort_signal)
        except SecureSumError as err:
            self.log_error(fl_ctx, f"secure sum round failed: {err}; the global model is unchanged")
            self._record_round(round_number, before, None, reason=str(err), fl_ctx=fl_ctx)
        else:
            self.round_unmasked(result, fl_ctx)
            self._apply(result, fl_ctx)
            self._record_round(round_number, before, result, fl_ctx=fl_ctx)
        self.persistor.save(self.model, fl_ctx)
        self.fire_event(AppEventType.ROUND_DONE, fl_ctx)
        self.log_info(fl_ctx, f"Round {round_number} finished.")
        return True

    def unmask(self, round_number: int, fl_ctx: FLContext, abort_signal: Signal) -> SecureSumResult:
        """The consistency check and the unmasking of the round's uploads (SecureSumError when it cannot be done)."""
        uploaded = self.server.consistency_targets()

        def signature(site: str, result: Shareable) -> None:
            problem = self.server.receive_signature(site, bytes(result.get("signature", b"")))
            if problem:
                self.log_error(fl_ctx, f"consistency check: {problem}")

        payload = {"round": round_number, "uploaded": uploaded}
        self._broadcast(CONSISTENCY_TASK, payload, uploaded, fl_ctx, abort_signal, on_result=signature)
        requests = {site: request.to_dict() for site, request in self.server.unmask_requests().items()}
        answers = self._broadcast(UNMASK_TASK, {"round": round_number, "requests": requests}, sorted(requests), fl_ctx)
        responses = {site: answer["shares"] for site, answer in answers.items() if "shares" in answer}
        return self.server.finish(responses)

    def round_unmasked(self, result: SecureSumResult, fl_ctx: FLContext) -> None:
        """Hook: a round's unmasked result, before it reaches the model (``pharmafl.testing`` records it)."""

    def _receive_upload(self, client_task: ClientTask, round_number: int, fl_ctx: FLContext) -> None:
        sender = client_task.client.name  # FLARE's authenticated identity of the client, not a header it wrote
        result = client_task.result
        client_task.result = None
        if result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            self.log_warning(fl_ctx, f"{sender} returned no upload in round {round_number} (dropped)")
            return
        try:
            dxo = from_shareable(result)
            if dxo.get_meta_prop(SECURE_META) is None:
                return self._reject(fl_ctx, sender, round_number, "not a masked upload (plaintext refused)")
            upload = MaskedUpload.from_dict(dxo.data)
        except Exception as err:  # a malformed payload is the client's fault, never the server's crash
            return self._reject(fl_ctx, sender, round_number, f"malformed masked upload ({err})")
        problem = self.server.receive_upload(upload, sender=sender)
        if problem:
            return self._reject(fl_ctx, sender, round_number, problem)
        keys = [name for name, _, _ in upload.layout]
        append_run_record(
            fl_ctx, CONTRIBUTIONS_LOG, site=sender, round=round_number, keys=keys, accepted=True, masked=True
        )
        self.log_info(fl_ctx, f"accepted masked upload from {sender} round {round_number}")

    def _reject(self, fl_ctx: FLContext, site: str, round_number: int, reason: str) -> None:
        self.log_error(fl_ctx, f"rejected contribution from {site} (round {round_number}): {reason}")
        append_run_record(
            fl_ctx,
            CONTRIBUTIONS_LOG,
            site=site,
            round=round_number,
            keys=[],
            accepted=False,
            reason=reason,
            masked=True,
        )

    def _apply(self, result: SecureSumResult, fl_ctx: FLContext) -> None:
        """The round's aggregate into the global model, through the shareable generator."""
        if self.server_blind:
            payload = {
                "round": result.round,
                "uploaded": list(result.uploaded),
                "layout": [[name, list(shape), dtype] for name, shape, dtype in result.layout],
                "blind_sum": result.blind_sum,
                "data_kind": self.output_data_kind,
            }
            dxo = DXO(data_kind=DataKind.COLLECTION, data=payload, meta={BLIND_META: True})
        else:
            mean = result.mean
            if self.config.aggregation == "fra-lora":
                fra = fra_lora_from_deltas(
                    [mean],
                    [1.0],
                    self.fra_settings["rank"],
                    residual=self.residual,
                    residual_policy=self.fra_settings["residual_policy"],
                )
                self.residual, mean = fra.residual, fra.factors
            meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: result.total_weight}
            dxo = DXO(data_kind=self.output_data_kind, data=mean, meta=meta)
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self.model, private=True, sticky=True)
        self.model = self.shareable_gen.shareable_to_learnable(dxo.to_shareable(), fl_ctx)
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self.model, private=True, sticky=True)
        blind = " (still under the sites' group masks)" if self.server_blind else ""
        self.log_info(
            fl_ctx,
            f"round {result.round}: unmasked the sum of {result.uploaded}{blind} with shares from {result.survivors}; "
            f"dropped {result.dropped}",
        )

    def _record_round(
        self, round_number: int, before: str, result: SecureSumResult | None, fl_ctx: FLContext, reason: str = ""
    ) -> None:
        outcome = result if result is not None else self.server.abandon_round()
        record = round_record(
            round_number,
            before,
            self._model_digest(),
            outcome,
            reason,
            server_blind=self.server_blind,
            time=time.time(),
        )
        appended = self.ledger.append(record)
        self.log_info(fl_ctx, f"ledger: round {round_number} {record['status']}, record {appended['hash'][:16]}")

    # -- helpers
    def _broadcast(
        self,
        task_name: str,
        payload: dict,
        targets: list[str],
        fl_ctx: FLContext,
        abort_signal: Signal | None = None,
        everyone: bool = False,
        on_result=None,
    ) -> dict[str, Shareable]:
        """Send a protocol task; the OK answers by authenticated site. ``everyone``: every target must answer."""
        answers: dict[str, Shareable] = {}

        def collect(client_task: ClientTask, fl_ctx: FLContext) -> None:
            site, result = client_task.client.name, client_task.result
            if result.get_return_code(ReturnCode.OK) == ReturnCode.OK:
                answers[site] = result
                if on_result is not None:
                    on_result(site, result)
            else:
                self.log_warning(fl_ctx, f"{site} did not complete {task_name} ({result.get_return_code()})")

        data = Shareable()
        data.update(payload)
        task = Task(name=task_name, data=data, timeout=self.task_timeout, result_received_cb=collect)
        minimum = len(targets) if everyone else min(self.config.threshold, len(targets))
        wait = 0 if everyone else self.wait_time
        self.broadcast_and_wait(task, fl_ctx, targets, minimum, wait, abort_signal)
        missing = sorted(set(targets) - set(answers))
        if everyone and missing:
            raise SecureSumError(f"{missing} did not complete the {task_name} step")
        return answers

    def _model_digest(self) -> str:
        if self.server_blind:
            return self.shareable_gen.model_digest(self.model)
        return model_digest((self.model or {}).get(ModelLearnableKey.WEIGHTS))

    def _expected_layout(self):
        if self.config.aggregation == "fra-lora":
            return None  # deltas do not have the global factors' shapes: the first upload sets them
        weights = (self.model or {}).get(ModelLearnableKey.WEIGHTS)
        if not weights:
            return None
        return [(name, tuple(np.shape(weights[name])), "") for name in sorted(weights)]

    def _root_ca(self, fl_ctx: FLContext) -> bytes:
        path = self.root_ca_path
        if not path:
            try:
                path = f"{fl_ctx.get_engine().get_workspace().get_root_dir()}/startup/rootCA.pem"
            except Exception:
                return b""
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            if self.root_ca_path:
                raise ValueError(f"root CA certificate '{path}' does not exist") from None
            return b""
