"""The mortality training script made federated with FLARE's Client API (the FedML way).

``pharmafl.clinical.mortality`` trains one site alone; this script runs the same trainer under FLARE's script
runner: ``flare.init()``, then per round ``flare.receive()`` the global model, train ``local_epochs`` epochs (with
FLARE's FedProx loss when ``--fedprox-mu`` is positive) and ``flare.send()`` the model, weighted by the site's
training stays (``--weighting samples``) or 1 (``uniform``). A ``validate`` task scores the model it is sent on
the site's test stays, next to APACHE IVa on the same stays. The site's data is ``$PHARMAFL_DATA/<site name>``
(or ``--data-root``).

With the ``--dp-*`` options (DP-SGD, one ICU stay the privacy unit; the job builder passes ``--set dp.NAME=VALUE``
as ``--dp-NAME VALUE`` and plans a target epsilon alone over the job's rounds x local epochs) the epsilon spent is
printed each round and sent as the ``epsilon`` metric. FedProx's proximal term depends on no stay: its gradient is
added after clipping and noise. A site whose budget is spent trains no more: it sends the global model back with a
negligible weight and says so in the reply's meta.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import nvflare.client as flare
import torch
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

from pharmafl.clinical.mortality import config_from, dp_config_from, parser, privacy_line, standardizer_for
from pharmafl.clinical.train import MortalityTrainer, load_site
from pharmafl.core.paths import DATA_ENV
from pharmafl.flare.site_executor import PRIVACY_BUDGET_SPENT

WEIGHT_KEY = "NUM_STEPS_CURRENT_ROUND"  # what FLARE's FedAvg weighs a site's model by
SPENT_WEIGHT = 1e-9  # the weight of a site whose DP budget is spent: it sends the global model back, unchanged


def as_arrays(params: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in params.items()}


def main(argv: list[str] | None = None) -> int:
    cli = parser(alone=False)
    cli.add_argument("--data-root", default="", help=f"folder of the site folders (default: ${DATA_ENV})")
    args = cli.parse_args(argv)
    config = config_from(args)
    dp = dp_config_from(args, config)  # the job states dp.epochs: this script does not know the job's rounds
    flare.init()
    site_name = flare.get_site_name()
    root = os.path.expanduser(args.data_root or os.environ.get(DATA_ENV, ""))
    site = load_site(Path(root) / site_name)
    standardizer = standardizer_for(site, args.stats, root)
    if standardizer is not None:
        print(f"{site_name}: standardises with the federated statistics {args.stats}", flush=True)
    trainer = MortalityTrainer(site, config, standardizer, dp)
    proximal = PTFedProxLoss(mu=config.fedprox_mu) if config.fedprox_mu > 0 else None
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if received.params:
            trainer.load_state(as_arrays(received.params))
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics=trainer.evaluate("test")))
            continue
        if trainer.budget is not None and trainer.budget.exhausted:
            privacy = trainer.privacy()
            print(privacy_line(site_name, f"round {received.current_round}", privacy), flush=True)
            # no training: the global model back, weighing nothing (FLARE's FedAvg fails on a round where every
            # result is empty and takes a weight of 0 for 1)
            flare.send(
                flare.FLModel(
                    params={k: torch.from_numpy(v) for k, v in trainer.state().items()},
                    metrics={"epsilon": privacy["epsilon"]},
                    meta={WEIGHT_KEY: SPENT_WEIGHT, PRIVACY_BUDGET_SPENT: True},
                )
            )
            continue
        # FedProx: the distance to the global model as it arrived this round
        extra = partial(proximal, target=trainer.model_copy()) if proximal is not None else None
        trainer.train(extra_loss=extra)
        validation = trainer.evaluate("validation")
        metrics = {k: v for k, v in validation.items() if isinstance(v, float) and np.isfinite(v)}
        if trainer.budget is not None:
            privacy = trainer.privacy()
            metrics["epsilon"] = privacy["epsilon"]
            print(privacy_line(site_name, f"round {received.current_round}", privacy), flush=True)
        flare.send(
            flare.FLModel(
                params={k: torch.from_numpy(v) for k, v in trainer.state().items()},
                metrics=metrics,
                meta={WEIGHT_KEY: trainer.weight()},
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
