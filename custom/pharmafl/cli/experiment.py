"""``pharmafl experiment chem``: federated vs single-partner over seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from pharmafl.cli.common import (
    add_executor_overrides,
    add_overwrite,
    assignment,
    executor_overrides,
)
from pharmafl.cli.prepare import add_split_options
from pharmafl.core.paths import job_dir

DEFAULT_JOB = job_dir("multitask_fedavg")


def cmd_experiment_chem(args: argparse.Namespace) -> int:
    from pharmafl.multitask.experiment import format_seeds_table, run_chem_experiment

    result = run_chem_experiment(
        args.data,
        args.out,
        args.job,
        args.seeds,
        args.rounds,
        args.baseline_rounds,
        args.overwrite,
        progress=lambda message: print(message, flush=True),
        overrides=executor_overrides(args),
        baseline_overrides=dict(args.baseline_set or []) or None,
    )
    print(format_seeds_table(result))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_experiment_eicu(args: argparse.Namespace) -> int:
    from pharmafl.clinical.experiment import format_seeds_table, run_eicu_experiment
    from pharmafl.core.paths import default_eicu_input

    result = run_eicu_experiment(
        args.input or default_eicu_input(),
        args.out,
        args.seeds,
        args.sites,
        args.rounds,
        args.threads,
        executor_overrides(args),
        args.overwrite,
        progress=lambda message: print(message, flush=True),
    )
    print(format_seeds_table(result))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_experiment_esm(args: argparse.Namespace) -> int:
    from pharmafl.binding_sites.experiment import format_seeds_table, run_esm_experiment
    from pharmafl.cli.prepare import split_config

    split = split_config(args)  # the seed is each run's
    overrides = executor_overrides(args) or {}
    overrides.setdefault("max_length", args.max_length)  # the crop the chains were prepared with
    result = run_esm_experiment(
        args.inputs,
        args.out,
        split,
        args.seeds,
        args.rounds,
        args.variant or (),
        overrides,
        args.threads,
        args.overwrite,
        progress=lambda message: print(message, flush=True),
    )
    print(format_seeds_table(result))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def _variant(text: str):
    from pharmafl.binding_sites.experiment import parse_variant
    from pharmafl.core.errors import InputError

    try:
        return parse_variant(text)
    except InputError as err:  # argparse's own one-line usage error, exit code 2
        raise argparse.ArgumentTypeError(str(err)) from None


def register(commands: argparse._SubParsersAction) -> None:
    experiment = commands.add_parser("experiment", help="comparisons over seeds").add_subparsers(
        dest="kind", required=True
    )
    experiment_chem = experiment.add_parser(
        "chem", help="the federated job and the single-partner baseline per seed; mean ± std and per-task tests"
    )
    experiment_chem.add_argument("--data", required=True, help="output of `pharmafl prepare chem`")
    experiment_chem.add_argument("--out", required=True, help="output folder (one subfolder per seed)")
    experiment_chem.add_argument("--job", default=str(DEFAULT_JOB), help="the multi-task job")
    experiment_chem.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    experiment_chem.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the job's)")
    experiment_chem.add_argument(
        "--baseline-rounds", type=int, default=None, help="single-partner rounds (default: the federated rounds)"
    )
    add_executor_overrides(experiment_chem)
    experiment_chem.add_argument(
        "--baseline-set",
        action="append",
        type=assignment,
        metavar="NAME=VALUE",
        help="a training setting of the single-partner side only (repeatable), e.g. --baseline-set dropout=0.2",
    )
    add_overwrite(experiment_chem, "an earlier experiment in --out")
    experiment_chem.set_defaults(func=cmd_experiment_chem)

    experiment_eicu = experiment.add_parser(
        "eicu", help="eICU mortality: federated, each site alone, centralized and APACHE IVa per seed; mean ± std"
    )
    experiment_eicu.add_argument("input", nargs="?", help="eICU-CRD tables (default: the shared demo)")
    experiment_eicu.add_argument("--out", required=True, help="output folder (one subfolder per seed)")
    experiment_eicu.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (splits and training)")
    experiment_eicu.add_argument("--sites", default="region", choices=["region", "hospital"])
    experiment_eicu.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the job's)")
    experiment_eicu.add_argument("--threads", type=int, default=None, help="simulator clients in parallel")
    add_executor_overrides(experiment_eicu)
    add_overwrite(experiment_eicu, "an earlier experiment in --out")
    experiment_eicu.set_defaults(func=cmd_experiment_eicu)

    experiment_esm = experiment.add_parser(
        "esm",
        help="ESM-2 LoRA binding sites: FRA-LoRA, naive factor averaging and centralized per seed and variant; "
        "AUPRC/AUROC and F1/MCC at validation-chosen thresholds, mean ± std",
    )
    experiment_esm.add_argument("inputs", nargs="+", help="binding-site files, as for `prepare binding-sites`")
    experiment_esm.add_argument("--out", required=True, help="output folder (one subfolder per seed)")
    experiment_esm.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (splits and training)")
    add_split_options(experiment_esm, max_length=256, val_fraction=0.15)  # the crop also sets training's
    experiment_esm.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the job's)")
    experiment_esm.add_argument(
        "--variant",
        action="append",
        type=_variant,
        metavar="NAME[:KEY=VALUE;...]",
        help="a federated setting (repeatable), e.g. 'long:rounds=2;local_steps=30' or "
        "'ranks:site_ranks={\"site-1\": 4}'; all must train the same steps per client (default: one, 'base')",
    )
    experiment_esm.add_argument(
        "--threads",
        type=int,
        default=None,
        help="simulator clients in parallel (default: all). Fewer than the clients makes FLARE's simulator start "
        "each client afresh every round: its model reloads and its batch sampler restarts from the seed",
    )
    add_executor_overrides(experiment_esm)
    add_overwrite(experiment_esm, "an earlier experiment in --out")
    experiment_esm.set_defaults(func=cmd_experiment_esm)
