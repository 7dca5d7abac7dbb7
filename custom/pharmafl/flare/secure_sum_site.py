"""Site side of the masked secure sum in FLARE: the site's state, its executor and its two filters.

- ``SecureSumSite`` (component, id ``secure_sum``) holds the site's ``SecureSumClient`` (keys, peers, shares), its
  policy (``local/secure_sum.json``: roster and floor), its own ledger (``site_ledger.jsonl`` in its run folder) and,
  server-blind, its copy of the global model. It checks every server ledger it is sent against its own view and
  takes no further part in the job after a mismatch.
- ``SecureSumExecutor`` answers the protocol's tasks: advertise, share keys, consistency, unmask, ledger.
- ``SecureTaskDataFilter`` (task data, ``train`` and ``validate``): checks the ledger and the model the task
  carries, remembers the round's participants and, server-blind, rebuilds the global model from the aggregate.
- ``SecureMaskFilter`` (task result, ``train``, last): replaces the executor's update by its signed masked upload,
  so the training executors stay unchanged. A plaintext update never leaves the site.
"""

from __future__ import annotations

import json
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

from pharmafl.consortium.approval import APPROVED_APP_FILE, app_hash
from pharmafl.flare.secure_sum_blind import open_blind_payload, payload_model_digest
from pharmafl.flare.secure_sum_workflow import (
    ADVERTISE_TASK,
    BLIND_META,
    CONSISTENCY_TASK,
    LEDGER_HEADER,
    LEDGER_TASK,
    PARTICIPANTS_HEADER,
    SECURE_META,
    SHARE_KEYS_TASK,
    UNMASK_TASK,
)
from pharmafl.secure_sum.config import POLICY_FILE, PolicyError, SecureSumConfig, SitePolicy
from pharmafl.secure_sum.keys import Advertisement
from pharmafl.secure_sum.ledger import (
    SITE_LEDGER_FILE,
    Ledger,
    advertisements_digest,
    chain_problem,
    cross_check,
    expected_model_digest,
    model_digest,
    round_record_problem,
)
from pharmafl.secure_sum.protocol import RefusedError, SecureSumClient, SecureSumError, UnmaskRequest

KIT_FILES = ("client.key", "client.crt", "rootCA.pem")  # a provisioned site's startup kit


class SecureSumSite(FLComponent):
    def __init__(self, train_task_name: str = AppConstants.TASK_TRAIN, policy_file: str = POLICY_FILE):
        """The site's secure-sum state for one job.

        Args:
            train_task_name: the task whose results are masked.
            policy_file: the site's policy in its ``local/`` folder (roster, threshold floor, signatures,
                server-blind, neighbour degree; see ``SitePolicy``). A site that runs from a startup kit must have
                one; without a kit (the FLARE simulator) a missing file means the server's list of sites is taken as
                the roster, with a warning. With a kit, advertisements must be signed unless the policy says
                ``require_signed: false``; a missing kit file then refuses the job.
        """
        super().__init__()
        self.train_task_name = train_task_name
        self.policy_file = policy_file
        self.client: SecureSumClient | None = None
        self.site = ""
        self.app_sha256 = ""
        self.ledger = Ledger()
        self.server_records: list[dict] = []  # the server's ledger as last checked
        self.halted = ""  # why this site stopped taking part, after a ledger mismatch
        self.round: int | None = None
        self.participants: list[str] = []
        # server-blind: the group seed addressed to this site, its copy of the global model and the last round
        # whose aggregate that copy holds (-1: the initial model)
        self.group_seed_ciphertext = b""
        self.global_model: dict[str, np.ndarray] | None = None
        self.global_round: int | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.site = fl_ctx.get_identity_name()
            run_dir = self._run_dir(fl_ctx)
            self.app_sha256 = self._app_sha256(fl_ctx, run_dir)
            self.ledger = Ledger(os.path.join(run_dir, SITE_LEDGER_FILE) if run_dir else None)

    # -- key setup
    def advertise(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        """Check the server's settings against this site's policy, then make and advertise this job's keys."""
        job_id = fl_ctx.get_job_id()
        if data.get("job_id") != job_id:
            raise RefusedError(f"key setup for job {data.get('job_id')}, but this is job {job_id}")
        config = SecureSumConfig.from_dict(data["config"])
        policy = self._policy(fl_ctx)
        kit = self._startup_kit(fl_ctx, policy)
        self.client = SecureSumClient(
            self.site or fl_ctx.get_identity_name(),
            job_id,
            config,
            *kit,
            policy=policy,
            announced=list(data.get("sites") or []),
        )
        self.log_info(fl_ctx, f"secure sum settings accepted against this site's policy: {config.to_dict()}")
        if not kit[0]:
            self.log_warning(fl_ctx, "secure sum: no startup kit; the key advertisement is not authenticated")
        reply = Shareable()
        reply["advertisement"] = self.client.advertise().to_dict()
        return reply

    def share_keys(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        client = self._client()
        adverts = [Advertisement.from_dict(a) for a in data["advertisements"]]
        reply = Shareable()
        reply["key_shares"] = client.share_keys(adverts)
        self.ledger.append(
            {
                "kind": "setup",
                "site": client.site,
                "job_id": client.job_id,
                "app_sha256": self.app_sha256,
                "config": client.config.to_dict(),
                "roster": client.members,
                "advertisements_sha256": advertisements_digest(list(client.peers.values())),
            }
        )
        return reply

    # -- a round
    def receive_task(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Task data of ``train`` or ``validate``: the ledger and model checked; server-blind, the model rebuilt."""
        self._check_live()
        task_name = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        dxo = from_shareable(shareable)
        blind = dxo.get_meta_prop(BLIND_META) is not None
        digest = payload_model_digest(dxo.data) if blind else model_digest(dxo.data)
        if task_name == self.train_task_name:
            self._check_server_ledger(list(shareable.get_header(LEDGER_HEADER) or []), fl_ctx)
            expected = expected_model_digest(self.server_records)
            if digest != expected:
                self._halt(f"the task's global model {digest[:16]} is not the ledger's {expected[:16]}", fl_ctx)
            self.round = shareable.get_header(AppConstants.CURRENT_ROUND)
            self.participants = list(shareable.get_header(PARTICIPANTS_HEADER) or [])
            self.ledger.append(
                {
                    "kind": "received",
                    "round": self.round,
                    "ledger_head": self.server_records[-1]["hash"],
                    "model_sha256": digest,
                }
            )
        else:
            matches = digest == expected_model_digest(self.server_records)
            self.ledger.append({"kind": "validated", "model_sha256": digest, "is_ledger_final_model": matches})
            say = self.log_info if matches else self.log_warning
            say(fl_ctx, f"secure sum: {task_name} scores {'the' if matches else 'NOT the'} ledger's final model")
        if blind:
            weights = self.open_blind(dxo.data, fl_ctx)
            DXO(data_kind=DataKind.WEIGHTS, data=weights).update_shareable(shareable)
        return shareable

    def mask(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """The train result with its update replaced by the signed masked upload."""
        self._check_live()
        dxo = from_shareable(shareable)
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1.0)
        upload = self.masked_upload(dict(dxo.data), float(weight), fl_ctx)
        self.ledger.append(
            {
                "kind": "masked",
                "round": upload.round,
                "participants": sorted(self.participants),
                "upload_sha256": self._client().masked_round(upload.round).upload_digest.hex(),
            }
        )
        masked = DXO(data_kind=DataKind.COLLECTION, data=upload.to_dict(), meta={SECURE_META: dxo.data_kind})
        masked.update_shareable(shareable)
        return shareable

    def masked_upload(self, update: dict, weight: float, fl_ctx: FLContext):
        if self.round is None:
            raise RefusedError("no train task data was seen for this result: nothing to mask for")
        return self._client().mask(update, weight, self.round, self.participants, self.group_seed_ciphertext)

    def consistency(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        self._check_live()
        round_number, uploaded = int(data["round"]), list(data["uploaded"])
        signature = self._client().consistency(round_number, uploaded)
        self.ledger.append({"kind": "signed", "round": round_number, "uploaded": sorted(uploaded)})
        self.log_info(fl_ctx, f"secure sum: signed U = {sorted(uploaded)} for round {round_number}")
        reply = Shareable()
        reply["signature"] = signature
        return reply

    def unmask(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        self._check_live()
        request = (data.get("requests") or {}).get(self.site or fl_ctx.get_identity_name())
        if request is None:
            raise RefusedError(f"no unmasking request for {self.site}")
        request = UnmaskRequest.from_dict(request)
        shares = self._client().unmask(request)
        self.ledger.append(
            {
                "kind": "revealed",
                "round": request.round,
                "self_seed_shares": sorted(shares["self-seed-share"]),
                "mask_key_shares": sorted(shares["mask-key-share"]),
            }
        )
        reply = Shareable()
        reply["shares"] = shares
        return reply

    def final_ledger(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        """The job's whole ledger after the last round, checked like every other."""
        self._check_live()
        self._check_server_ledger(list(data.get("ledger") or []), fl_ctx)
        self.ledger.append({"kind": "checked", "ledger_head": self.server_records[-1]["hash"]})
        self.log_info(fl_ctx, f"secure sum: the server's final ledger agrees with {self.site}'s own")
        return Shareable()

    # -- server-blind
    def open_blind(self, payload: Mapping, fl_ctx: FLContext) -> dict[str, np.ndarray]:
        """Server-blind: bring this site's copy of the global model up to date from the server's payload; returns a
        copy of it for the executor."""
        client = self._client()
        seeds = dict(payload.get("group_seeds") or {})
        self.group_seed_ciphertext = bytes(seeds.get(self.site or fl_ctx.get_identity_name(), b""))
        self.global_model, self.global_round, applied = open_blind_payload(
            client, payload, self.global_model, self.global_round, self.group_seed_ciphertext
        )
        if applied:
            self.log_info(
                fl_ctx,
                f"server-blind: unblinded round {applied['round']} (uploaders {applied['uploaded']}, "
                f"total weight {applied['weight']:g}) and applied it to this site's global model",
            )
            self.blind_applied(applied, fl_ctx)
        return {name: value.copy() for name, value in self.global_model.items()}

    def blind_applied(self, applied: dict, fl_ctx: FLContext) -> None:
        """Hook: the mean a server-blind round added to this site's model (tests record it)."""

    # -- checks
    def _check_server_ledger(self, records: list[dict], fl_ctx: FLContext) -> None:
        if not records:
            self._halt("the task carries no ledger", fl_ctx)
        known = [record["hash"] for record in self.server_records]
        if [record.get("hash") for record in records[: len(known)]] != known:
            self._halt("the server's ledger no longer holds the records this site checked before", fl_ctx)
        problem = chain_problem(records)
        for record in records[1:]:
            problem = problem or round_record_problem(record, records[0])
        problem = problem or cross_check(records, self.ledger.records, self.site)
        if problem:
            self._halt(f"the server's ledger contradicts this site's view: {problem}", fl_ctx)
        self.server_records = records

    def _halt(self, reason: str, fl_ctx: FLContext) -> None:
        self.halted = reason
        self.log_error(fl_ctx, f"secure sum: {reason}; {self.site} takes no further part in this job")
        raise RefusedError(reason)

    def _check_live(self) -> None:
        if self.halted:
            raise RefusedError(f"{self.site} stopped taking part in this job: {self.halted}")

    def _client(self) -> SecureSumClient:
        if self.client is None:
            raise SecureSumError("no key setup has run on this site (is SecureSumWorkflow the server's workflow?)")
        return self.client

    def _policy(self, fl_ctx: FLContext) -> SitePolicy:
        path = os.path.join(fl_ctx.get_engine().get_workspace().get_site_config_dir(), self.policy_file)
        if os.path.isfile(path):
            try:
                return SitePolicy.load(path)
            except PolicyError as err:
                raise RefusedError(str(err)) from err
        if any(os.path.isfile(p) for p in self._kit_paths(fl_ctx)):
            raise RefusedError(
                f"{self.site} runs from a startup kit but has no secure-sum policy at {path}; its admin must write "
                "the consortium roster there (pharmafl poc up and pharmafl provision install one)"
            )
        self.log_warning(fl_ctx, f"no {path}: this site takes the server's list of sites as its roster (simulation)")
        return SitePolicy()

    def _kit_paths(self, fl_ctx: FLContext) -> list[str]:
        startup = os.path.join(fl_ctx.get_engine().get_workspace().get_root_dir(), "startup")
        return [os.path.join(startup, name) for name in KIT_FILES]

    def _startup_kit(self, fl_ctx: FLContext, policy: SitePolicy) -> tuple[bytes, bytes, bytes]:
        paths = self._kit_paths(fl_ctx)
        present = [os.path.isfile(path) for path in paths]
        if policy.signatures_required(any(present)) and not all(present):
            missing = [os.path.basename(path) for path, ok in zip(paths, present, strict=True) if not ok]
            raise RefusedError(
                f"{self.site} requires signed secure-sum advertisements but its startup kit lacks "
                f"{', '.join(missing)} in {os.path.dirname(paths[0])}; the job is refused"
            )
        if not all(present):
            return b"", b"", b""
        contents = []
        for path in paths:
            with open(path, "rb") as f:
                contents.append(f.read())
        return tuple(contents)

    @staticmethod
    def _app_sha256(fl_ctx: FLContext, run_dir: str) -> str:
        """The hash of the app this site runs: the one its job-approval guard matched at deployment (FLARE edits
        the deployed client config afterwards), else the deployed folder's (the simulator)."""
        approved = os.path.join(run_dir, APPROVED_APP_FILE) if run_dir else ""
        if approved and os.path.isfile(approved):
            with open(approved) as f:
                return str(json.load(f)["sha256"])
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        return app_hash(app_root, skip_bytecode_caches=True) if app_root else ""

    @staticmethod
    def _run_dir(fl_ctx: FLContext) -> str:
        try:
            return fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        except Exception:  # a mocked engine without a workspace
            return ""


def site_component(fl_ctx: FLContext, component_id: str) -> SecureSumSite:
    site = fl_ctx.get_engine().get_component(component_id)
    if not isinstance(site, SecureSumSite):
        raise TypeError(f"component '{component_id}' must be a SecureSumSite, got {type(site)}")
    return site


class SecureSumExecutor(Executor):
    def __init__(self, site_component_id: str = "secure_sum"):
        """Answers the secure sum's own tasks (advertise, share keys, consistency, unmask, ledger).

        A refusal (the site's policy, a replayed or inconsistent request, a ledger mismatch) is logged as one line
        and answered with an error: nothing is revealed.

        Args:
            site_component_id: id of the ``SecureSumSite`` component.
        """
        super().__init__()
        self.site_component_id = site_component_id

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = site_component(fl_ctx, self.site_component_id)
        steps = {
            ADVERTISE_TASK: site.advertise,
            SHARE_KEYS_TASK: site.share_keys,
            CONSISTENCY_TASK: site.consistency,
            UNMASK_TASK: site.unmask,
            LEDGER_TASK: site.final_ledger,
        }
        if task_name not in steps:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            return steps[task_name](shareable, fl_ctx)
        except RefusedError as err:
            self.log_error(fl_ctx, f"secure sum: refused {task_name}: {err}")
        except (SecureSumError, ValueError, KeyError) as err:
            self.log_error(fl_ctx, f"secure sum {task_name} failed: {err}")
        return make_reply(ReturnCode.EXECUTION_EXCEPTION)


class SecureTaskDataFilter(Filter):
    def __init__(self, site_component_id: str = "secure_sum"):
        """Task-data filter for ``train`` and ``validate``: the ledger and model checked (``SecureSumSite``).

        On a mismatch the task fails with the reason and the site takes no further part in the job. Server-blind,
        the server's payload becomes ordinary global ``WEIGHTS`` rebuilt by the site.

        Args:
            site_component_id: id of the ``SecureSumSite`` component.
        """
        super().__init__()
        self.site_component_id = site_component_id

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            return site_component(fl_ctx, self.site_component_id).receive_task(shareable, fl_ctx)
        except (SecureSumError, KeyError, ValueError) as err:
            self.log_error(fl_ctx, f"secure sum: refused the task: {err}")
            raise


class SecureMaskFilter(Filter):
    def __init__(self, site_component_id: str = "secure_sum"):
        """Task-result filter for ``train``: replaces the executor's update by its signed masked upload.

        A result that is not OK passes unchanged. When masking is refused (no key setup, not a participant, NaN or
        Inf in the update, a second mask in the round) the result becomes an error: the site counts as dropped for
        the round and a plaintext update never leaves the site.

        Args:
            site_component_id: id of the ``SecureSumSite`` component.
        """
        super().__init__()
        self.site_component_id = site_component_id

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site = site_component(fl_ctx, self.site_component_id)
        try:
            return site.mask(shareable, fl_ctx)
        except (SecureSumError, ValueError) as err:
            self.log_error(fl_ctx, f"secure sum: cannot mask the update, nothing is uploaded this round: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
