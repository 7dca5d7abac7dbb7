"""Submitting a job through the FLARE API: who submitted which job hash, progress, final status, results, report."""

from __future__ import annotations

import getpass
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pharmafl.consortium.approval import job_entries
from pharmafl.consortium.poc import admin_with_role, load_project, poc_workspace, prod_dir
from pharmafl.core.errors import UserError

COMPLETED = "FINISHED:COMPLETED"


def poc_admin_kit(user: str | None = None) -> tuple[str, Path]:
    """The POC startup kit of ``user`` (default: the project's ``lead``) in the running POC workspace.

    Args:
        user: an admin of the POC project (its email-like name).
    """
    workspace = poc_workspace()
    if not (workspace / "project.yml").is_file():
        raise UserError(f"no POC workspace at '{workspace}'; run `pharmafl poc up` or pass --startup-kit")
    project = load_project(workspace / "project.yml")
    user = user or admin_with_role(project, "lead")
    kit = prod_dir(workspace, project) / user
    if not (kit / "startup").is_dir():
        admins = [p["name"] for p in project["participants"] if p.get("type") == "admin"]
        raise UserError(f"the POC has no admin '{user}'; its admins are {', '.join(admins)}")
    return user, kit


def append_record(path: str | Path, record: dict) -> None:
    """Append one JSON line to the local submission record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def submit_job(
    job_dir: str | Path,
    startup_kit: str | Path | None = None,
    user: str | None = None,
    wait: bool = False,
    out_dir: str | Path = "runs/submitted",
    record_file: str | Path = "runs/submissions.jsonl",
    timeout_s: float = 0.0,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Submit a job folder as ``user``; with ``wait``, follow it, check COMPLETED, download and report.

    Every attempt (refused ones too) is appended to ``record_file``: time, local account, FLARE user,
    job name and app hashes, job id, final status.

    Args:
        job_dir: FLARE job folder.
        startup_kit: the admin's startup-kit folder (holding ``startup/``); default: ``user``'s kit in the
            running POC.
        user: FLARE user name; default: the kit folder's name, or the POC project's ``lead``.
        wait: wait for the end, download the result into ``out_dir/<job id>`` and write the report.
        out_dir: where results are downloaded.
        record_file: local JSON-lines record of submissions.
        timeout_s: give up waiting after this many seconds (0: never).
        progress: callback for progress lines (None: silent).
    """
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    say = progress or (lambda _: None)
    job = Path(job_dir).resolve()
    entries = job_entries(job)
    if startup_kit is None:
        user, kit = poc_admin_kit(user)
    else:
        kit = Path(startup_kit).resolve()
        if not (kit / "startup").is_dir():
            raise UserError(f"'{startup_kit}' is not an admin startup kit (no startup/ folder).")
        user = user or kit.name
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "local_account": getpass.getuser(),
        "flare_user": user,
        "startup_kit": str(kit),
        "job": entries[0]["name"],
        "job_dir": str(job),
        "sha256": [e["sha256"] for e in entries],
        "job_id": None,
        "status": None,
    }
    try:
        session = new_secure_session(user, str(kit), timeout=15.0)
    except Exception as err:  # noqa: BLE001 - FLARE raises many kinds; the user needs one sentence
        record["status"] = f"NOT_CONNECTED: {err}"
        append_record(record_file, record)
        raise UserError(f"cannot reach the FLARE server as {user} with the kit '{kit}': {err}") from err
    try:
        try:
            with tempfile.TemporaryDirectory(prefix="pharmafl-submit-") as scratch:
                # FLARE's API signs the folder it submits in place (.__nvfl_sig.json in every folder): sign a
                # copy, so the user's checkout stays as it was.
                copy = Path(scratch) / job.name
                shutil.copytree(job, copy)
                job_id = session.submit_job(str(copy))
        except Exception as err:  # noqa: BLE001 - e.g. AuthorizationError for an org_admin
            record["status"] = f"REFUSED: {err}"
            append_record(record_file, record)
            raise UserError(f"the server refused job '{record['job']}' from {user}: {err}") from err
        record["job_id"] = job_id
        say(f"submitted {record['job']} (sha256 {', '.join(record['sha256'])}) as {user}: job id {job_id}")
        result = {"job_id": job_id, "user": user, "sha256": record["sha256"], "status": "SUBMITTED"}
        if not wait:
            record["status"] = "SUBMITTED"
            append_record(record_file, record)
            return result
        try:
            _finish(session, job_id, out_dir, timeout_s, say, result)
        finally:
            record["status"] = result.get("status", "UNKNOWN")
            append_record(record_file, record)
        return result
    finally:
        session.close()


def _finish(
    session, job_id: str, out_dir: str | Path, timeout_s: float, say: Callable[[str], None], result: dict
) -> dict:
    """Follow, check, download and report a job; fills ``result`` (status first, so a failure is recorded)."""
    meta = _follow(session, job_id, timeout_s, say)
    status = meta.get("status", "")
    result.update(status=status, meta=meta)
    if status != COMPLETED:
        detail = meta.get("job_deploy_detail")
        reason = f"; deploy detail: {'; '.join(map(str, detail))}" if detail else ""
        raise UserError(f"job {job_id} ended {status}, not {COMPLETED}{reason}")
    destination = Path(out_dir).resolve()
    location = session.download_job_result(job_id, str(destination))
    if not location or not Path(location).is_dir():
        raise UserError(f"job {job_id} completed but its result could not be downloaded")
    result["result_dir"] = location
    say(f"downloaded the result to {location}")
    if any(Path(location).rglob("cross_val_results.json")):
        from pharmafl.report import write_report

        _, table = write_report(location)
        result["report_dir"] = str(Path(location) / "report")
        say(table)
    return result


def _follow(session, job_id: str, timeout_s: float, say: Callable[[str], None]) -> dict:
    """The job's final meta, from the FLARE API's own monitor; each new status is said once."""
    from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

    start = time.monotonic()
    seen = {"status": None}

    def on_poll(_session, _job_id, meta, *_args, **_kwargs) -> bool:
        status = meta.get("status", "")
        if status != seen["status"]:
            say(f"job {job_id}: {status} after {time.monotonic() - start:.0f} s")
            seen["status"] = status
        return True

    code, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout_s, poll_interval=2.0, cb=on_poll)
    if code != MonitorReturnCode.JOB_FINISHED:
        raise UserError(f"job {job_id} did not finish within {timeout_s:.0f} s (last status {seen['status']})")
    return meta
