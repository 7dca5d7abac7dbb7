"""Server-blind masked secure sum in FLARE (as MELLODDY): the server only ever holds group-masked aggregates.

With ``SecureSumWorkflow(secure_sum={"server_blind": true})`` every upload also carries a group mask derived from a
seed that the lowest-named site sent, encrypted, to each peer at key setup. Unmasking then leaves the sum of the
uploads under the group masks: the server cannot decode it, so the sites hold the model.

- ``BlindShareableGenerator`` (server, in place of ``FullModelShareableGenerator``) keeps the opaque aggregate
  instead of applying it: the server's model stays the initial one. Each task carries the group-seed ciphertexts,
  the initial model until a first aggregate exists, and then the latest aggregate with the round it builds on.
- ``BlindModelLocator`` (server, for ``GlobalModelEval``) hands the same payload to the final ``validate`` task, so
  the sites score the model after the last round.
- At the sites, ``SecureTaskDataFilter`` (``pharmafl.flare.secure_sum_site``) calls ``open_blind_payload``: the
  group masks removed, the weighted mean update applied to the site's copy of the global model, ordinary global
  ``WEIGHTS`` handed to the executor.

A site that misses an aggregate (offline for a whole round) cannot rebuild the global model and says so; the
server-blind mode is for linear aggregation only (FRA-LoRA is refused).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants

from pharmafl.flare.secure_sum_workflow import BLIND_META
from pharmafl.secure_sum.ledger import model_digest
from pharmafl.secure_sum.protocol import SecureSumClient, SecureSumError

BLIND_MODEL_NAME = "server_blind_global_model"


def payload_model_digest(payload: Mapping) -> str:
    """The digest of the model a blind payload carries: the latest aggregate's blind sum, else the initial model."""
    aggregate = payload.get("aggregate")
    if aggregate:
        return model_digest({"blind_sum": aggregate["blind_sum"]})
    return model_digest(payload.get("initial") or {})


def open_blind_payload(
    client: SecureSumClient,
    payload: Mapping,
    global_model: dict[str, np.ndarray] | None,
    global_round: int | None,
    group_seed_ciphertext: bytes,
) -> tuple[dict[str, np.ndarray], int, dict | None]:
    """A site's global model brought up to date from a blind payload: (model, its round, what was applied or None).

    The initial model replaces the site's copy; an aggregate newer than the copy is unblinded and applied (a failed
    round re-sends the last one, which is then skipped). Raises SecureSumError when the site missed an aggregate.
    """
    initial = payload.get("initial")
    if initial:
        global_model, global_round = {name: np.array(value, copy=True) for name, value in initial.items()}, -1
    if global_model is None:
        raise SecureSumError("this site has no copy of the global model: it missed the initial model")
    aggregate = payload.get("aggregate") or {}
    if not aggregate or int(aggregate["round"]) == global_round:
        return global_model, global_round, None
    round_number, previous = int(aggregate["round"]), int(aggregate["previous"])
    if previous != global_round:
        raise SecureSumError(
            f"the aggregate of round {round_number} builds on round {previous}, but this site's global model is at "
            f"round {global_round}: it missed an aggregate and cannot rebuild the global model"
        )
    layout = [(str(n), tuple(int(x) for x in s), str(d)) for n, s, d in aggregate["layout"]]
    uploaded = list(aggregate["uploaded"])
    weight, mean = client.unblind(
        np.asarray(aggregate["blind_sum"]), round_number, uploaded, layout, group_seed_ciphertext
    )
    wrong = sorted(name for name, value in mean.items() if np.shape(global_model.get(name)) != np.shape(value))
    if wrong:
        raise SecureSumError(f"the aggregate of round {round_number} does not fit the global model's {wrong}")
    model = dict(global_model)
    if aggregate.get("data_kind", DataKind.WEIGHT_DIFF) == DataKind.WEIGHTS:
        model.update(mean)
    else:
        for name, value in mean.items():
            model[name] = model[name] + value
    return (
        model,
        round_number,
        {"round": round_number, "uploaded": uploaded, "weight": weight, "mean": mean, "model": model},
    )


class BlindShareableGenerator(ShareableGenerator):
    #: checked by ``SecureSumWorkflow`` against its ``server_blind`` setting
    server_blind = True

    def __init__(self):
        """Server-blind shareable generator: forwards group-masked aggregates, never applies them."""
        super().__init__()
        self.group_seeds: dict[str, bytes] = {}  # set by the workflow after key setup
        self.latest: dict | None = None  # the latest round's blind aggregate, with the round it builds on
        self.model: ModelLearnable | None = None  # the server's model: the initial one, never changed

    def set_group_seeds(self, ciphertexts: Mapping[str, bytes]) -> None:
        """The group seed, encrypted to each site by the lowest-named one (opaque to the server)."""
        self.group_seeds = dict(ciphertexts)

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        self.model = model
        return self.payload_dxo().to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        """Keep the round's blind aggregate for the next task; the server's model stays as it was."""
        dxo = from_shareable(shareable)
        if dxo.get_meta_prop(BLIND_META) is None:
            raise ValueError("BlindShareableGenerator got a plaintext aggregate: the workflow is not server-blind")
        if dxo.data:  # an empty one: the round could not be unmasked, the global model is unchanged
            previous = self.latest["round"] if self.latest else -1
            self.latest = {**dxo.data, "previous": previous}
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if model is not None:
            self.model = model
        return self.model

    def payload_dxo(self) -> DXO:
        """What the sites need to rebuild the global model: group seeds, then the initial model or the aggregate."""
        if not self.group_seeds:
            raise ValueError("BlindShareableGenerator has no group seeds: no server-blind key setup ran")
        payload = {"group_seeds": dict(self.group_seeds)}
        if self.latest is None:
            if self.model is None:
                raise ValueError("BlindShareableGenerator has no initial model to send")
            payload["initial"] = self.model[ModelLearnableKey.WEIGHTS]
        else:
            payload["aggregate"] = self.latest
        return DXO(data_kind=DataKind.COLLECTION, data=payload, meta={BLIND_META: True})

    def model_digest(self, initial: ModelLearnable | None = None) -> str:
        """Digest of the model the next task carries (the ledger's ``model_after``): the latest aggregate's, else
        the initial model's (``initial`` until a first task was made)."""
        if self.latest is not None:
            return payload_model_digest({"aggregate": self.latest})
        model = self.model if self.model is not None else initial
        return model_digest(model[ModelLearnableKey.WEIGHTS] if model is not None else {})


class BlindModelLocator(ModelLocator):
    def __init__(self, shareable_generator_id: str = "shareable_generator", model_name: str = BLIND_MODEL_NAME):
        """Model locator for ``GlobalModelEval`` in the server-blind mode: the final model as the sites rebuild it.

        Args:
            shareable_generator_id: the ``BlindShareableGenerator`` of the training workflow.
            model_name: the name the model is scored under (``SRV_<model_name>`` in the cross-site results).
        """
        super().__init__()
        self.shareable_generator_id = shareable_generator_id
        self.model_name = model_name

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        return [self.model_name]

    def locate_model(self, model_name, fl_ctx: FLContext) -> DXO:
        if model_name != self.model_name:
            raise ValueError(f"model inventory does not contain {model_name}")
        generator = fl_ctx.get_engine().get_component(self.shareable_generator_id)
        if not isinstance(generator, BlindShareableGenerator):
            raise ValueError(f"component '{self.shareable_generator_id}' must be a BlindShareableGenerator")
        return generator.payload_dxo()
