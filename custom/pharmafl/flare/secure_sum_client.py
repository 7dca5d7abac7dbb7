"""Site side of the masked secure sum in FLARE: a state component, its executor and the masking result filter.

- ``SecureSumSite`` (component, id ``secure_sum``) holds the site's ``SecureSumClient``: keys, peers, shares. It
  also remembers the round and participants of the current train task, and applies the test-only fault injection.
- ``SecureSumExecutor`` answers the protocol's own tasks (advertise, share keys, unmask) through the component.
- In the server-blind mode ``SecureSumSite`` also keeps the site's copy of the global model: ``open_blind`` removes
  the group masks from the server's aggregate and applies the mean update (``pharmafl.flare.secure_sum_blind``).
- ``SecureMaskFilter`` is a task-result filter on ``train``: it replaces whatever update the training executor
  produced (the trunk update of ``MultiTaskExecutor``, the ``<module>.delta`` update of ``ESMLoRAExecutor``) by its
  signed masked upload, so the executors stay unchanged. Put it last in the job's result filters.

Fault injection (tests and demos only): ``faults`` maps a site name to ``PHASE`` or ``PHASE@ROUND``; that site
then misbehaves from round ``fault_round`` (or ROUND) on. ``after-setup``: never uploads (answers train tasks with
an error); ``after-upload``: uploads in that round, then never answers again; ``tampered``: its upload is altered
after signing; ``mis-sized``: it signs and sends an upload one value short.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.secure_sum.keys import Advertisement
from pharmafl.aggregation.secure_sum.protocol import SecureSumClient, SecureSumConfig, SecureSumError, UnmaskRequest
from pharmafl.flare.secure_sum_aggregator import SECURE_META
from pharmafl.flare.secure_sum_controllers import ADVERTISE_TASK, PARTICIPANTS_HEADER, SHARE_KEYS_TASK, UNMASK_TASK

FAULT_PHASES = ("after-setup", "after-upload", "tampered", "mis-sized")
RECORD_DIR = "secure_sum_plain"  # record_updates: what this site uploaded, in plaintext, on its own disk (tests)
BLIND_MEAN = "blind_mean_round_{}.npz"  # record_updates, server-blind: the unblinded mean a site applied
BLIND_MODEL = "blind_global_round_{}.npz"  # record_updates, server-blind: the site's global model after that round


class SecureSumSite(FLComponent):
    def __init__(
        self,
        train_task_name: str = "train",
        use_startup_kit: bool = True,
        faults: dict | None = None,
        fault_round: int = 0,
        record_updates: bool = False,
        min_threshold: int = 2,
    ):
        """The site's secure-sum state for one job.

        Args:
            train_task_name: the task whose results are masked.
            use_startup_kit: sign the advertisement with ``startup/client.key`` (certificate ``client.crt``) and
                check peers against ``startup/rootCA.pem`` when those files exist (provisioned sites).
            faults: TEST ONLY: ``{site: "PHASE"}`` or ``{site: "PHASE@ROUND"}``, PHASE one of ``after-setup``,
                ``after-upload``, ``tampered``, ``mis-sized``; the named site misbehaves so from ROUND on (see the
                module docstring).
            fault_round: the round from which faults without ``@ROUND`` apply.
            record_updates: TEST ONLY: keep each uploaded update in plaintext in ``<run_dir>/secure_sum_plain/``
                (on this site's own disk) so tests can check the server's mean; server-blind, also the unblinded
                mean and the site's global model of each round.
            min_threshold: the lowest threshold this site accepts from the server's settings (a threshold of 1
                would let the server collect both secrets of a site from two different peers).
        """
        super().__init__()
        self.faults: dict[str, tuple[str, int]] = {}
        for site, spec in dict(faults or {}).items():
            phase, _, start = str(spec).partition("@")
            if phase not in FAULT_PHASES or (start and not start.isdigit()):
                raise ValueError(
                    f"fault for {site} must be PHASE or PHASE@ROUND, PHASE one of {FAULT_PHASES}: {spec!r}"
                )
            self.faults[site] = (phase, int(start) if start else fault_round)
        self.train_task_name = train_task_name
        self.use_startup_kit = use_startup_kit
        self.record_updates = record_updates
        self.min_threshold = min_threshold
        self.client: SecureSumClient | None = None
        self.round: int | None = None
        self.participants: list[str] = []
        self.site = ""
        # server-blind: the group seed addressed to this site, its copy of the global model and the last round
        # whose aggregate that copy holds (-1: the initial model)
        self.group_seed_ciphertext = b""
        self.global_model: dict[str, np.ndarray] | None = None
        self.global_round: int | None = None

    # -- events: remember the current train task's round and participants (filters do not see the task data)
    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.site = fl_ctx.get_identity_name()
        elif event_type == EventType.AFTER_TASK_DATA_FILTER and fl_ctx.get_prop(FLContextKey.TASK_NAME) == (
            self.train_task_name
        ):
            task_data = fl_ctx.get_prop(FLContextKey.TASK_DATA)
            if task_data is not None:
                self.round = task_data.get_header(AppConstants.CURRENT_ROUND)
                self.participants = list(task_data.get_header(PARTICIPANTS_HEADER) or [])

    # -- fault injection
    def fault(self, fl_ctx: FLContext) -> str | None:
        """This site's injected fault in the current round, if any."""
        phase, start = self.faults.get(fl_ctx.get_identity_name(), (None, 0))
        if phase is None or self.round is None or self.round < start:
            return None
        return phase

    def gone(self, fl_ctx: FLContext, unmasking: bool = False) -> bool:
        """Whether this site behaves as dropped now (for the upload, or for the unmasking that follows it)."""
        phase = self.fault(fl_ctx)
        if phase == "after-setup":
            return True
        if phase == "after-upload":
            return unmasking or self.round > self.faults[fl_ctx.get_identity_name()][1]
        return False

    # -- protocol steps
    def advertise(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        job_id = fl_ctx.get_job_id()
        if data.get("job_id") != job_id:
            raise SecureSumError(f"key setup for job {data.get('job_id')}, but this is job {job_id}")
        config = SecureSumConfig(**data["config"])
        if config.threshold < self.min_threshold:
            raise SecureSumError(
                f"the server asks for threshold {config.threshold}, below this site's minimum {self.min_threshold}"
            )
        kit = self._startup_kit(fl_ctx) if self.use_startup_kit else (b"", b"", b"")
        self.client = SecureSumClient(fl_ctx.get_identity_name(), job_id, config, *kit)
        if not kit[0]:
            self.log_warning(fl_ctx, "secure sum: no startup kit; the key advertisement is not authenticated")
        self.log_info(fl_ctx, f"secure sum settings from the server: {config.to_dict()}")
        reply = Shareable()
        reply["advertisement"] = self.client.advertise().to_dict()
        return reply

    def share_keys(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        adverts = [Advertisement.from_dict(a) for a in data["advertisements"]]
        reply = Shareable()
        reply["key_shares"] = self._client().share_keys(adverts)
        return reply

    def mask(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """The train result with its update replaced by the signed masked upload."""
        dxo = from_shareable(shareable)
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1.0)
        update = dict(dxo.data)
        phase = self.fault(fl_ctx)
        if phase == "mis-sized":  # a broken client: signs an upload one value short
            last = sorted(update)[-1]
            update[last] = np.asarray(update[last]).reshape(-1)[:-1]
        client = self._client()
        upload = client.mask(update, float(weight), self.round, self.participants, self.group_seed_ciphertext)
        if phase == "tampered":  # altered in transit, after signing
            upload.vector[1] += upload.vector.dtype.type(1)
        if self.record_updates:
            self._record(fl_ctx, update, float(weight))
        masked = DXO(data_kind=DataKind.COLLECTION, data=upload.to_dict(), meta={SECURE_META: dxo.data_kind})
        masked.update_shareable(shareable)
        return shareable

    def unmask(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        request = data["requests"].get(fl_ctx.get_identity_name())
        if request is None:
            raise SecureSumError(f"no unmasking request for {fl_ctx.get_identity_name()}")
        reply = Shareable()
        reply["shares"] = self._client().unmask(UnmaskRequest.from_dict(request))
        return reply

    def open_blind(self, payload: Mapping, fl_ctx: FLContext) -> dict[str, np.ndarray]:
        """Server-blind: bring this site's copy of the global model up to date from the server's payload.

        The payload (``BlindShareableGenerator``) carries the group seed encrypted to each site, the initial model
        until a first aggregate exists, and then the latest round's group-masked aggregate with the round it builds
        on. Returns a copy of the global model, for the executor.
        """
        client = self._client()
        seeds = dict(payload.get("group_seeds") or {})
        self.group_seed_ciphertext = bytes(seeds.get(fl_ctx.get_identity_name(), b""))
        initial = payload.get("initial")
        if initial:
            self.global_model = {name: np.array(value, copy=True) for name, value in initial.items()}
            self.global_round = -1
        if self.global_model is None:
            raise SecureSumError("this site has no copy of the global model: it missed the initial model")
        aggregate = payload.get("aggregate") or {}
        if aggregate and int(aggregate["round"]) != self.global_round:  # a failed round re-sends the last one
            self._apply_blind(client, aggregate, fl_ctx)
        return {name: value.copy() for name, value in self.global_model.items()}

    def _apply_blind(self, client: SecureSumClient, aggregate: Mapping, fl_ctx: FLContext) -> None:
        round_number, previous = int(aggregate["round"]), int(aggregate["previous"])
        if previous != self.global_round:
            raise SecureSumError(
                f"the aggregate of round {round_number} builds on round {previous}, but this site's global model is "
                f"at round {self.global_round}: it missed an aggregate and cannot rebuild the global model"
            )
        layout = [(str(n), tuple(int(x) for x in s), str(d)) for n, s, d in aggregate["layout"]]
        weight, mean = client.unblind(
            np.asarray(aggregate["blind_sum"]),
            round_number,
            list(aggregate["uploaded"]),
            layout,
            self.group_seed_ciphertext,
        )
        wrong = sorted(name for name, value in mean.items() if np.shape(self.global_model.get(name)) != np.shape(value))
        if wrong:
            raise SecureSumError(f"the aggregate of round {round_number} does not fit the global model's {wrong}")
        if aggregate.get("data_kind", DataKind.WEIGHT_DIFF) == DataKind.WEIGHTS:
            self.global_model.update(mean)
        else:
            for name, value in mean.items():
                self.global_model[name] = self.global_model[name] + value
        self.global_round = round_number
        self.log_info(
            fl_ctx,
            f"server-blind: unblinded round {round_number} (uploaders {list(aggregate['uploaded'])}, "
            f"total weight {weight:g}) and applied it to this site's global model",
        )
        if self.record_updates:
            folder = self._record_dir(fl_ctx)
            np.savez(os.path.join(folder, BLIND_MEAN.format(round_number)), __weight__=weight, **mean)
            np.savez(os.path.join(folder, BLIND_MODEL.format(round_number)), **self.global_model)

    # -- helpers
    def _client(self) -> SecureSumClient:
        if self.client is None:
            raise SecureSumError("no key setup has run on this site (is SecureKeySetup in the server's workflows?)")
        return self.client

    def _startup_kit(self, fl_ctx: FLContext) -> tuple[bytes, bytes, bytes]:
        try:
            startup = os.path.join(fl_ctx.get_engine().get_workspace().get_root_dir(), "startup")
        except Exception:
            return b"", b"", b""
        files = [os.path.join(startup, name) for name in ("client.key", "client.crt", "rootCA.pem")]
        if not all(os.path.isfile(path) for path in files):
            return b"", b"", b""
        contents = []
        for path in files:
            with open(path, "rb") as f:
                contents.append(f.read())
        return tuple(contents)

    def _record_dir(self, fl_ctx: FLContext) -> str:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, RECORD_DIR), exist_ok=True)
        return os.path.join(run_dir, RECORD_DIR)

    def _record(self, fl_ctx: FLContext, update: dict, weight: float) -> None:
        np.savez(os.path.join(self._record_dir(fl_ctx), f"round_{self.round}.npz"), __weight__=weight, **update)


def _site(fl_ctx: FLContext, component_id: str) -> SecureSumSite:
    site = fl_ctx.get_engine().get_component(component_id)
    if not isinstance(site, SecureSumSite):
        raise TypeError(f"component '{component_id}' must be a SecureSumSite, got {type(site)}")
    return site


class SecureSumExecutor(Executor):
    def __init__(self, site_component_id: str = "secure_sum"):
        """Answers the secure sum's own tasks (advertise, share keys, unmask) with the ``SecureSumSite`` state.

        Args:
            site_component_id: id of the ``SecureSumSite`` component.
        """
        super().__init__()
        self.site_component_id = site_component_id

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = _site(fl_ctx, self.site_component_id)
        steps = {ADVERTISE_TASK: site.advertise, SHARE_KEYS_TASK: site.share_keys, UNMASK_TASK: site.unmask}
        if task_name not in steps:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if task_name == UNMASK_TASK and site.gone(fl_ctx, unmasking=True):
            self.log_warning(fl_ctx, "fault injection: this site has dropped and does not unmask")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            return steps[task_name](shareable, fl_ctx)
        except (SecureSumError, ValueError, KeyError) as err:
            self.log_error(fl_ctx, f"secure sum {task_name} failed: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)


class SecureMaskFilter(Filter):
    def __init__(self, site_component_id: str = "secure_sum"):
        """Task-result filter for ``train``: replaces the executor's update by its signed masked upload.

        A result that is not OK passes unchanged. When masking is impossible (no key setup, this site is not a
        participant) the result becomes an error: a plaintext update never leaves the site.

        Args:
            site_component_id: id of the ``SecureSumSite`` component.
        """
        super().__init__()
        self.site_component_id = site_component_id

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site = _site(fl_ctx, self.site_component_id)
        if site.gone(fl_ctx):
            self.log_warning(fl_ctx, f"fault injection: dropping out in round {site.round} ({site.fault(fl_ctx)})")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            return site.mask(shareable, fl_ctx)
        except (SecureSumError, ValueError) as err:
            self.log_error(fl_ctx, f"cannot mask the update, nothing is uploaded: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
