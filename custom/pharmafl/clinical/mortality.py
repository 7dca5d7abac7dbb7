"""The plain training script: in-hospital mortality on one site's ICU stays, no federation.

    python -m pharmafl.clinical.mortality --data runs/eicu/midwest --rounds 10 [--model mlp] [--out DIR]

It trains ``rounds`` x ``local_epochs`` epochs, as the federated job does in all, and prints the test scores (and
APACHE IVa's on the same stays) as JSON. ``pharmafl.flare.mortality_client`` is this script made federated with
FLARE's Client API: the same functions, with ``flare.receive()`` before a round and ``flare.send()`` after it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from pharmafl.clinical.statistics import global_statistics, read_statistics
from pharmafl.clinical.train import MortalityConfig, MortalityTrainer, Standardizer, load_site
from pharmafl.core.errors import InputError
from pharmafl.core.settings import settings


def parser(alone: bool = True) -> argparse.ArgumentParser:
    """The script's options; ``alone=False``: without ``--data``, which the federated script finds by site name."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if alone:
        p.add_argument("--data", required=True, help="a site folder of `pharmafl prepare eicu`")
    p.add_argument("--rounds", type=int, default=10, help="rounds of local_epochs epochs")
    p.add_argument(
        "--stats",
        default=None,
        help="FLARE's federated statistics (jobs/eicu_statistics: its JSON or run workspace) to standardise with; "
        "else the site's own",
    )
    p.add_argument("--out", default=None, help="folder for model.pt and scores.json")
    for f in fields(MortalityConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=f"MortalityConfig.{f.name}")
    return p


def config_from(args: argparse.Namespace) -> MortalityConfig:
    """The settings given on the command line (as text), typed by ``MortalityConfig``'s fields."""
    values = {}
    for f in fields(MortalityConfig):
        text = getattr(args, f.name)
        if text is not None:
            try:
                values[f.name] = text if f.type in ("str", str) else json.loads(text)
            except json.JSONDecodeError:
                raise InputError(f"--{f.name.replace('_', '-')} {text} is not a valid {f.type}.") from None
    return settings(MortalityConfig, values, "training")


def standardizer_for(site, stats_path: str | None, root: str | Path | None = None) -> Standardizer | None:
    """The global statistics' standardiser (a relative ``stats_path`` is under ``root``), or None: the site's own."""
    if not stats_path:
        return None
    path = Path(stats_path).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    own = Standardizer.fit(site.part("train")[0])
    return Standardizer.from_statistics(global_statistics(read_statistics(path), site.features), site.features, own)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from(args)
        site = load_site(args.data)
        trainer = MortalityTrainer(site, config, standardizer_for(site, args.stats))
    except InputError as err:  # a user's mistake; anything else is a bug and keeps its traceback
        print(f"mortality: error: {err}", file=sys.stderr)
        return 2
    for _ in range(args.rounds):
        trainer.train()
    result = {"site": site.name, "test": trainer.evaluate("test"), "pos_weight": trainer.pos_weight}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.model.state_dict(), out / "model.pt")
        (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
