"""The plain training script: in-hospital mortality on one site's ICU stays, no federation.

    python -m pharmafl.clinical.mortality --data runs/eicu/midwest --rounds 10 [--model mlp] [--out DIR]
        [--dp-target-epsilon 8 [--dp-noise-multiplier S] [--dp-max-grad-norm C] [--dp-delta D] [--dp-epochs E]]

It trains ``rounds`` x ``local_epochs`` epochs, as the federated job does in all, and prints the test scores (and
APACHE IVa's on the same stays) as JSON. ``pharmafl.flare.mortality_client`` is this script made federated with
FLARE's Client API: the same functions, with ``flare.receive()`` before a round and ``flare.send()`` after it.

The ``--dp-*`` options (the ``DPConfig`` fields) train with DP-SGD, one ICU stay the privacy unit: the epsilon spent
is printed each round (on stderr) and kept in the scores; a target epsilon alone is spread over ``rounds`` x
``local_epochs`` epochs unless ``--dp-epochs`` says otherwise.
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
from pharmafl.privacy.dp_sgd import DPConfig

DP_PREFIX = "dp_"  # the DPConfig fields' options: --dp-target-epsilon, --dp-noise-multiplier, ...


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
    for f in fields(DPConfig):
        name = DP_PREFIX + f.name
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=f"DPConfig.{f.name} (DP-SGD)")
    return p


def _given(args: argparse.Namespace, settings_class: type, prefix: str = "") -> dict:
    """The fields of ``settings_class`` given on the command line (as text), typed by the fields' types."""
    values = {}
    for f in fields(settings_class):
        text = getattr(args, prefix + f.name)
        if text is not None:
            try:
                values[f.name] = text if f.type in ("str", str) else json.loads(text)
            except json.JSONDecodeError:
                raise InputError(f"--{(prefix + f.name).replace('_', '-')} {text} is not a valid {f.type}.") from None
    return values


def config_from(args: argparse.Namespace) -> MortalityConfig:
    """The settings given on the command line (as text), typed by ``MortalityConfig``'s fields."""
    return settings(MortalityConfig, _given(args, MortalityConfig), "training")


def dp_config_from(args: argparse.Namespace, config: MortalityConfig, rounds: int | None = None) -> DPConfig:
    """The ``--dp-*`` options as a ``DPConfig``; a target epsilon alone is planned over ``rounds`` x local epochs
    (when ``rounds`` is known and ``--dp-epochs`` is not given)."""
    values = _given(args, DPConfig, DP_PREFIX)
    planned = values.get("target_epsilon") is not None and values.get("noise_multiplier") is None
    if planned and values.get("epochs") is None and rounds is not None:
        values["epochs"] = rounds * config.local_epochs
    return settings(DPConfig, values, "dp")


def privacy_line(site: str, step: str, privacy: dict) -> str:
    """One line of what DP-SGD has spent, for a person reading the log."""
    spent = " (budget spent: training stops)" if privacy["exhausted"] else ""
    target = privacy["target_epsilon"]
    return (
        f"{site} {step}: DP-SGD epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:.2g} after "
        f"{privacy['steps']} steps (noise multiplier {privacy['noise_multiplier']:.3f}, "
        f"{'no target' if target is None else f'target {target:.3f}'}){spent}"
    )


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
        dp = dp_config_from(args, config, args.rounds)
        site = load_site(args.data)
        trainer = MortalityTrainer(site, config, standardizer_for(site, args.stats), dp)
    except InputError as err:  # a user's mistake; anything else is a bug and keeps its traceback
        print(f"mortality: error: {err}", file=sys.stderr)
        return 2
    for round_number in range(args.rounds):
        trainer.train()
        if trainer.budget is not None:
            privacy = trainer.privacy()
            print(privacy_line(site.name, f"round {round_number + 1}/{args.rounds}", privacy), file=sys.stderr)
            if privacy["exhausted"]:
                break
    result = {"site": site.name, "test": trainer.evaluate("test"), "pos_weight": trainer.pos_weight}
    if trainer.budget is not None:
        result["privacy"] = trainer.privacy()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.model.state_dict(), out / "model.pt")
        (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
