"""Job approval: a job's identity (name plus a hash of its app files) and each site's approved-jobs list.

No nvflare imports: the site-side FLARE component (``pharmafl.flare.job_approval``) and the
``pharmafl approve`` command both call these functions, so a site computes exactly the hash the
submitter was told to approve.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pharmafl.errors import UserError

APPROVED_JOBS_FILE = "approved_jobs.json"
# Files FLARE adds to a submitted app (the submitter's signature and certificate) are not part of what a site approves.
FLARE_FILE_PREFIX = ".__nvfl_"
IGNORED_DIRS = ("__pycache__",)


def app_hash(app_dir: str | Path) -> str:
    """SHA-256 over every file of one app folder (relative path and content), in path order.

    Args:
        app_dir: the app folder (``config/`` and, for BYOC jobs, ``custom/``) as the job holds it or as
            a site receives it.
    """
    root = Path(app_dir)
    if not root.is_dir():
        raise UserError(f"App folder '{root}' does not exist.")
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.name.startswith(FLARE_FILE_PREFIX)
        and not set(IGNORED_DIRS) & set(p.relative_to(root).parts)
    )
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def job_entries(job_dir: str | Path) -> list[dict]:
    """The approved-list entries of a job folder: one ``{"name", "sha256", "scope"}`` per app it deploys.

    ``scope`` is the privacy scope the job selects in its meta.json (None: the site's default scope). It is
    approved with the app: a submitter who edits meta.json to pick a laxer scope gets a job no site runs.

    Args:
        job_dir: a FLARE job folder (``meta.json`` plus one folder per app).
    """
    job = Path(job_dir)
    meta_path = job / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"'{job}' is not a FLARE job folder (no meta.json).")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"'{meta_path}' is not valid JSON ({err.msg} at line {err.lineno}).") from err
    name = meta.get("name") or job.name
    apps = sorted(meta.get("deploy_map", {}) or [p.name for p in job.iterdir() if (p / "config").is_dir()])
    if not apps:
        raise UserError(f"'{job}' holds no app folder (no <app>/config/).")
    scope = meta.get("scope")
    return [{"name": name, "sha256": app_hash(job / app), "scope": scope} for app in apps]


def load_approved(path: str | Path) -> list[dict]:
    """A site's approved-jobs list (``{"approved_jobs": [{"name", "sha256", ...}]}``); missing file: empty.

    Args:
        path: the site's ``local/approved_jobs.json``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text()).get("approved_jobs", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"'{path}' is not a valid approved-jobs list: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e and "sha256" in e for e in entries):
        raise UserError(f"'{path}' must hold {{'approved_jobs': [{{'name': ..., 'sha256': ...}}, ...]}}.")
    return entries


def is_name_approved(entries: list[dict], name: str) -> bool:
    return any(e["name"] == name for e in entries)


def is_approved(entries: list[dict], name: str, sha256: str, scope: str | None = None) -> bool:
    """Whether an entry has this name and hash, and the same privacy scope (entries without one: any scope)."""
    return any(
        e["name"] == name and e["sha256"] == sha256 and ("scope" not in e or e["scope"] == scope) for e in entries
    )


def add_entries(path: str | Path, entries: list[dict]) -> int:
    """Add entries to an approved-jobs list file (created when missing); returns how many were new.

    Args:
        path: the site's ``local/approved_jobs.json``.
        entries: from ``job_entries``.
    """
    path = Path(path)
    existing = load_approved(path)
    new = [e for e in entries if not is_approved(existing, e["name"], e["sha256"], e.get("scope"))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"approved_jobs": existing + new}, indent=2) + "\n")
    return len(new)


def refusal_message(site: str, name: str, sha256: str | None, scope: str | None = None) -> str:
    """The one sentence a refused submitter sees (in the job's deploy detail)."""
    what = f"job '{name}'" + (f" (sha256 {sha256}, scope {scope or 'default'})" if sha256 else "")
    return (
        f"site {site} refuses {what}: it is not on the site's approved-jobs list "
        f"(its admin adds the entry printed by `pharmafl approve JOB` to local/{APPROVED_JOBS_FILE})"
    )
