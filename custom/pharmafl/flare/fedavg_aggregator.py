"""Aggregators that validate every contribution before it can touch the global model.

``CheckedAggregator`` holds the FLARE side (round, sender and duplicate checks, weights, the record
of what the server received); subclasses name what makes an update unusable and how to combine
the accepted ones.
"""

from __future__ import annotations

import math

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.weighted_mean import shapes_of, update_problem, weighted_mean
from pharmafl.flare.run_records import append_run_record

CONTRIBUTIONS_LOG = "contributions.jsonl"


class CheckedAggregator(Aggregator):
    def __init__(self, expected_data_kind: str = DataKind.WEIGHT_DIFF, weigh_by_local_steps: bool = True):
        """Accept only usable contributions; combine them with ``combine``.

        A contribution is rejected, logged and excluded when it comes from a stale round, is a
        second contribution from the same site in one round, has the wrong data kind or weight, or
        ``update_problem`` finds a defect in it (missing/extra keys, wrong shapes, NaN/Inf, ...).
        Every contribution (accepted or not) is recorded, with the keys it carried, in
        ``<run_dir>/contributions.jsonl``: the server-side record of what it received.

        Args:
            expected_data_kind: ``WEIGHT_DIFF`` or ``WEIGHTS``.
            weigh_by_local_steps: weigh by the number of local steps each client reports
                (``MetaKey.NUM_STEPS_CURRENT_ROUND``); otherwise all clients weigh the same.
        """
        super().__init__()
        if expected_data_kind not in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            raise ValueError(f"expected_data_kind must be WEIGHT_DIFF or WEIGHTS, got {expected_data_kind!r}")
        self.expected_data_kind = expected_data_kind
        self.weigh_by_local_steps = weigh_by_local_steps
        self._updates: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        self.rejections: list[dict] = []

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        try:
            dxo = from_shareable(shareable)
        except Exception as err:  # a malformed payload is the client's fault, never the server's crash
            return self._reject(fl_ctx, site, contribution_round, [], f"not a DXO ({err})")
        keys = sorted(dxo.data) if isinstance(dxo.data, dict) else []
        if current_round is not None and contribution_round != current_round:
            return self._reject(
                fl_ctx,
                site,
                contribution_round,
                keys,
                f"stale round {contribution_round} (current {current_round})",
            )
        if site in self._updates:
            return self._reject(fl_ctx, site, contribution_round, keys, "second contribution in this round")
        if dxo.data_kind != self.expected_data_kind:
            return self._reject(
                fl_ctx,
                site,
                contribution_round,
                keys,
                f"data kind {dxo.data_kind}, expected {self.expected_data_kind}",
            )
        problem = self.update_problem(dxo.data, fl_ctx)
        if problem:
            return self._reject(fl_ctx, site, contribution_round, keys, problem)
        weight = 1.0
        if self.weigh_by_local_steps:
            weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                return self._reject(fl_ctx, site, contribution_round, keys, f"invalid weight {weight!r}")
        self._updates[site] = (dxo.data, float(weight))
        self._record(fl_ctx, site, contribution_round, keys, accepted=True, weight=float(weight))
        self.log_info(fl_ctx, f"accepted {site} round {contribution_round}: {len(keys)} arrays, weight {weight}")
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

    def update_problem(self, update: dict, fl_ctx: FLContext) -> str | None:
        """Why ``update`` cannot be aggregated, None if it can: keys and shapes of the global model, NaN/Inf."""
        return update_problem(update, self.expected_shapes(fl_ctx))

    def combine(self, updates: list[dict], weights: list[float], fl_ctx: FLContext) -> dict:
        raise NotImplementedError

    def reset(self, fl_ctx: FLContext) -> None:
        self._updates = {}

    def expected_shapes(self, fl_ctx: FLContext) -> dict | None:
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if global_model is not None and global_model.get(ModelLearnableKey.WEIGHTS):
            return shapes_of(global_model[ModelLearnableKey.WEIGHTS])
        if self._updates:  # no global model in context: the first accepted update sets the shape
            return shapes_of(next(iter(self._updates.values()))[0])
        return None

    def _reject(self, fl_ctx: FLContext, site: str, contribution_round, keys: list, reason: str) -> bool:
        self.log_error(fl_ctx, f"rejected contribution from {site} (round {contribution_round}): {reason}")
        self.rejections.append({"site": site, "round": contribution_round, "reason": reason})
        self._record(fl_ctx, site, contribution_round, keys, accepted=False, reason=reason)
        return False

    def _record(self, fl_ctx: FLContext, site: str, contribution_round, keys: list, **fields) -> None:
        append_run_record(fl_ctx, CONTRIBUTIONS_LOG, site=site, round=contribution_round, keys=keys, **fields)


class FedAvgAggregator(CheckedAggregator):
    """Weighted mean of the clients' updates (see ``CheckedAggregator`` for what is rejected)."""

    def combine(self, updates: list[dict], weights: list[float], fl_ctx: FLContext) -> dict:
        return weighted_mean(updates, weights)
