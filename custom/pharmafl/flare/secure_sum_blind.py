"""Server-blind masked secure sum in FLARE (as MELLODDY): the server only ever holds group-masked aggregates.

With ``MaskedSecureSumAggregator(server_blind=True)`` every upload also carries a group mask derived from a seed
that the lowest-named site sent, encrypted, to each peer at key setup. Unmasking then leaves the sum of the
uploads under the group masks: the server cannot decode it, so the sites hold the model.

- ``BlindShareableGenerator`` (server, in place of ``FullModelShareableGenerator``) keeps the opaque aggregate
  instead of applying it: the server's model stays the initial one. Each task carries the group-seed ciphertexts,
  the initial model until a first aggregate exists, and then the latest aggregate with the round it builds on.
- ``BlindModelLocator`` (server, for ``GlobalModelEval``) hands the same payload to the final ``validate`` task, so
  the sites score the model after the last round.
- ``SecureBlindFilter`` (site, a task-data filter on ``train`` and ``validate``) lets ``SecureSumSite`` remove the
  group masks, apply the weighted mean update to the site's copy of the global model and give the executor ordinary
  global ``WEIGHTS``: the executors stay unchanged.

A site that misses an aggregate (offline for a whole round) cannot rebuild the global model and says so; the
server-blind mode is for linear aggregation only (FRA-LoRA is refused).
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.secure_sum.protocol import SecureSumError
from pharmafl.flare.secure_sum_aggregator import BLIND_META, MaskedSecureSumAggregator
from pharmafl.flare.secure_sum_client import _site

BLIND_MODEL_NAME = "server_blind_global_model"


class BlindShareableGenerator(ShareableGenerator):
    #: checked by ``SecureScatterAndGather`` against the aggregator's ``server_blind``
    server_blind = True

    def __init__(self, aggregator_id: str = "aggregator"):
        """Server-blind shareable generator: forwards group-masked aggregates, never applies them.

        Args:
            aggregator_id: the ``MaskedSecureSumAggregator`` (with ``server_blind`` true) whose key setup holds the
                group-seed ciphertexts.
        """
        super().__init__()
        self.aggregator_id = aggregator_id
        self.latest: dict | None = None  # the latest round's blind aggregate, with the round it builds on
        self.model: ModelLearnable | None = None  # the server's model: the initial one, never changed

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        self.model = model
        return self.payload_dxo(fl_ctx).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        """Keep the round's blind aggregate for the next task; the server's model stays as it was."""
        dxo = from_shareable(shareable)
        if dxo.get_meta_prop(BLIND_META) is None:
            raise ValueError("BlindShareableGenerator got a plaintext aggregate: the aggregator is not server-blind")
        if dxo.data:  # an empty one: the round could not be unmasked, the global model is unchanged
            previous = self.latest["round"] if self.latest else -1
            self.latest = {**dxo.data, "previous": previous}
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if model is not None:
            self.model = model
        return self.model

    def payload_dxo(self, fl_ctx: FLContext) -> DXO:
        """What the sites need to rebuild the global model: group seeds, then the initial model or the aggregate."""
        aggregator = fl_ctx.get_engine().get_component(self.aggregator_id)
        if not isinstance(aggregator, MaskedSecureSumAggregator) or not aggregator.server_blind:
            raise ValueError(
                f"BlindShareableGenerator needs '{self.aggregator_id}' to be a MaskedSecureSumAggregator with "
                "server_blind true"
            )
        payload = {"group_seeds": aggregator.group_seed_ciphertexts()}
        if self.latest is None:
            if self.model is None:
                raise ValueError("BlindShareableGenerator has no initial model to send")
            payload["initial"] = self.model[ModelLearnableKey.WEIGHTS]
        else:
            payload["aggregate"] = self.latest
        return DXO(data_kind=DataKind.COLLECTION, data=payload, meta={BLIND_META: True})


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
        return generator.payload_dxo(fl_ctx)


class SecureBlindFilter(Filter):
    def __init__(self, site_component_id: str = "secure_sum"):
        """Site task-data filter (``train`` and ``validate``) for the server-blind mode.

        Turns the server's blind payload into ordinary global ``WEIGHTS``: ``SecureSumSite`` unblinds the
        aggregate and applies it to the site's copy of the global model. Other task data passes unchanged. When
        the model cannot be rebuilt (no key setup, a missed aggregate) the task fails with the reason.

        Args:
            site_component_id: id of the ``SecureSumSite`` component.
        """
        super().__init__()
        self.site_component_id = site_component_id

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        if dxo.get_meta_prop(BLIND_META) is None:
            return shareable
        site = _site(fl_ctx, self.site_component_id)
        try:
            weights = site.open_blind(dxo.data, fl_ctx)
        except (SecureSumError, KeyError, ValueError) as err:
            self.log_error(fl_ctx, f"server-blind: cannot rebuild the global model: {err}")
            raise
        DXO(data_kind=DataKind.WEIGHTS, data=weights).update_shareable(shareable)
        return shareable
