"""The ``pharmafl`` command: prepare, simulate, baseline, report, bench, poc, submit, provision, approve, ledger."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pharmafl import __version__
from pharmafl.errors import UserError
from pharmafl.jobs import repo_root

DEFAULT_CHEMBL = repo_root().parent / "shared" / "data" / "chem" / "chembl_5thresh.csv.gz"
CHEMBL_URL = "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/chembl_5thresh.csv.gz"
DEFAULT_JOB = repo_root() / "jobs" / "multitask_fedavg"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, options without a help text included."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and action.nargs != 0 and not action.required
        if shown and action.default is not argparse.SUPPRESS and "default" not in text:
            text += " (default: not set)" if action.default is None else " (default: %(default)s)"
        return text.strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _ints(text: str) -> list[int]:
    return [int(v) for v in _floats(text)]


def _assignment(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as JSON when it is JSON (numbers, true/false, lists), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _add_executor_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        type=_assignment,
        metavar="NAME=VALUE",
        help="override an executor argument of the job (repeatable), e.g. --set grad_noise_std=1e-4",
    )


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} (never a folder pharmafl did not make)"
    )


def _executor_overrides(args: argparse.Namespace) -> dict | None:
    overrides = dict(args.set or [])
    if getattr(args, "model", None):
        overrides["model"] = args.model
    return overrides or None


def _default_chem_input() -> str:
    return str(DEFAULT_CHEMBL) if DEFAULT_CHEMBL.is_file() else CHEMBL_URL


def cmd_prepare_chem(args: argparse.Namespace) -> int:
    from pharmafl.chem.prepare import PrepareConfig, prepare_chem

    if args.sites:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    else:
        if args.partners <= 0:
            raise UserError(f"--partners must be positive, got {args.partners}")
        sites = [f"site-{i + 1}" for i in range(args.partners)]
    config = PrepareConfig(
        sites=sites,
        fmt=args.format,
        smiles_col=args.smiles_col,
        thresholds=args.thresholds,
        fold_secret=args.fold_secret,
        n_bits=args.bits,
        radius=args.radius,
        test_fold=args.test_fold,
        min_train_actives=args.min_train_actives,
        min_train_inactives=args.min_train_inactives,
        min_eval_actives=args.min_eval_actives,
        min_eval_inactives=args.min_eval_inactives,
        seed=args.seed,
        max_compounds=args.max_compounds,
        compound_overlap=args.compound_overlap,
        partition=args.partition,
        library_split=args.library_split,
        library_sizes=args.library_sizes,
    )
    summary = prepare_chem(args.input or _default_chem_input(), args.out, config, overwrite=args.overwrite)
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items())
    print(f"skipped rows: {skipped}; duplicate structures merged: {summary['duplicates_merged']}")
    print(f"wrote {args.out}")
    return 0


def cmd_prepare_binding_sites(args: argparse.Namespace) -> int:
    from pharmafl.proteins.splits import SplitConfig, prepare_binding_sites

    config = SplitConfig(
        clients=args.clients,
        split=args.split,
        max_length=args.max_length,
        test_fraction=args.test_fraction,
        skew_ratios=args.skew_ratios,
        seed=args.seed,
        client_names=[s.strip() for s in args.sites.split(",")] if args.sites else None,
        max_chains_per_input=args.max_chains_per_input,
    )
    prepare_binding_sites(
        args.inputs, args.out, config, fmt=args.format, labels_path=args.labels, overwrite=args.overwrite
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from pharmafl.simulate import parse_fault, run_simulator

    faults = dict(parse_fault(text) for text in (args.drop or []) + (args.tamper or []))
    result = run_simulator(
        args.job,
        args.data,
        args.workspace,
        args.rounds,
        args.threads,
        _executor_overrides(args),
        faults=faults,
        fault_round=args.fault_round,
        overwrite=args.overwrite,
    )
    print(f"simulation finished in {result['wall_s']:.1f} s; results in {result['run_dir']}")
    return 0


def cmd_baseline_chem(args: argparse.Namespace) -> int:
    from pharmafl.baseline import run_single_partner

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
    from pharmafl.esm_baseline import run_esm_baseline

    summary = run_esm_baseline(args.data, args.out, args.job, args.mode, args.rounds, _executor_overrides(args))
    for site, result in summary["sites"].items():
        print(f"{site}: {args.mode} F1 {result['site']['f1']:.4f} (own test), {result['common']['f1']:.4f} (common)")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_experiment_chem(args: argparse.Namespace) -> int:
    from pharmafl.experiment import format_seeds_table, run_chem_experiment

    result = run_chem_experiment(
        args.data,
        args.out,
        args.job,
        args.seeds,
        args.rounds,
        args.baseline_rounds,
        args.overwrite,
        progress=lambda message: print(message, flush=True),
        overrides=_executor_overrides(args),
        baseline_overrides=dict(args.baseline_set or []) or None,
    )
    print(format_seeds_table(result))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pharmafl.chem.predict import predict_smiles_file

    scored, skipped = predict_smiles_file(args.model, args.smiles, args.out, args.smiles_col)
    print(f"scored {scored} molecules, {skipped} could not be featurised (their rows say why); wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pharmafl.report import write_report

    summary, table = write_report(args.workspace, args.baseline)
    print(table)
    return 0


def cmd_bench_trunk(args: argparse.Namespace) -> int:
    from pharmafl.bench import bench_trunk

    result = bench_trunk(args.data, args.rounds, args.workdir)
    print(json.dumps(result))
    return 0


def cmd_bench_fra_lora(args: argparse.Namespace) -> int:
    from pharmafl.bench_fra_lora import bench_fra_lora

    result = bench_fra_lora(
        args.geometries,
        args.clients,
        args.rank,
        args.repeats,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(json.dumps(result))
    return 0


def cmd_bench_secagg(args: argparse.Namespace) -> int:
    import logging

    from pharmafl import bench_secagg

    logging.getLogger("pharmafl.aggregation.secure_sum").setLevel(logging.ERROR)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    overhead = {"overhead_data": args.data, "overhead_rounds": args.rounds, "workdir": args.workdir}
    if args.quick:
        result = bench_secagg.quick_bench(progress=say, **overhead)
    else:
        result = bench_secagg.run_secagg_bench(args.lengths, args.clients, progress=say, **overhead)
    print(json.dumps(result))
    return 0


def cmd_bench_poc(args: argparse.Namespace) -> int:
    from pharmafl.consortium.bench import bench_poc

    result = bench_poc(args.data, args.rounds, args.workdir, args.port, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
    return 0


def cmd_poc_up(args: argparse.Namespace) -> int:
    from pharmafl.consortium.poc import poc_up

    result = poc_up(args.sites, args.data, args.port, args.project)
    print(
        f"POC ready in {result['wall_s']:.0f} s: server {result['server']} (admin port {result['admin_port']}), "
        f"sites {', '.join(result['sites'])}"
    )
    for site, source in result["data"].items():
        print(f"  {site} reads {source}")
    for user, kit in result["admin_kits"].items():
        print(f"  admin kit {user}: {kit}")
    print(f"workspace {result['workspace']}; submit with: pharmafl submit JOB --wait")
    return 0


def cmd_poc_status(args: argparse.Namespace) -> int:
    from pharmafl.consortium.poc import poc_status

    status = poc_status()
    if not status["prepared"]:
        print(f"no POC workspace at {status['workspace']}")
        return 1
    print(f"workspace {status['workspace']}; running: {', '.join(status['running']) or 'nothing'}")
    if "error" in status:
        print(status["error"])
    if status["connected"]:
        print(f"sites connected to the server: {', '.join(status['connected'])}")
    for job in status["jobs"]:
        print(f"  job {job['job_id']} {job['name'] or ''} {job['status']}")
    return 0 if status["running"] else 1


def cmd_poc_down(args: argparse.Namespace) -> int:
    from pharmafl.consortium.poc import poc_down

    poc_down(keep_workspace=args.keep)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pharmafl.consortium.submit import submit_job

    submit_job(args.job, args.startup_kit, args.user, args.wait, args.out, args.record, args.timeout)
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from pharmafl.consortium.provision import provision

    result = provision(args.project, args.out)
    for name, files in result["installed"].items():
        print(f"{name}: installed {', '.join(files)}")
    print(f"startup kits in {result['kits']}; check each with: nvflare preflight-check -p {result['kits']}/<name>")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from pharmafl.consortium.approval import add_entries, job_entries

    entries = job_entries(args.job)
    for path in args.add or []:
        added = add_entries(path, entries)
        print(f"{path}: {added} new entr{'y' if added == 1 else 'ies'}", file=sys.stderr)
    print(json.dumps(entries[0] if len(entries) == 1 else entries, indent=2))
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from pharmafl.aggregation.secure_sum.ledger import verify_run

    root_ca = b""
    if args.root_ca:
        try:
            root_ca = Path(args.root_ca).read_bytes()
        except OSError as err:
            raise UserError(f"cannot read the root CA '{args.root_ca}': {err.strerror}.") from err
    try:
        lines = verify_run(args.server, args.site or [], root_ca)
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    except ValueError as err:  # a line that is not JSON
        print(f"BAD {err}")
        return 1
    print("\n".join(lines))
    return 0 if all(line.startswith("OK") for line in lines) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pharmafl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pharmafl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="prepare site data").add_subparsers(dest="kind", required=True)
    chem = prepare.add_parser("chem", help="MELLODDY-style compound x assay data -> one folder per partner")
    chem.add_argument("input", nargs="?", help=f"CSV/CSV.GZ path or URL (default: {DEFAULT_CHEMBL.name})")
    chem.add_argument("--out", required=True, help="output folder (one subfolder per site)")
    _add_overwrite(chem, "an earlier preparation in --out")
    who = chem.add_mutually_exclusive_group(required=True)
    who.add_argument("--partners", type=int, help="number of simulated partners (sites site-1..site-N)")
    who.add_argument("--sites", help="comma-separated site names")
    chem.add_argument("--format", default="auto", choices=["auto", "wide", "long"])
    chem.add_argument("--smiles-col", default="smiles")
    chem.add_argument("--thresholds", type=_floats, default=(5.5, 6.5, 7.5), help="activity thresholds")
    chem.add_argument("--fold-secret", default="pharmafl-demo-secret", help="consortium secret for scaffold folds")
    chem.add_argument("--bits", type=int, default=32000, help="fingerprint length (folded ECFP)")
    chem.add_argument("--radius", type=int, default=3, help="Morgan radius (3 = ECFP6)")
    chem.add_argument("--test-fold", type=int, default=0)
    chem.add_argument("--min-train-actives", type=int, default=10)
    chem.add_argument("--min-train-inactives", type=int, default=10)
    chem.add_argument("--min-eval-actives", type=int, default=5)
    chem.add_argument("--min-eval-inactives", type=int, default=5)
    chem.add_argument("--seed", type=int, default=0, help="seed of the task-to-partner assignment")
    chem.add_argument("--max-compounds", type=int, default=None, help="use only the first N valid compounds")
    chem.add_argument(
        "--compound-overlap",
        default="shared",
        choices=["shared", "private"],
        help="--partition assays: shared = a compound is at every partner with labels on it; private = at one",
    )
    chem.add_argument(
        "--partition",
        default="assays",
        choices=["assays", "libraries"],
        help="assays: each assay belongs to one partner; libraries: each compound belongs to one partner's library "
        "and every partner has its own task for each target it measured on its compounds",
    )
    chem.add_argument(
        "--library-split",
        default="scaffold",
        choices=["scaffold", "random"],
        help="--partition libraries: whole Murcko-scaffold groups per partner (chemically distinct), or random",
    )
    chem.add_argument(
        "--library-sizes",
        type=_floats,
        default=None,
        help="--partition libraries: each partner's share, e.g. 0.5,0.3,0.2 (default: equal)",
    )
    chem.set_defaults(func=cmd_prepare_chem)

    proteins = prepare.add_parser("binding-sites", help="per-residue binding-site chains -> one folder per client")
    proteins.add_argument("inputs", nargs="+", help="GPSite three-line files, FASTA (with --labels) or CSV")
    proteins.add_argument("--out", required=True, help="output folder (one subfolder per client + common_test)")
    _add_overwrite(proteins, "an earlier preparation in --out")
    proteins.add_argument("--clients", type=int, default=2)
    proteins.add_argument("--sites", default=None, help="comma-separated client names (default site-1..site-N)")
    proteins.add_argument("--split", default="iid", choices=["iid", "label-skew", "by-source"])
    proteins.add_argument("--format", default="auto", choices=["auto", "threeline", "fasta", "csv"])
    proteins.add_argument("--labels", default=None, help="labels for FASTA input (>id + 0/1 lines, or id,labels CSV)")
    proteins.add_argument("--max-length", type=int, default=1000, help="crop longer chains")
    proteins.add_argument("--test-fraction", type=float, default=0.2)
    proteins.add_argument("--skew-ratios", type=_floats, default=(0.2, 0.8), help="label-skew high-half shares")
    proteins.add_argument("--seed", type=int, default=0)
    proteins.add_argument("--max-chains-per-input", type=int, default=None)
    proteins.set_defaults(func=cmd_prepare_binding_sites)

    simulate = commands.add_parser("simulate", help="run a job in the FLARE simulator, one client per site")
    simulate.add_argument("job", help="job folder, e.g. jobs/multitask_fedavg")
    simulate.add_argument("--data", required=True, help="prepared data folder (one subfolder per site)")
    simulate.add_argument("--workspace", required=True, help="simulator workspace: a new or empty folder")
    _add_overwrite(simulate, "an earlier simulator workspace in --workspace")
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
    _add_executor_overrides(simulate)
    simulate.set_defaults(func=cmd_simulate)

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
    baseline_chem.add_argument("--hidden-sizes", type=_ints, default=None, help="override the trunk layers")
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
    baseline_esm.add_argument("--job", default=str(repo_root() / "jobs" / "esm2_lora_fra"))
    baseline_esm.add_argument("--rounds", type=int, default=None, help="override the job's num_rounds")
    baseline_esm.add_argument("--model", default=None, help="hub name or local folder of the base model")
    _add_executor_overrides(baseline_esm)
    baseline_esm.set_defaults(func=cmd_baseline_esm)

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
    _add_executor_overrides(experiment_chem)
    experiment_chem.add_argument(
        "--baseline-set",
        action="append",
        type=_assignment,
        metavar="NAME=VALUE",
        help="a training setting of the single-partner side only (repeatable), e.g. --baseline-set dropout=0.2",
    )
    _add_overwrite(experiment_chem, "an earlier experiment in --out")
    experiment_chem.set_defaults(func=cmd_experiment_chem)

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

    bench = commands.add_parser("bench", help="benchmarks (JSON on the last line)").add_subparsers(
        dest="kind", required=True
    )
    trunk = bench.add_parser("trunk", help="local training throughput and federated overhead")
    trunk.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    trunk.add_argument("--data", default=None, help="prepared data (default: ChEMBL, 3 partners, prepared once)")
    trunk.add_argument("--rounds", type=int, default=3)
    trunk.add_argument("--workdir", default="runs/bench", help="scratch folder")
    trunk.set_defaults(func=cmd_bench_trunk)
    fra = bench.add_parser("fra-lora", help="factored vs dense FRA-LoRA aggregation at ESM-2 geometries")
    fra.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    fra.add_argument("--geometries", nargs="+", default=["35M", "650M", "3B", "15B"])
    fra.add_argument("--clients", nargs="+", type=int, default=[2, 8, 32])
    fra.add_argument("--rank", type=int, default=16)
    fra.add_argument("--repeats", type=int, default=3)
    fra.set_defaults(func=cmd_bench_fra_lora)
    secagg = bench.add_parser("secagg", help="masked secure sum vs plaintext and NVFLARE's CKKS")
    secagg.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    secagg.add_argument("--quick", action="store_true", help="a small subset: 1e5..1e7 values, 3 and 16 sites")
    secagg.add_argument("--lengths", nargs="+", type=int, default=[10**5, 10**6, 10**7, 10**8])
    secagg.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64])
    secagg.add_argument(
        "--rounds", type=int, default=3, help="rounds of multitask_secure vs multitask_fedavg (0: skip job_overhead)"
    )
    secagg.add_argument("--data", default=None, help="prepared chem data for job_overhead (default: ChEMBL, 3 sites)")
    secagg.add_argument("--workdir", default="runs/bench", help="scratch folder")
    secagg.set_defaults(func=cmd_bench_secagg)
    bench_poc = bench.add_parser("poc", help="POC up + a multi-task job as the lead + POC down, wall time")
    bench_poc.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    bench_poc.add_argument("--data", default=None, help="prepared data (default: ChEMBL, 3 partners, prepared once)")
    bench_poc.add_argument("--rounds", type=int, default=2)
    bench_poc.add_argument("--workdir", default="runs/bench", help="scratch folder (own POC workspace and HOME)")
    bench_poc.add_argument("--port", type=int, default=None, help="server FL port (default 8002)")
    bench_poc.set_defaults(func=cmd_bench_poc)

    poc = commands.add_parser("poc", help="the consortium on this machine (FLARE POC mode)").add_subparsers(
        dest="action", required=True
    )
    poc_up = poc.add_parser("up", help="prepare, install site policies, place data, start; returns when ready")
    poc_up.add_argument("--sites", type=int, default=None, help="number of data sites (default: project.yml's 3)")
    poc_up.add_argument("--data", default=None, help="prepared data: folders named like the sites, or site-1..site-N")
    poc_up.add_argument("--port", type=int, default=None, help="server FL port; admin port is port + 1 (8002)")
    poc_up.add_argument("--project", default=None, help="project.yml (default: poc_workspace/project.yml)")
    poc_up.set_defaults(func=cmd_poc_up)
    poc.add_parser("status", help="which participants run, connected sites, jobs").set_defaults(func=cmd_poc_status)
    poc_down = poc.add_parser("down", help="stop everything and remove the POC workspace (safe to repeat)")
    poc_down.add_argument("--keep", action="store_true", help="keep the workspace (logs, audit.log, results)")
    poc_down.set_defaults(func=cmd_poc_down)

    submit = commands.add_parser("submit", help="submit a job through the FLARE API")
    submit.add_argument("job", help="job folder")
    submit.add_argument("--startup-kit", default=None, help="admin startup kit (default: the POC kit of --user)")
    submit.add_argument("--user", default=None, help="FLARE user (default: the kit's name, or the POC's lead)")
    submit.add_argument("--wait", action="store_true", help="wait, check COMPLETED, download results, report")
    submit.add_argument("--out", default="runs/submitted", help="where results are downloaded (<out>/<job id>)")
    submit.add_argument("--record", default="runs/submissions.jsonl", help="local record of who submitted what")
    submit.add_argument("--timeout", type=float, default=0.0, help="seconds to wait at most (0: no limit)")
    submit.set_defaults(func=cmd_submit)

    provision = commands.add_parser("provision", help="TLS startup kits (nvflare provision) with site policies")
    provision.add_argument("project", nargs="?", default=None, help="project.yml (default: poc_workspace/project.yml)")
    provision.add_argument("--out", required=True, help="provisioning workspace")
    provision.set_defaults(func=cmd_provision)

    approve = commands.add_parser("approve", help="print a job's approved-jobs entry (name + SHA-256 of its app)")
    approve.add_argument("job", help="job folder")
    approve.add_argument("--add", nargs="+", default=None, help="also add it to these approved_jobs.json files")
    approve.set_defaults(func=cmd_approve)

    ledger = commands.add_parser("ledger", help="the secure sum's signed round ledger").add_subparsers(
        dest="action", required=True
    )
    verify = ledger.add_parser("verify", help="check a run's ledger offline; names the first bad record (exit 1)")
    verify.add_argument("server", help="the server's run folder (holding ledger.jsonl) or a folder above it")
    verify.add_argument("--site", nargs="+", default=None, help="site run folders (site_ledger.jsonl) to cross-check")
    verify.add_argument("--root-ca", default=None, help="consortium rootCA.pem: also verify every advertisement")
    verify.set_defaults(func=cmd_ledger_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError) as err:  # ValueError: an option value a component refused
        print(f"pharmafl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pharmafl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
