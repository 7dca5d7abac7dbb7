"""``pharmafl simulate``, ``report`` and ``predict``: run a job in the FLARE simulator, report it, use its models."""

from __future__ import annotations

import argparse
from pathlib import Path

from pharmafl.cli.common import (
    add_executor_overrides,
    add_overwrite,
    executor_overrides,
)
from pharmafl.core.errors import UserError
from pharmafl.core.paths import jobs_dir


def cmd_simulate(args: argparse.Namespace) -> int:
    from pharmafl.jobs.simulate import parse_fault, run_simulator

    faults = dict(parse_fault(text) for text in (args.drop or []) + (args.tamper or []))
    result = run_simulator(
        args.job,
        args.data,
        args.workspace,
        args.rounds,
        args.threads,
        executor_overrides(args),
        faults=faults,
        fault_round=args.fault_round,
        overwrite=args.overwrite,
    )
    print(f"simulation finished in {result['wall_s']:.1f} s; results in {result['run_dir']}")
    return 0


def cmd_jobs_export(args: argparse.Namespace) -> int:
    from pharmafl.jobs.export import export_all

    for path in export_all(args.out):
        print(f"exported {path}")
    return 0


def cmd_jobs_check(args: argparse.Namespace) -> int:
    from pharmafl.jobs.export import JOBS, differences

    root = Path(args.jobs) if args.jobs else jobs_dir()
    stale = {name: differences(name, root / name) for name in JOBS}
    stale = {name: files for name, files in stale.items() if files}
    for name, files in stale.items():
        print(f"{root / name}: differs from its builder in {', '.join(files)}")
    if stale:
        raise UserError(
            f"{len(stale)} job folder(s) under {root} differ from their builders; run `pharmafl jobs export`."
        )
    print(f"every job folder under {root} is what its builder exports ({', '.join(JOBS)})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pharmafl.multitask.predict import predict_smiles_file

    scored, skipped = predict_smiles_file(args.model, args.smiles, args.out, args.smiles_col)
    print(f"scored {scored} molecules, {skipped} could not be featurised (their rows say why); wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pharmafl.report import write_report

    summary, table = write_report(args.workspace, args.baseline)
    print(table)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    simulate = commands.add_parser("simulate", help="run a job in the FLARE simulator, one client per site")
    simulate.add_argument("job", help="job folder (jobs/multitask_fedavg) or a shipped job's name (multitask_fedavg)")
    simulate.add_argument("--data", required=True, help="prepared data folder (one subfolder per site)")
    simulate.add_argument("--workspace", required=True, help="simulator workspace: a new or empty folder")
    add_overwrite(simulate, "an earlier simulator workspace in --workspace")
    simulate.add_argument("--rounds", type=int, default=None, help="override the job's num_rounds")
    simulate.add_argument("--threads", type=int, default=None, help="clients run in parallel (default: all)")
    simulate.add_argument("--model", default=None, help="ESM-2 jobs: hub name or local folder of the base model")
    simulate.add_argument(
        "--drop",
        action="append",
        metavar="SITE:PHASE",
        help="secure-sum jobs, testing: SITE drops after-setup or after-upload (repeatable)",
    )
    simulate.add_argument(
        "--tamper",
        action="append",
        metavar="SITE:KIND",
        help="secure-sum jobs, testing: SITE sends a tampered or mis-sized upload (repeatable)",
    )
    simulate.add_argument("--fault-round", type=int, default=0, help="round from which --drop/--tamper apply")
    add_executor_overrides(simulate)
    simulate.set_defaults(func=cmd_simulate)

    jobs = commands.add_parser("jobs", help="the job folders, built with FLARE's Job API").add_subparsers(
        dest="action", required=True
    )
    export = jobs.add_parser("export", help="export every job from its builder (pharmafl/flare/job_builders.py)")
    export.add_argument("--out", default=None, help="folder to export into (default: the jobs/ folder)")
    export.set_defaults(func=cmd_jobs_export)
    check = jobs.add_parser("check", help="fail if a job folder differs from what its builder exports")
    check.add_argument("--jobs", default=None, help="folder holding the job folders (default: jobs/)")
    check.set_defaults(func=cmd_jobs_check)

    predict = commands.add_parser("predict", help="score new molecules with a partner's final model (trunk + head)")
    predict.add_argument("--model", required=True, help="the site's local_model.pt (or its run folder)")
    predict.add_argument("--smiles", required=True, help="CSV with a SMILES column")
    predict.add_argument("--smiles-col", default="smiles", help="the SMILES column")
    predict.add_argument("--out", required=True, help="output CSV: one probability column per task")
    predict.set_defaults(func=cmd_predict)

    report = commands.add_parser("report", help="summary.json, report.md and plots of a finished run")
    report.add_argument("workspace")
    report.add_argument(
        "--baseline",
        action="append",
        default=None,
        help="output folder of `pharmafl baseline` (repeat for ESM runs: centralized and local)",
    )
    report.set_defaults(func=cmd_report)
