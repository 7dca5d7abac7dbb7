"""``pharmafl baseline chem|esm``: the non-federated baselines, trained with the federated path's code."""

from __future__ import annotations

import argparse
from pathlib import Path

from pharmafl.cli.common import (
    add_executor_overrides,
    executor_overrides,
    ints,
)
from pharmafl.core.paths import job_dir

DEFAULT_JOB = job_dir("multitask_fedavg")


def cmd_baseline_chem(args: argparse.Namespace) -> int:
    from pharmafl.multitask.baseline import run_single_partner

    overrides = {
        name: value
        for name, value in (
            ("dropout", args.dropout),
            ("learning_rate", args.learning_rate),
            ("hidden_sizes", args.hidden_sizes),
            ("regression_weight", args.regression_weight),
        )
        if value is not None
    }
    summary = run_single_partner(args.data, args.out, args.job, args.rounds, overrides=overrides)
    for site, result in summary["sites"].items():
        print(f"{site}: single-partner test AUC-ROC {result['auc_roc']:.4f}, AUC-PR {result['auc_pr']:.4f}")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_baseline_esm(args: argparse.Namespace) -> int:
    from pharmafl.binding_sites.baseline import run_esm_baseline

    summary = run_esm_baseline(args.data, args.out, args.job, args.mode, args.rounds, executor_overrides(args))
    for site, result in summary["sites"].items():
        print(f"{site}: {args.mode} F1 {result['site']['f1']:.4f} (own test), {result['common']['f1']:.4f} (common)")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_baseline_eicu(args: argparse.Namespace) -> int:
    from pharmafl.clinical.baseline import run_eicu_baseline

    summary = run_eicu_baseline(args.data, args.out, args.job, args.mode, args.rounds, executor_overrides(args))
    for site, result in summary["sites"].items():
        print(f"{site}: {args.mode} test AUROC {result['auroc']:.4f}, AUPRC {result['auprc']:.4f}")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    baseline = commands.add_parser("baseline", help="non-federated baselines").add_subparsers(
        dest="kind", required=True
    )
    baseline_chem = baseline.add_parser("chem", help="each partner trains alone with the job's settings")
    baseline_chem.add_argument("--data", required=True)
    baseline_chem.add_argument("--out", required=True)
    baseline_chem.add_argument("--job", default=str(DEFAULT_JOB), help="job whose model and hyperparameters to use")
    baseline_chem.add_argument("--rounds", type=int, default=None, help="override the job's num_rounds")
    baseline_chem.add_argument("--dropout", type=float, default=None, help="override the job's dropout")
    baseline_chem.add_argument("--learning-rate", type=float, default=None, help="override the job's learning rate")
    baseline_chem.add_argument("--hidden-sizes", type=ints, default=None, help="override the trunk layers")
    baseline_chem.add_argument(
        "--regression-weight",
        type=float,
        default=None,
        help="override the job's regression_weight (the federated run's --set regression_weight=...)",
    )
    baseline_chem.set_defaults(func=cmd_baseline_chem)

    baseline_esm = baseline.add_parser("esm", help="ESM-2 LoRA centralized or local training, same total steps")
    baseline_esm.add_argument("--data", required=True, help="output of `pharmafl prepare binding-sites`")
    baseline_esm.add_argument("--out", required=True)
    baseline_esm.add_argument("--mode", default="centralized", choices=["centralized", "local"])
    baseline_esm.add_argument("--job", default=str(job_dir("esm2_lora_fra")))
    baseline_esm.add_argument("--rounds", type=int, default=None, help="override the job's num_rounds")
    baseline_esm.add_argument("--model", default=None, help="hub name or local folder of the base model")
    add_executor_overrides(baseline_esm)
    baseline_esm.set_defaults(func=cmd_baseline_esm)

    baseline_eicu = baseline.add_parser("eicu", help="eICU mortality: each site alone, or all stays pooled")
    baseline_eicu.add_argument("--data", required=True, help="output of `pharmafl prepare eicu`")
    baseline_eicu.add_argument("--out", required=True)
    baseline_eicu.add_argument("--mode", default="local", choices=["local", "centralized"])
    baseline_eicu.add_argument("--job", default=str(job_dir("eicu_fedavg")), help="job whose script settings to use")
    baseline_eicu.add_argument("--rounds", type=int, default=None, help="override the job's num_rounds")
    add_executor_overrides(baseline_eicu)
    baseline_eicu.set_defaults(func=cmd_baseline_eicu)
