"""``pharmafl poc|submit|provision|approve|ledger``: the consortium's deployment commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pharmafl.core.errors import UserError


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
    from pharmafl.secure_sum.ledger import verify_run

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


def register(commands: argparse._SubParsersAction) -> None:
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
