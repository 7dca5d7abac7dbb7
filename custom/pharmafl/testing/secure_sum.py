"""Secure-sum test components: a site that fails on purpose, recorders of plaintext, and an actively malicious server.

- ``FaultySecureSumSite`` (in place of ``SecureSumSite``): ``faults`` maps a site to ``PHASE`` or ``PHASE@ROUND``;
  that site misbehaves from ROUND (else ``fault_round``) on. ``after-setup``: never uploads; ``after-upload``:
  uploads in that round, then answers nothing more; ``tampered``: its upload is altered after signing;
  ``mis-sized``: it signs and sends an upload one value short. With ``record_updates`` it keeps each uploaded update
  in plaintext (and, server-blind, each unblinded mean and its model) on its own disk, so tests can check the mean.
- ``RecordingSecureSumWorkflow`` (in place of ``SecureSumWorkflow``): writes each round's decoded mean (server-blind:
  the blind sum the server holds) to ``<run_dir>/secure_sum_means/``.
- ``InconsistentUWorkflow``: the "only X and you uploaded" attack run for real: in the attacked round each site is
  told its own U, every signature is forwarded to everyone, and each site is asked for X's secret it holds.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from pharmafl.flare.secure_sum_site import SecureSumSite
from pharmafl.flare.secure_sum_workflow import CONSISTENCY_TASK, UNMASK_TASK, SecureSumWorkflow
from pharmafl.secure_sum.protocol import SecureSumError, SecureSumResult, UnmaskRequest
from pharmafl.testing import FAULT_PHASES

RECORD_DIR = "secure_sum_plain"  # what a site uploaded, in plaintext, on its own disk
BLIND_MEAN = "blind_mean_round_{}.npz"  # server-blind: the unblinded mean a site applied
BLIND_MODEL = "blind_global_round_{}.npz"  # server-blind: the site's global model after that round
MEANS_DIR = "secure_sum_means"  # the server's decoded mean (server-blind: the blind sum) of each round


def parse_faults(faults: dict | None, fault_round: int = 0) -> dict[str, tuple[str, int]]:
    """``{site: "PHASE"}`` or ``{site: "PHASE@ROUND"}`` as ``{site: (phase, first round)}``."""
    parsed = {}
    for site, spec in dict(faults or {}).items():
        phase, _, start = str(spec).partition("@")
        if phase not in FAULT_PHASES or (start and not start.isdigit()):
            raise ValueError(f"fault for {site} must be PHASE or PHASE@ROUND, PHASE one of {FAULT_PHASES}: {spec!r}")
        parsed[site] = (phase, int(start) if start else fault_round)
    return parsed


class FaultySecureSumSite(SecureSumSite):
    # *args with **kwargs: FLARE's Job API exports a subclass's base-class arguments only for such a constructor
    def __init__(self, faults: dict | None = None, fault_round: int = 0, record_updates: bool = False, *args, **kwargs):
        """A ``SecureSumSite`` that drops out or sends broken uploads on purpose (see the module docstring).

        Args:
            faults: ``{site: "PHASE"}`` or ``{site: "PHASE@ROUND"}``.
            fault_round: the round from which faults without ``@ROUND`` apply.
            record_updates: keep each uploaded update in plaintext in ``<run_dir>/secure_sum_plain/``.
            **kwargs: as ``SecureSumSite``.
        """
        super().__init__(*args, **kwargs)
        # the arguments as given (FLARE's Job API exports a component from its attributes), then parsed
        self.faults, self.fault_round = faults, fault_round
        self.fault_plan = parse_faults(faults, fault_round)
        self.record_updates = record_updates

    def fault(self) -> str | None:
        phase, start = self.fault_plan.get(self.site, (None, 0))
        if phase is None or self.round is None or self.round < start:
            return None
        return phase

    def gone(self, after_upload: bool = False) -> bool:
        phase = self.fault()
        if phase == "after-setup":
            return True
        return phase == "after-upload" and (after_upload or self.round > self.fault_plan[self.site][1])

    def masked_upload(self, update: dict, weight: float, fl_ctx: FLContext):
        if self.gone():
            raise SecureSumError(f"fault injection: dropping out in round {self.round} ({self.fault()})")
        phase = self.fault()
        if phase == "mis-sized":  # a broken client: signs an upload one value short
            last = sorted(update)[-1]
            update[last] = np.asarray(update[last]).reshape(-1)[:-1]
        upload = super().masked_upload(update, weight, fl_ctx)
        if phase == "tampered":  # altered in transit, after signing
            upload.vector[1] += upload.vector.dtype.type(1)
        if self.record_updates:
            np.savez(os.path.join(self._record_dir(fl_ctx), f"round_{self.round}.npz"), __weight__=weight, **update)
        return upload

    def consistency(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        self._check_gone()
        return super().consistency(data, fl_ctx)

    def unmask(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        self._check_gone()
        return super().unmask(data, fl_ctx)

    def final_ledger(self, data: Shareable, fl_ctx: FLContext) -> Shareable:
        self._check_gone()
        return super().final_ledger(data, fl_ctx)

    def blind_applied(self, applied: dict, fl_ctx: FLContext) -> None:
        if self.record_updates:
            folder = self._record_dir(fl_ctx)
            round_number = applied["round"]
            np.savez(
                os.path.join(folder, BLIND_MEAN.format(round_number)), __weight__=applied["weight"], **applied["mean"]
            )
            np.savez(os.path.join(folder, BLIND_MODEL.format(round_number)), **applied["model"])

    def _check_gone(self) -> None:
        if self.gone(after_upload=True):
            raise SecureSumError("fault injection: this site has dropped and does not answer")

    def _record_dir(self, fl_ctx: FLContext) -> str:
        folder = os.path.join(self._run_dir(fl_ctx), RECORD_DIR)
        os.makedirs(folder, exist_ok=True)
        return folder


class RecordingSecureSumWorkflow(SecureSumWorkflow):
    """``SecureSumWorkflow`` that writes each round's decoded mean (server-blind: the blind sum) to disk."""

    def round_unmasked(self, result: SecureSumResult, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, MEANS_DIR), exist_ok=True)
        recorded = {"blind_sum": result.blind_sum} if result.blind_sum is not None else result.mean
        np.savez(os.path.join(run_dir, MEANS_DIR, f"round_{result.round}.npz"), **recorded)


class InconsistentUWorkflow(RecordingSecureSumWorkflow):
    def __init__(self, target: str = "site-1", attacked_round: int = 0, *args, **kwargs):  # *args: see above
        """An actively malicious server: in ``attacked_round`` each site sees its own U of size t built around
        ``target`` ({target, the site, its next peer}); all signatures are forwarded to everyone and each site is
        asked for target's self-seed share (target in its U) and the mask-key shares of everyone outside its U.

        Args:
            target: the site whose update the server is after.
            attacked_round: the round attacked; the other rounds run honestly.
            **kwargs: as ``SecureSumWorkflow``.
        """
        super().__init__(*args, **kwargs)
        self.target, self.attacked_round = target, attacked_round
        self.revealed: dict[str, dict] = {}

    def unmask(self, round_number: int, fl_ctx: FLContext, abort_signal: Signal) -> SecureSumResult:
        if round_number != self.attacked_round:
            return super().unmask(round_number, fl_ctx, abort_signal)
        server, t = self.server, self.config.threshold
        uploaded = server.consistency_targets()
        others = [site for site in uploaded if site != self.target]
        views = {site: sorted({self.target, site, others[(i + 1) % len(others)]}) for i, site in enumerate(others)}
        views[self.target] = sorted({self.target, *others[: t - 1]})
        signatures = {}
        for site, view in views.items():
            answer = self._ask(CONSISTENCY_TASK, {"round": round_number, "uploaded": view}, site, fl_ctx)
            if answer is not None:
                signatures[site] = bytes(answer["signature"])
        for site, view in views.items():
            outside = sorted(set(server.round_participants) - set(view))
            request = UnmaskRequest(
                round_number,
                view,
                signatures,
                {owner: server.uploads[owner][site] for owner in view},
                {owner: server._key_ciphertexts[(owner, site)][round_number] for owner in outside},
            )
            answer = self._ask(
                UNMASK_TASK, {"round": round_number, "requests": {site: request.to_dict()}}, site, fl_ctx
            )
            if answer is not None:
                self.revealed[site] = answer["shares"]
        self.log_info(fl_ctx, f"attack: sites that revealed shares: {sorted(self.revealed)}")
        raise SecureSumError(f"attack round {round_number}: {len(self.revealed)} sites revealed shares")

    def _ask(self, task_name: str, payload: dict, site: str, fl_ctx: FLContext) -> Shareable | None:
        answers = {}

        def collect(client_task: ClientTask, fl_ctx: FLContext) -> None:
            if client_task.result.get_return_code(ReturnCode.OK) == ReturnCode.OK:
                answers[client_task.client.name] = client_task.result

        data = Shareable()
        data.update(payload)
        task = Task(task_name, data, timeout=self.task_timeout, result_received_cb=collect)
        self.broadcast_and_wait(task, fl_ctx, [site], 1, 0)
        return answers.get(site)
