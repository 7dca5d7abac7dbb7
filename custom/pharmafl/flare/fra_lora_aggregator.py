"""FRA-LoRA aggregator: the global LoRA adapter from the mean of the clients' full updates B·A."""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.fra_lora import (
    check_lora_update,
    find_lora_pairs,
    fra_lora_aggregate,
    fra_lora_from_deltas,
    naive_factor_average,
    padded_to_rank,
    product_error,
)
from pharmafl.aggregation.weighted_mean import shapes_of, update_problem
from pharmafl.flare.fedavg_aggregator import DEFAULT_MAX_WEIGHT, CheckedAggregator
from pharmafl.flare.run_records import append_run_record

ROUNDS_FILE = "fra_lora_rounds.jsonl"  # one line per round in the server's run folder
# the naive-averaging error is measured (dense, float64) when the LoRA modules hold at most this many entries in all
NAIVE_ERROR_MAX_ENTRIES = 1 << 24

UPLOADS = ("factors", "delta")
RESIDUAL_POLICIES = ("drop", "carry")


class FRALoRAAggregator(CheckedAggregator):
    def __init__(
        self,
        rank: int = 16,
        upload: str = "factors",
        residual_policy: str = "drop",
        weigh_by_local_steps: bool = True,
        max_weight: float = DEFAULT_MAX_WEIGHT,
    ):
        """Weighted mean of the clients' B·A per LoRA module, truncated back to rank ``rank``.

        Clients send their LoRA factors (``upload="factors"``, small) or each module's full update
        (``upload="delta"``, keys ``<module>.delta``; what secure aggregation needs). Every other
        entry (the classification head) is averaged. The result replaces the global adapter
        (``WEIGHTS``), in the global model's dtypes where it has the key. Each round appends a line to
        ``fra_lora_rounds.jsonl`` in the run folder: the energy the truncation kept per module (min, median, mean)
        and, for factor uploads up to ``NAIVE_ERROR_MAX_ENTRIES`` adapter entries (ESM-2 35M is 8.3M), how far
        averaging A and B separately would have landed from the mean of B·A on the same uploads
        (``naive_error``: ||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F, ranks zero-padded). Clients may
        train lower ranks than ``rank`` (the executor's ``site_ranks``): their B_u A_u enter the mean as they
        are, and each takes the leading r_u components of the result, its best rank-r_u approximation. A client's
        factors with a rank above ``rank``, the wrong shape or dtype, or NaN/Inf, are excluded (and everything
        ``CheckedAggregator`` rejects).

        Args:
            rank: rank of the global adapter.
            upload: ``factors`` or ``delta``, as the clients' executors are configured.
            residual_policy: ``drop`` (default) or ``carry``: keep what truncation left out and add
                it to the next round's mean, so no update is lost over rounds.
            weigh_by_local_steps: weigh clients by their reported local steps.
            max_weight: the largest weight a client may report.
        """
        super().__init__(
            expected_data_kind=DataKind.WEIGHTS, weigh_by_local_steps=weigh_by_local_steps, max_weight=max_weight
        )
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}, got {upload!r}")
        if residual_policy not in RESIDUAL_POLICIES:
            raise ValueError(f"residual_policy must be one of {RESIDUAL_POLICIES}, got {residual_policy!r}")
        self.rank = rank
        self.upload = upload
        self.residual_policy = residual_policy
        self.residual = None

    def expected_shapes(self, fl_ctx: FLContext) -> dict | None:
        if self.upload == "delta":  # full updates do not have the global factors' shapes: the first one sets them
            return shapes_of(next(iter(self._updates.values()))[0]) if self._updates else None
        return super().expected_shapes(fl_ctx)

    def update_problem(self, update: dict, fl_ctx: FLContext) -> str | None:
        if self.upload == "delta":
            return update_problem(update, self.expected_shapes(fl_ctx))
        # The plain checks first: pairing LoRA keys by name needs string keys.
        return update_problem(update, None) or check_lora_update(update, self.expected_shapes(fl_ctx), self.rank)

    def combine(self, updates: list[dict], weights: list[float], fl_ctx: FLContext) -> dict:
        aggregate = fra_lora_from_deltas if self.upload == "delta" else fra_lora_aggregate
        result = aggregate(
            updates,
            weights,
            self.rank,
            residual=self.residual,
            residual_policy=self.residual_policy,
            dtypes=self.output_dtypes(fl_ctx),
        )
        self.residual = result.residual
        record = {"round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND), "clients": len(updates)}
        if result.retained_energy:
            energies = sorted(result.retained_energy.values())
            record["retained_energy"] = {
                "min": energies[0], "median": energies[len(energies) // 2], "mean": float(np.mean(energies))
            }  # fmt: skip
            self.log_info(
                fl_ctx,
                f"FRA-LoRA rank {self.rank}: retained energy per module min {energies[0]:.4f}, "
                f"median {energies[len(energies) // 2]:.4f} over {len(energies)} modules",
            )
        if self.upload == "factors":
            record["naive_error"] = self.naive_error(updates, weights)
        append_run_record(fl_ctx, ROUNDS_FILE, **record)
        return result.factors

    def naive_error(self, updates: list[dict], weights: list[float]) -> float | None:
        """How far mean(B) mean(A) lands from mean(B A) on these uploads (None above the size bound)."""
        pairs = find_lora_pairs(updates[0])
        if sum(np.asarray(updates[0][b]).shape[0] * np.asarray(updates[0][a]).shape[1] for a, b in pairs) > (
            NAIVE_ERROR_MAX_ENTRIES
        ):
            return None
        padded = [padded_to_rank(update, self.rank, pairs) for update in updates]
        return product_error(naive_factor_average(padded, weights), padded, weights, pairs)
