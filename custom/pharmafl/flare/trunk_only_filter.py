"""Task-result filter that lets only shared trunk parameters leave a site."""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from pharmafl.models.multitask import TRUNK_PREFIX


class TrunkOnlyFilter(DXOFilter):
    def __init__(self, allowed_prefix: str = TRUNK_PREFIX):
        """Remove every entry whose name does not start with ``allowed_prefix`` and log what was removed.

        Args:
            allowed_prefix: name prefix of the parameters that may leave the site (default ``trunk.``).
        """
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
            data_kinds_to_filter=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
        )
        if not isinstance(allowed_prefix, str) or not allowed_prefix:
            raise ValueError("allowed_prefix must be a non-empty string")
        self.allowed_prefix = allowed_prefix

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        removed = sorted(name for name in dxo.data if not name.startswith(self.allowed_prefix))
        if not removed:
            return None
        for name in removed:
            del dxo.data[name]
        self.log_info(
            fl_ctx,
            f"TrunkOnlyFilter removed {len(removed)} non-trunk entries before the result left the site: {removed}",
        )
        return dxo
