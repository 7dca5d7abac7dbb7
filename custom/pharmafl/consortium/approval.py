"""Job approval: a job's identity (name, app files hash, meta.json hash) and each site's approved-jobs list.

No nvflare imports: the site-side FLARE component (``pharmafl.flare.job_approval``) and the
``pharmafl approve`` command both call these functions, so a site computes exactly the hashes the
submitter was told to approve.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pharmafl.core.errors import UserError
from pharmafl.core.files import read_json

APPROVED_JOBS_FILE = "approved_jobs.json"
# Written into a job's run folder at deployment: the entry the site's guard matched (FLARE then edits the deployed
# client config, e.g. it adds a log streamer, so the deployed folder no longer hashes to the approved value).
APPROVED_APP_FILE = "approved_app.json"
# The two files FLARE's admin client adds to every folder of a job it submits (the submitter's signature and
# certificate: NVFLARE_SIG_FILE and NVFLARE_SUBMITTER_CRT_FILE in nvflare/lighter/tool_consts.py, written by
# nvflare.lighter.utils.sign_folders). Exact names: any other file, hidden or not, is part of the app.
FLARE_SUBMISSION_FILES = frozenset({".__nvfl_sig.json", ".__nvfl_submitter.crt"})
# Compiled Python: it runs like source but a site admin cannot review it, so an app that carries it is refused.
BYTECODE_SUFFIXES = (".pyc", ".pyo")
# Keys FLARE 2.9 itself writes into a job's meta between submission and deployment; every other key (name,
# deploy_map, resource_spec, min_clients, mandatory_clients, scope, custom_props, launcher_spec, unknown ones) is
# the author's and is approved. Where each comes from (nvflare 2.9.0):
#   apis/impl/job_def_manager.py  create(): job_id, submit_time, submit_time_iso, start_time, duration,
#       data_storage_format, status (pops submit_token); update start_time/duration when the job runs;
#       set_approval(): approvals; set_results_uri(): result_location
#   private/fed/server/job_cmds.py  submit_job(): submitter_name, submitter_org, submitter_role,
#       job_folder_name, study (pops submit_token); clone_job(): cloned_from; CLONED_META_KEYS: content_location
#   private/fed/server/job_meta_validator.py  _validate_app(): byoc, flower_predeployed (derived from the app's
#       files, whatever meta.json said; the files themselves are in the app hash)
#   app_common/job_schedulers/job_scheduler.py: schedule_count, last_schedule_time, schedule_history
#   private/fed/server/job_runner.py: job_deploy_detail (a previous deployment attempt), job_clients
FLARE_META_KEYS = frozenset(
    {
        "job_id",
        "submit_time",
        "submit_time_iso",
        "start_time",
        "duration",
        "data_storage_format",
        "status",
        "approvals",
        "result_location",
        "content_location",
        "submitter_name",
        "submitter_org",
        "submitter_role",
        "job_folder_name",
        "study",
        "cloned_from",
        "submit_token",
        "byoc",
        "flower_predeployed",
        "schedule_count",
        "last_schedule_time",
        "schedule_history",
        "job_deploy_detail",
        "job_clients",
    }
)
# What an entry binds; an entry must hold every one of them (scope null: the site's default scope).
ENTRY_KEYS = ("name", "sha256", "scope", "meta_sha256")


def app_hash(app_dir: str | Path, skip_bytecode_caches: bool = False) -> str:
    """SHA-256 over every file of one app folder (relative path and content, in path order), hidden files and
    ``__pycache__`` included; only ``FLARE_SUBMISSION_FILES`` are left out.

    Args:
        app_dir: the app folder (``config/`` and, for BYOC jobs, ``custom/``) as the job holds it or as
            a site receives it.
        skip_bytecode_caches: leave out ``__pycache__`` folders: for the app of a running job (the ledger),
            where Python writes them when it imports the app's code. Approval never skips them: an app that
            arrives with bytecode is refused at deployment.
    """
    root = Path(app_dir)
    if not root.is_dir():
        raise UserError(f"App folder '{root}' does not exist.")
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in FLARE_SUBMISSION_FILES
        and not (skip_bytecode_caches and "__pycache__" in p.relative_to(root).parts)
    )
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def bytecode_file(app_dir: str | Path) -> str | None:
    """The first compiled-Python file of an app folder (relative path), or None when it has none."""
    root = Path(app_dir)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in BYTECODE_SUFFIXES)
    return found[0] if found else None


def meta_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, compact) of a job's meta without ``FLARE_META_KEYS``.

    The same for the job folder's meta.json and for the meta a site receives at deployment.

    Raises:
        TypeError: a value that JSON cannot hold.
    """
    authored = {str(getattr(k, "value", k)): v for k, v in meta.items()}  # FLARE sometimes keys by JobMetaKey
    authored = {k: v for k, v in authored.items() if k not in FLARE_META_KEYS}
    text = json.dumps(authored, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def job_entries(job_dir: str | Path) -> list[dict]:
    """The approved-list entries of a job folder: one ``{"name", "sha256", "scope", "meta_sha256"}`` per app.

    ``scope`` is the privacy scope the job selects in its meta.json (None: the site's default scope);
    ``meta_sha256`` binds the whole meta.json (``meta_digest``), so a submitter who edits any of it (a laxer
    scope, another deploy_map or resource_spec) gets a job no site runs.

    Args:
        job_dir: a FLARE job folder (``meta.json`` plus one folder per app).
    """
    job = Path(job_dir)
    meta_path = job / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"'{job}' is not a FLARE job folder (no meta.json).")
    meta = read_json(meta_path, "job's meta.json")
    name = meta.get("name") or job.name
    apps = sorted(meta.get("deploy_map", {}) or [p.name for p in job.iterdir() if (p / "config").is_dir()])
    if not apps:
        raise UserError(f"'{job}' holds no app folder (no <app>/config/).")
    for app in apps:
        compiled = bytecode_file(job / app)
        if compiled:
            raise UserError(
                f"App '{app}' of '{job}' carries compiled bytecode '{compiled}', which a site admin cannot review; "
                "remove it and approve again."
            )
    try:
        digest = meta_digest(meta)
    except ValueError as err:  # NaN or Infinity: not JSON, so FLARE could not send it either
        raise UserError(f"'{meta_path}' holds a value JSON cannot represent ({err}).") from err
    scope = meta.get("scope")
    return [{"name": name, "sha256": app_hash(job / app), "scope": scope, "meta_sha256": digest} for app in apps]


def load_approved(path: str | Path) -> list[dict]:
    """A site's approved-jobs list (``{"approved_jobs": [{"name", "sha256", "scope", "meta_sha256"}]}``).

    A missing file is an empty list. An entry without one of ``ENTRY_KEYS`` (older entries had no scope or
    meta hash) is a UserError naming it, so the list approves nothing until the entry is replaced.

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
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"'{path}' must hold {{'approved_jobs': [{{'name': ..., 'sha256': ...}}, ...]}}.")
    for index, entry in enumerate(entries):
        missing = [key for key in ENTRY_KEYS if key not in entry]
        if missing:
            raise UserError(
                f"Entry {index} of approved-jobs list '{path}' (job '{entry.get('name', '?')}') has no "
                f"{' or '.join(repr(k) for k in missing)}, so the list approves nothing until that entry is "
                "replaced by the one `pharmafl approve JOB` prints."
            )
    return entries


def is_name_approved(entries: list[dict], name: str) -> bool:
    return any(e["name"] == name for e in entries)


def is_approved(entries: list[dict], candidate: dict) -> bool:
    """Whether an entry has the candidate's name, app hash, scope and meta hash (``ENTRY_KEYS``), all present."""
    return any(all(key in e and key in candidate and e[key] == candidate[key] for key in ENTRY_KEYS) for e in entries)


def add_entries(path: str | Path, entries: list[dict]) -> int:
    """Add entries to an approved-jobs list file (created when missing); returns how many were new.

    Args:
        path: the site's ``local/approved_jobs.json``.
        entries: from ``job_entries``.
    """
    path = Path(path)
    existing = load_approved(path)
    new = [e for e in entries if not is_approved(existing, e)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"approved_jobs": existing + new}, indent=2) + "\n")
    return len(new)


def refusal_message(
    site: str, name: str, sha256: str | None, scope: str | None = None, meta_sha256: str | None = None
) -> str:
    """The one sentence a refused submitter sees (in the job's deploy detail)."""
    what = f"job '{name}'" + (f" (sha256 {sha256}, scope {scope or 'default'})" if sha256 else "")
    what += f" with meta.json sha256 {meta_sha256}" if meta_sha256 else ""
    return (
        f"site {site} refuses {what}: it is not on the site's approved-jobs list "
        f"(its admin adds the entry printed by `pharmafl approve JOB` to local/{APPROVED_JOBS_FILE})"
    )
