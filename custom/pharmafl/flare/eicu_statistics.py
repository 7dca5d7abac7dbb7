"""A site's side of FLARE's federated statistics for the eICU features (``jobs/eicu_statistics``).

FLARE's ``DFStatisticsCore`` computes the statistics from a pandas frame; this component gives it the site's
training stays: each raw feature (NaN when missing: a feature's count is its observed values) and
``missing:FEATURE`` per feature. The site is the FLARE client's name, its folder ``$PHARMAFL_DATA/<site>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.statistics.df.df_core_statistics import DFStatisticsCore

from pharmafl.clinical.statistics import DATASET, MISSING
from pharmafl.clinical.train import load_site
from pharmafl.core.paths import DATA_ENV


class EicuStatistics(DFStatisticsCore):
    def __init__(self, data_root: str = ""):
        super().__init__()
        self.data_root = data_root  # empty: $PHARMAFL_DATA

    def initialize(self, fl_ctx: FLContext) -> None:
        root = os.path.expanduser(self.data_root or os.environ.get(DATA_ENV, ""))
        site = load_site(Path(root) / fl_ctx.get_identity_name())
        X, _ = site.part(DATASET)
        frame = pd.DataFrame(X, columns=site.features)
        missing = frame.isna().astype(float).add_prefix(MISSING)
        self.data = {DATASET: pd.concat([frame, missing], axis=1)}
        self.log_info(fl_ctx, f"statistics over {len(frame)} {DATASET} stays of {site.name}")
