"""``pharmafl privacy epsilon`` (what a noise level guarantees), ``pharmafl audit membership`` (attack the models)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pharmafl.cli.common import add_executor_overrides, executor_overrides
from pharmafl.core.errors import InputError
from pharmafl.core.paths import job_dir

DEFAULT_JOB = job_dir("multitask_fedavg")
DEFAULT_ESM_JOB = job_dir("esm2_lora_fra")
DEFAULT_EICU_JOB = job_dir("eicu_fedavg")


def cmd_privacy_epsilon(args: argparse.Namespace) -> int:
    from pharmafl.privacy.accounting import noise_guarantee

    if args.steps <= 0:
        raise InputError(f"--steps must be positive, got {args.steps}.")
    sample_rate = args.sample_rate
    if sample_rate is None:
        if not args.batch_size or not args.records:
            raise InputError("give --sample-rate, or --batch-size and --records (the site's training records).")
        sample_rate = args.batch_size / args.records
    delta = args.delta if args.delta is not None else (1.0 / args.records if args.records else 1e-5)
    noise = args.noise * args.batch_size if args.noise_on == "mean" and args.batch_size else args.noise
    if args.noise_on == "mean" and not args.batch_size:
        raise InputError(
            "--noise-on mean needs --batch-size (noise on a mean of B gradients is B times larger on the sum)."
        )
    result = noise_guarantee(noise, args.steps, sample_rate, delta, args.max_grad_norm, args.accountant)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in result.items()}))
        return 0
    eps = result["epsilon"]
    if math.isinf(eps):
        print(f"epsilon = infinity: {result.get('why', 'no finite bound')}.")
    else:
        print(
            f"epsilon = {eps:.4g} at delta = {delta:.3g} ({args.accountant.upper()}, Poisson sampling at rate "
            f"{sample_rate:.4g}, {args.steps} steps, noise multiplier {result['noise_multiplier']:.4g})"
        )
    return 0


def cmd_audit_membership(args: argparse.Namespace) -> int:
    from pharmafl.jobs import prepared_sites
    from pharmafl.jobs.preflight import BINDING_SITES, EICU, preparation_kind, site_manifests
    from pharmafl.privacy.audit import AuditConfig

    runs = {}
    for text in args.run or []:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--run takes NAME=WORKSPACE, got '{text}'.")
        runs[name] = path
    config = AuditConfig(
        references=args.references,
        max_members=args.max_members,
        population=args.population,
        bootstrap=args.bootstrap,
        seed=args.seed,
        rounds=args.rounds,
    )
    say = lambda message: print(message, flush=True)  # noqa: E731
    manifests = site_manifests(args.data, prepared_sites(args.data))
    kind = preparation_kind(next(iter(manifests.values())))
    if kind in (BINDING_SITES, EICU):
        if args.centralized:
            raise InputError(
                f"{kind} data: the audit trains the centralized model itself; drop --centralized "
                "(--no-centralized skips that model)."
            )
        if kind == EICU and args.model:
            raise InputError("--model is for binding-site data; the eICU audit takes the job's model (--set model=).")
        if kind == BINDING_SITES:
            from pharmafl.binding_sites.audit import audit_binding_sites as audit
        else:
            from pharmafl.clinical.audit import audit_eicu as audit
        summary = audit(
            args.data,
            runs,
            args.out,
            args.job or (DEFAULT_ESM_JOB if kind == BINDING_SITES else DEFAULT_EICU_JOB),
            config,
            progress=say,
            centralized=not args.no_centralized,
            overrides=executor_overrides(args),
        )
    else:
        from pharmafl.multitask.audit import audit_membership

        if args.no_centralized or args.set or args.model:
            raise InputError(
                "--no-centralized, --set and --model are for binding-site and eICU data; the multi-task audit takes "
                "the job's settings and --centralized DATA."
            )
        summary = audit_membership(
            args.data, runs, args.out, args.job or DEFAULT_JOB, config, progress=say, centralized=args.centralized
        )
    print(f"wrote {Path(args.out) / 'report.md'} ({summary['seconds']} s)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    privacy = commands.add_parser("privacy", help="differential-privacy accounting").add_subparsers(
        dest="kind", required=True
    )
    epsilon = privacy.add_parser(
        "epsilon",
        help="the (epsilon, delta) that Gaussian gradient noise guarantees over a number of steps",
        description="What Gaussian gradient noise guarantees. Without --max-grad-norm (no per-record clipping) the "
        "answer is infinity: an unclipped gradient has no bounded sensitivity.",
    )
    epsilon.add_argument("--noise", type=float, required=True, help="standard deviation of the noise added per step")
    epsilon.add_argument("--steps", type=int, required=True, help="number of noisy steps")
    epsilon.add_argument("--sample-rate", type=float, help="probability of a record being in a step's batch")
    epsilon.add_argument("--batch-size", type=int, help="expected batch size (with --records gives the sample rate)")
    epsilon.add_argument("--records", type=int, help="training records at the site (also sets delta = 1/records)")
    epsilon.add_argument("--delta", type=float, help="delta (default 1/records, else 1e-5)")
    epsilon.add_argument("--max-grad-norm", type=float, help="per-record clipping norm C (omit: no clipping)")
    epsilon.add_argument(
        "--noise-on",
        choices=("sum", "mean"),
        default="sum",
        help="noise added to the sum of the batch's gradients (DP-SGD) or to their mean (as grad_noise_std is)",
    )
    epsilon.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    epsilon.add_argument("--json", action="store_true", help="print the result as JSON")
    epsilon.set_defaults(func=cmd_privacy_epsilon)

    audit = commands.add_parser("audit", help="privacy audits").add_subparsers(dest="kind", required=True)
    membership = audit.add_parser(
        "membership",
        help="membership inference (LOSS, RMIA) against the models a site's data trained: chem data (multi-task) or "
        "binding-site data (ESM-2 LoRA) or eICU data (mortality), told apart by the preparation",
        description="Chem data: the single-partner model, finished runs' site models, the centralized model with "
        "--centralized, and the server's bit-presence attack on trunk updates, individual vs secure aggregate. "
        "Binding-site data (one protein chain the privacy unit): each client's local model, finished runs' site "
        "models and the centralized model, which the audit trains itself (--no-centralized skips it). eICU data "
        "(one ICU stay the privacy unit): the same three, each run's model being its final global model.",
    )
    membership.add_argument(
        "--data",
        required=True,
        help="prepared data: chem with an audit hold-out (--audit-fraction), binding sites or eICU (non-members: "
        "each site's test chains or stays)",
    )
    membership.add_argument(
        "--run", action="append", metavar="NAME=WORKSPACE", help="a finished run of this data to attack (repeatable)"
    )
    membership.add_argument(
        "--centralized",
        metavar="DATA",
        help="chem data: the same input prepared for one partner with the same --audit-fraction: attack the "
        "centralized model",
    )
    membership.add_argument(
        "--no-centralized",
        action="store_true",
        help="binding-site and eICU data: do not train and attack the centralized model (all sites' records pooled)",
    )
    membership.add_argument("--out", required=True, help="folder for summary.json, report.md and privacy.png")
    membership.add_argument(
        "--job",
        help=f"job whose settings train the audit's own models (default: {DEFAULT_JOB.name} for chem data, "
        f"{DEFAULT_ESM_JOB.name} for binding-site data, {DEFAULT_EICU_JOB.name} for eICU data)",
    )
    membership.add_argument(
        "--references", type=int, default=2, help="RMIA reference models (chem: per site; binding sites: one set)"
    )
    membership.add_argument("--max-members", type=int, default=2000, help="member records sampled per site")
    membership.add_argument("--population", type=int, default=2000, help="population records for RMIA")
    membership.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    membership.add_argument("--seed", type=int, default=0)
    membership.add_argument(
        "--rounds",
        type=int,
        help="rounds the audit's own models train for (default: the job's): epochs for chem, rounds x local_steps "
        "steps for binding sites (x clients for the centralized model), rounds x local epochs for eICU",
    )
    membership.add_argument("--model", help="binding-site data: hub name or local folder of the base model")
    add_executor_overrides(membership)
    membership.set_defaults(func=cmd_audit_membership)
