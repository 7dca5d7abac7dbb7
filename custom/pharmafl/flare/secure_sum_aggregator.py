"""Server side of the masked secure sum in FLARE: holds the protocol state, checks uploads, unmasks the sum.

The key-setup workflow (``SecureKeySetup``) and the Scatter-and-Gather extension (``SecureScatterAndGather``) drive
it; this class only adapts ``pharmafl.aggregation.secure_sum.SecureSumServer`` to FLARE's Aggregator interface.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.fra_lora import RESIDUAL_POLICIES, fra_lora_from_deltas
from pharmafl.aggregation.secure_sum.keys import Advertisement
from pharmafl.aggregation.secure_sum.protocol import (
    MaskedUpload,
    SecureSumConfig,
    SecureSumError,
    SecureSumServer,
)
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.flare.run_records import append_run_record, run_dir_of

SECURE_SUM_LOG = "secure_sum.jsonl"
SECURE_META = "secure_sum_kind"  # DXO meta of a masked upload: the data kind of the update it hides
MEANS_DIR = "secure_sum_means"  # record_means: the decoded mean (server-blind: the blind sum) of each round, for tests
BLIND_META = "secure_sum_blind"  # DXO meta of a server-blind aggregate or global-model payload


def _blind_payload(result) -> dict:
    """What the sites need to unblind a round: its number, uploaders, layout and the group-masked sum."""
    return {
        "round": result.round,
        "uploaded": list(result.uploaded),
        "layout": [[name, list(shape), dtype] for name, shape, dtype in result.layout],
        "blind_sum": result.blind_sum,
    }


class MaskedSecureSumAggregator(Aggregator):
    def __init__(
        self,
        threshold: int = 0,
        clip: float = 8.0,
        max_weight: float = 1e4,
        fraction_bits: int | None = None,
        modulus_bits: int | None = None,
        neighbours: int | None = None,
        server_blind: bool = False,
        aggregation: str = "mean",
        rank: int = 16,
        residual_policy: str = "drop",
        weigh_by_local_steps: bool = True,
        output_data_kind: str = DataKind.WEIGHT_DIFF,
        root_ca_path: str = "",
        require_signed: bool = False,
        record_means: bool = False,
    ):
        """Aggregate masked uploads: the server learns the weighted mean of the updates, never one update.

        A masked upload is rejected, recorded in ``contributions.jsonl`` and treated as a dropout when it is from a
        stale round or replayed, does not verify against its site's advertised signing key (tampered), or has the
        wrong size or layout. Each round's outcome (uploaded, dropped, survivors, or why it failed) goes to
        ``secure_sum.jsonl``. A round that cannot be unmasked yields an empty update: the global model stays as it was.

        Args:
            threshold: t, the sites needed to unmask a round; 0 means a majority of the sites at key setup.
            clip: update values are clipped to ``[-clip, clip]`` before encoding.
            max_weight: client weights (local steps) are clipped to this.
            fraction_bits: quantization ``2^-fraction_bits``; None: the most the modulus allows.
            modulus_bits: 32 or 64; None: chosen.
            neighbours: None: masks between all pairs; 0: SecAgg+ graph with k = 2 ceil(log2 n); k: that k.
            server_blind: the sites add a group mask the server cannot remove: the server's result is the still
                group-masked sum (``BLIND_META`` DXO: round, uploaders, layout, blind sum), which
                ``pharmafl.flare.secure_sum_blind.BlindShareableGenerator`` forwards and the sites unblind. Only
                with ``aggregation="mean"``.
            aggregation: ``mean`` (FedAvg of the updates) or ``fra-lora`` (the mean of the clients' ``<module>.delta``
                truncated to rank ``rank``, as ``FRALoRAAggregator`` with ``upload="delta"``).
            rank, residual_policy: FRA-LoRA settings.
            weigh_by_local_steps: weigh by ``NUM_STEPS_CURRENT_ROUND`` (else every site weighs 1).
            output_data_kind: data kind of the mean (``WEIGHT_DIFF`` for updates; FRA-LoRA always gives ``WEIGHTS``).
            root_ca_path: consortium root CA; "" uses ``<workspace>/startup/rootCA.pem`` when it exists.
            require_signed: refuse advertisements not signed by a startup-kit key (provisioned deployments).
            record_means: write each round's decoded mean (server-blind: the blind sum the server holds) to
                ``<run_dir>/secure_sum_means/`` (tests).
        """
        super().__init__()
        if aggregation not in ("mean", "fra-lora"):
            raise ValueError(f"aggregation must be 'mean' or 'fra-lora', got {aggregation!r}")
        if server_blind and aggregation != "mean":
            raise ValueError(
                f"server_blind works only with linear aggregation (aggregation 'mean'), not {aggregation!r}: "
                "FRA-LoRA factorises the mean update on the server, so the server must see it; "
                "set server_blind to false or aggregation to 'mean'"
            )
        if residual_policy not in RESIDUAL_POLICIES:
            raise ValueError(f"residual_policy must be one of {RESIDUAL_POLICIES}, got {residual_policy!r}")
        if output_data_kind not in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            raise ValueError(f"output_data_kind must be WEIGHT_DIFF or WEIGHTS, got {output_data_kind!r}")
        if not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"threshold must be 0 (majority) or a positive integer, got {threshold!r}")
        # Validate the shared settings now (overflow for even one site, neighbours) with a placeholder threshold
        self.settings = dict(
            clip=clip,
            max_weight=max_weight,
            fraction_bits=fraction_bits,
            modulus_bits=modulus_bits,
            neighbours=neighbours,
            aggregation=aggregation,
            require_signed=require_signed,
            server_blind=bool(server_blind),
        )
        # (the number of sites is known at key setup, where it is checked again)
        SecureSumConfig(threshold=max(threshold, 1), **self.settings).fixed_point(1)
        self.threshold = threshold
        self.rank, self.residual_policy = rank, residual_policy
        self.weigh_by_local_steps = weigh_by_local_steps
        self.output_data_kind = DataKind.WEIGHTS if aggregation == "fra-lora" else output_data_kind
        self.server_blind = bool(server_blind)
        self.root_ca_path = root_ca_path
        self.record_means = record_means
        self.server: SecureSumServer | None = None
        self.config: SecureSumConfig | None = None
        self.residual = None
        self._result: dict | None = None
        self._failure: str | None = None
        self._round_record: dict = {}

    # -- key setup (called by SecureKeySetup)
    def configure(self, sites: int, rounds: int, fl_ctx: FLContext) -> SecureSumConfig:
        """The job's protocol settings for ``sites`` sites and rounds 0..rounds-1; ValueError when they cannot work."""
        threshold = self.threshold or sites // 2 + 1
        if threshold > sites:
            raise ValueError(f"threshold {threshold} is larger than the {sites} sites of the job")
        self.config = SecureSumConfig(threshold=threshold, rounds=rounds, **self.settings)
        self.config.fixed_point(sites)  # refuse an overflowing configuration before any key is made
        self.server = SecureSumServer(fl_ctx.get_job_id(), self.config, self._root_ca(fl_ctx))
        return self.config

    def register_advertisements(self, adverts: list[dict], fl_ctx: FLContext) -> list[dict]:
        checked = self.server.register_advertisements([Advertisement.from_dict(a) for a in adverts])
        signed = "signed by startup kits" if self.server.root_ca_pem else "NOT authenticated (no root CA)"
        self.log_info(fl_ctx, f"secure sum: {len(checked)} sites advertised keys, {signed}")
        return [a.to_dict() for a in checked]

    def register_key_shares(self, site: str, messages: dict, fl_ctx: FLContext) -> None:
        self.server.register_key_shares(site, messages)

    def group_seed_ciphertexts(self) -> dict[str, bytes]:
        """Server-blind: the group seed, encrypted to each site by the lowest-named one (opaque to the server)."""
        if self.server is None:
            raise SecureSumError("no key setup ran before the training rounds; add SecureKeySetup to the workflows")
        return dict(self.server.group_seed_ciphertexts)

    # -- rounds (called by SecureScatterAndGather)
    def start_round(self, fl_ctx: FLContext) -> list[str]:
        """The round's participants; raises SecureSumError when fewer than t sites are left."""
        if self.server is None:
            raise SecureSumError("no key setup ran before the training rounds; add SecureKeySetup to the workflows")
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self._result, self._failure = None, None
        self._round_record = {"round": current_round, **({"server_blind": True} if self.server_blind else {})}
        return self.server.start_round(current_round, self._expected_layout(fl_ctx))

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        try:
            dxo = from_shareable(shareable)
            if dxo.get_meta_prop(SECURE_META) is None:
                return self._reject(fl_ctx, site, contribution_round, "not a masked upload (plaintext refused)")
            upload = MaskedUpload.from_dict(dxo.data)
        except Exception as err:  # a malformed payload is the client's fault, never the server's crash
            return self._reject(fl_ctx, site, contribution_round, f"malformed masked upload ({err})")
        if upload.site != site:
            return self._reject(fl_ctx, site, contribution_round, f"upload claims to be from {upload.site}")
        problem = self.server.receive_upload(upload)
        if problem:
            return self._reject(fl_ctx, site, contribution_round, problem)
        append_run_record(
            fl_ctx,
            CONTRIBUTIONS_LOG,
            site=site,
            round=contribution_round,
            keys=[n for n, _, _ in upload.layout],
            accepted=True,
            masked=True,
        )
        self.log_info(fl_ctx, f"accepted masked upload from {site} round {contribution_round}")
        return True

    def unmask_requests(self, fl_ctx: FLContext) -> dict[str, dict]:
        """Per site that uploaded, the shares to reveal; raises SecureSumError with fewer than t uploads."""
        return {site: request.to_dict() for site, request in self.server.unmask_requests().items()}

    def finish(self, responses: dict[str, dict], fl_ctx: FLContext) -> None:
        """Unmask with the survivors' shares; keep the round's mean (server-blind: the blind sum) for ``aggregate``."""
        result = self.server.finish(responses)
        self._round_record.update(
            status="ok",
            uploaded=result.uploaded,
            dropped=result.dropped,
            survivors=result.survivors,
            total_weight=result.total_weight,
        )
        if self.server_blind:
            self._result = {"blind": _blind_payload(result)}
            recorded = {"blind_sum": result.blind_sum}
        else:
            mean = result.mean
            if self.config.aggregation == "fra-lora":
                fra = fra_lora_from_deltas(
                    [mean], [1.0], self.rank, residual=self.residual, residual_policy=self.residual_policy
                )
                self.residual = fra.residual
                mean = fra.factors
            self._result = {"data": mean, "weight": result.total_weight}
            recorded = result.mean
        if self.record_means:
            run_dir = run_dir_of(fl_ctx)
            if run_dir:
                os.makedirs(os.path.join(run_dir, MEANS_DIR), exist_ok=True)
                np.savez(os.path.join(run_dir, MEANS_DIR, f"round_{result.round}.npz"), **recorded)
        blind = " (still under the sites' group masks)" if self.server_blind else ""
        self.log_info(
            fl_ctx,
            f"round {result.round}: unmasked the sum of {result.uploaded}{blind} with shares from {result.survivors}; "
            f"dropped {result.dropped}",
        )

    def fail_round(self, reason: str, fl_ctx: FLContext) -> None:
        self._failure = reason
        self._round_record.update(status="failed", reason=reason)
        self.log_error(fl_ctx, f"secure sum round failed: {reason}; the global model is unchanged")

    def round_record(self) -> dict:
        return dict(self._round_record)

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        if self._result is None:
            if self._failure is None:
                self.fail_round("the round was not unmasked", fl_ctx)
            # An empty update leaves the global model exactly as it was.
            if self.server_blind:
                return DXO(data_kind=DataKind.COLLECTION, data={}, meta={BLIND_META: True}).to_shareable()
            return DXO(data_kind=self.output_data_kind, data={}).to_shareable()
        if self.server_blind:
            payload = {**self._result["blind"], "data_kind": self.output_data_kind}
            return DXO(data_kind=DataKind.COLLECTION, data=payload, meta={BLIND_META: True}).to_shareable()
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: self._result["weight"]}
        return DXO(data_kind=self.output_data_kind, data=self._result["data"], meta=meta).to_shareable()

    def reset(self, fl_ctx: FLContext) -> None:
        self._result = None

    def log_round(self, fl_ctx: FLContext, **fields) -> None:
        append_run_record(fl_ctx, SECURE_SUM_LOG, **self._round_record, **fields)

    # -- helpers
    def _expected_layout(self, fl_ctx: FLContext):
        if self.config.aggregation == "fra-lora":
            return None  # deltas do not have the global factors' shapes: the first upload sets them
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = model.get(ModelLearnableKey.WEIGHTS) if model is not None else None
        if not weights:
            return None
        return [(name, tuple(np.shape(weights[name])), "") for name in sorted(weights)]

    def _root_ca(self, fl_ctx: FLContext) -> bytes:
        path = self.root_ca_path
        if not path:
            try:
                path = os.path.join(fl_ctx.get_engine().get_workspace().get_root_dir(), "startup", "rootCA.pem")
            except Exception:
                return b""
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        if self.root_ca_path:
            raise ValueError(f"root CA certificate '{path}' does not exist")
        return b""

    def _reject(self, fl_ctx: FLContext, site: str, contribution_round, reason: str) -> bool:
        self.log_error(fl_ctx, f"rejected contribution from {site} (round {contribution_round}): {reason}")
        append_run_record(
            fl_ctx,
            CONTRIBUTIONS_LOG,
            site=site,
            round=contribution_round,
            keys=[],
            accepted=False,
            reason=reason,
            masked=True,
        )
        return False
