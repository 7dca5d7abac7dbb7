"""Aggregators that validate every contribution before it can touch the global model.

``CheckedAggregator`` holds the FLARE side (sender, task, round and duplicate checks, weights, the record
of what the server received); subclasses name what makes an update unusable and how to combine
the accepted ones.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ServerCommandKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.weighted_mean import (
    dtypes_of,
    range_problem,
    shapes_of,
    update_problem,
    weight_problem,
    weighted_mean,
)
from pharmafl.flare.run_records import append_run_record
from pharmafl.flare.site_executor import PRIVACY_BUDGET_SPENT

CONTRIBUTIONS_LOG = "contributions.jsonl"
DEFAULT_MAX_WEIGHT = 1e6
# Set on the fl_ctx while FLARE hands a result of a task that is no longer standing to the workflow.
_UNKNOWN_TASK = "__pharmafl_result_of_unknown_task__"


@dataclass
class _Received:
    """Who sent a contribution (the name FLARE authenticated if any, else the one claimed), for which round."""

    site: str
    authenticated: bool
    round: object
    keys: list


class CheckedAggregator(Aggregator):
    def __init__(
        self,
        expected_data_kind: str = DataKind.WEIGHT_DIFF,
        weigh_by_local_steps: bool = True,
        max_weight: float = DEFAULT_MAX_WEIGHT,
    ):
        """Accept only usable contributions; combine them with ``combine``.

        A contribution is rejected, logged and excluded when FLARE did not authenticate its sender or
        the sender claims another name, when it answers a task that is not standing, comes from a
        stale round, is a second contribution from the same (authenticated) site in one round, has
        the wrong data kind or weight, or ``update_problem`` finds a defect in it (missing/extra
        keys, wrong shapes, non-float arrays, NaN/Inf, ...). Every contribution (accepted or not) is
        recorded, with the keys it carried, in ``<run_dir>/contributions.jsonl``: the server-side
        record of what it received. Results keep the global model's dtypes.

        Args:
            expected_data_kind: ``WEIGHT_DIFF`` or ``WEIGHTS``.
            weigh_by_local_steps: weigh by the number of local steps each client reports
                (``MetaKey.NUM_STEPS_CURRENT_ROUND``); otherwise all clients weigh the same.
            max_weight: the largest weight a client may report; a larger one is rejected, so no
                client can outweigh the others by claiming an absurd number of steps.
        """
        super().__init__()
        if expected_data_kind not in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            raise ValueError(f"expected_data_kind must be WEIGHT_DIFF or WEIGHTS, got {expected_data_kind!r}")
        if weight_problem(max_weight, sys.float_info.max):  # also refuses inf, NaN, bools and ints beyond float
            raise ValueError(f"max_weight must be a finite positive number, got {max_weight!r}")
        self.expected_data_kind = expected_data_kind
        self.weigh_by_local_steps = weigh_by_local_steps
        self.max_weight = float(max_weight)
        self._updates: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        self.rejections: list[dict] = []

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        # FLARE fires these on the submission's own fl_ctx around process_result_of_unknown_task.
        if event_type == EventType.BEFORE_PROCESS_RESULT_OF_UNKNOWN_TASK:
            fl_ctx.set_prop(_UNKNOWN_TASK, True, private=True, sticky=False)
        elif event_type == EventType.AFTER_PROCESS_RESULT_OF_UNKNOWN_TASK:
            fl_ctx.set_prop(_UNKNOWN_TASK, False, private=True, sticky=False)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        authenticated, claimed = senders(shareable)
        received = _Received(
            site=authenticated or str(claimed or "?"),
            authenticated=authenticated is not None,
            round=shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND),
            keys=[],
        )
        try:
            dxo = from_shareable(shareable)
        except Exception as err:  # a malformed payload is the client's fault, never the server's crash
            return self._reject(fl_ctx, received, f"not a DXO ({err})")
        received.keys = sorted(map(str, dxo.data)) if isinstance(dxo.data, dict) else []  # str: keys of mixed types
        problem = (
            sender_problem(authenticated, claimed)
            or self.task_problem(shareable, fl_ctx)
            or self.round_problem(received, fl_ctx)
        )
        if not problem and dxo.get_meta_prop(PRIVACY_BUDGET_SPENT) and not dxo.data:
            return self._reject(fl_ctx, received, "privacy budget spent: the site sent no update")
        problem = problem or self.content_problem(dxo, fl_ctx)
        weight, weight_issue = self.weight_of(dxo)
        if problem or weight_issue:
            return self._reject(fl_ctx, received, problem or weight_issue)
        self._updates[received.site] = (dxo.data, weight)
        self._record(fl_ctx, received, accepted=True, weight=weight)
        self.log_info(
            fl_ctx, f"accepted {received.site} round {received.round}: {len(received.keys)} arrays, weight {weight}"
        )
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if not self._updates:
            # An empty update leaves the global model exactly as it was.
            self.log_warning(fl_ctx, f"round {current_round}: no valid contribution; the global model is unchanged")
            return DXO(data_kind=self.expected_data_kind, data={}).to_shareable()
        sites = sorted(self._updates)
        updates, weights = [self._updates[s][0] for s in sites], [self._updates[s][1] for s in sites]
        combined = self.combine(updates, weights, fl_ctx)
        self.log_info(fl_ctx, f"round {current_round}: aggregated {len(sites)} contributions from {sites}")
        return DXO(
            data_kind=self.expected_data_kind, data=combined, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: sum(weights)}
        ).to_shareable()

    def task_problem(self, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        """Why the contribution answers no standing task (None if it does)."""
        task_id = shareable.get_header(ReservedHeaderKey.TASK_ID)
        if fl_ctx.get_prop(_UNKNOWN_TASK):
            return f"result of a task that is not standing (late or forged task id {task_id!r})"
        if not task_id:  # FLARE's server runner sets it on every submission it processes
            return "no task id: the result did not come through FLARE's server runner"
        return None

    def round_problem(self, received: _Received, fl_ctx: FLContext) -> str | None:
        """Why the contribution does not belong to this round (None if it does): stale, or the site's second."""
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if current_round is not None and received.round != current_round:
            return f"stale round {received.round} (current {current_round})"
        if received.site in self._updates:
            return "second contribution in this round"
        return None

    def content_problem(self, dxo: DXO, fl_ctx: FLContext) -> str | None:
        """Why the payload cannot be aggregated (None if it can): data kind, ``update_problem``, dtype range."""
        if dxo.data_kind != self.expected_data_kind:
            return f"data kind {dxo.data_kind}, expected {self.expected_data_kind}"
        return self.update_problem(dxo.data, fl_ctx) or range_problem(dxo.data, self.output_dtypes(fl_ctx))

    def weight_of(self, dxo: DXO) -> tuple[float, str | None]:
        """The contribution's weight, and why it is invalid (None if it is valid)."""
        if not self.weigh_by_local_steps:
            return 1.0, None
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        problem = weight_problem(weight, self.max_weight)
        return (math.nan, problem) if problem else (float(weight), None)

    def update_problem(self, update: dict, fl_ctx: FLContext) -> str | None:
        """Why ``update`` cannot be aggregated, None if it can: keys and shapes of the global model, dtypes, NaN/Inf."""
        return update_problem(update, self.expected_shapes(fl_ctx))

    def combine(self, updates: list[dict], weights: list[float], fl_ctx: FLContext) -> dict:
        raise NotImplementedError

    def reset(self, fl_ctx: FLContext) -> None:
        self._updates = {}

    def expected_shapes(self, fl_ctx: FLContext) -> dict | None:
        global_weights = _global_weights(fl_ctx)
        if global_weights:
            return shapes_of(global_weights)
        if self._updates:  # no global model in context: the first accepted update sets the shape
            return shapes_of(next(iter(self._updates.values()))[0])
        return None

    def output_dtypes(self, fl_ctx: FLContext) -> dict[str, np.dtype]:
        """The dtype each key is returned in: the global model's where it has it, else the first accepted update's."""
        dtypes = dtypes_of(next(iter(self._updates.values()))[0]) if self._updates else {}
        dtypes.update(dtypes_of(_global_weights(fl_ctx) or {}))
        return dtypes

    def _reject(self, fl_ctx: FLContext, received: _Received, reason: str) -> bool:
        self.log_error(fl_ctx, f"rejected contribution from {received.site} (round {received.round}): {reason}")
        self.rejections.append({"site": received.site, "round": received.round, "reason": reason})
        self._record(fl_ctx, received, accepted=False, reason=reason)
        return False

    def _record(self, fl_ctx: FLContext, received: _Received, **fields) -> None:
        append_run_record(
            fl_ctx,
            CONTRIBUTIONS_LOG,
            site=received.site,
            authenticated=received.authenticated,
            round=received.round,
            keys=received.keys,
            **fields,
        )


def senders(shareable: Shareable) -> tuple[str | None, object]:
    """(the client name FLARE authenticated, or None; the identity the client itself claims, or None).

    FLARE's server command agent sets ``ServerCommandKey.FL_CLIENT`` to the ``Client`` it found for the
    session token of the submission; the peer props are written by the client.
    """
    name = getattr(shareable.get_header(ServerCommandKey.FL_CLIENT), "name", None)
    return (name if isinstance(name, str) and name else None), shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None)


def sender_problem(authenticated: str | None, claimed: object) -> str | None:
    """Why the sender cannot be trusted (None if it can): not authenticated, or claiming another name."""
    if authenticated is None:
        return "no authenticated sender (FLARE named no client for this result)"
    if claimed is not None and claimed != authenticated:
        return f"claims to be {claimed!r} but FLARE authenticated {authenticated!r}"
    return None


def _global_weights(fl_ctx: FLContext) -> dict | None:
    global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    return global_model.get(ModelLearnableKey.WEIGHTS) if global_model is not None else None


class FedAvgAggregator(CheckedAggregator):
    """Weighted mean of the clients' updates (see ``CheckedAggregator`` for what is rejected)."""

    def combine(self, updates: list[dict], weights: list[float], fl_ctx: FLContext) -> dict:
        return weighted_mean(updates, weights, self.output_dtypes(fl_ctx))
