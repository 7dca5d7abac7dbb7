"""The consortium's site policies (poc_workspace/) and their installation into a participant's local/ folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from pharmafl.core.errors import UserError
from pharmafl.core.files import read_json
from pharmafl.core.paths import poc_workspace_dir
from pharmafl.jobs import site_local_dir
from pharmafl.secure_sum.config import POLICY_FILE, SitePolicy
from pharmafl.secure_sum.keys import certificate_sha256

RESOURCES = "resources.json"
# Installed at the server and at every site: who may do what.
COMMON_POLICY_FILES = ("authorization.json",)
# Installed at the data sites only: privacy scopes and the approved-jobs list.
SITE_POLICY_FILES = ("authorization.json", "privacy.json", "approved_jobs.json")


def consortium_dir() -> Path:
    """``poc_workspace/`` of the checkout: project.yml, local/ (every participant), site_local/ (data sites)."""
    path = poc_workspace_dir()
    if not (path / "project.yml").is_file():
        raise UserError(f"consortium files not found at '{path}'; run pharmafl from its checkout")
    return path


def default_project_file() -> Path:
    return consortium_dir() / "project.yml"


def site_policy_dir() -> Path:
    return consortium_dir() / "site_local"


def merge_resources(base: dict, *extras: dict) -> dict:
    """FLARE's resources.json with our allow-list entries and components added (same id: ours wins).

    Args:
        base: the participant's own resources (``resources.json`` or ``resources.json.default``).
        extras: partial resources files (``class_allow_list`` and/or ``components``).
    """
    merged = dict(base)
    allow = list(base.get("class_allow_list", []))
    components = list(base.get("components", []))
    for extra in extras:
        allow += [c for c in extra.get("class_allow_list", []) if c not in allow]
        ours = {c["id"] for c in extra.get("components", [])}
        components = [c for c in components if c.get("id") not in ours] + list(extra.get("components", []))
    merged["class_allow_list"] = allow
    merged["components"] = components
    return merged


def kit_certificate_pins(kits: str | Path, sites: Sequence[str]) -> dict[str, str]:
    """``{site: SHA-256 of its startup-kit certificate}`` for the sites whose kit under ``kits`` has one."""
    pins = {}
    for site in sites:
        path = Path(kits) / site / "startup" / "client.crt"
        if path.is_file():
            pins[site] = certificate_sha256(path.read_bytes())
    return pins


def install_policies(
    participant_dir: str | Path, is_site: bool, roster: Sequence[str] = (), pins: dict[str, str] | None = None
) -> list[str]:
    """Install the consortium policies into a participant's ``local/`` folder; returns the files written.

    The server gets the allow-list (``poc_workspace/local/resources.json``) and
    ``authorization.json``; a data site also gets ``privacy.json`` (the ``trunk-only`` scope),
    ``approved_jobs.json``, the job-approval component (``site_local/resources.json``) and, with a
    ``roster``, its secure-sum policy ``secure_sum.json`` (the consortium's sites; every other setting
    at its default floor: a majority threshold, signed advertisements) with every peer's certificate
    pinned (``pins``).

    Args:
        participant_dir: the participant's startup-kit folder (holding ``startup/`` and ``local/``).
        is_site: True for a client (data site), False for the server.
        roster: the consortium's client sites (from project.yml).
        pins: ``kit_certificate_pins`` of the consortium's kits.
    """
    local = Path(participant_dir) / "local"
    if not local.is_dir():
        raise UserError(f"'{participant_dir}' is not a FLARE startup kit (no local/ folder).")
    current = local / RESOURCES if (local / RESOURCES).is_file() else local / (RESOURCES + ".default")
    base = read_json(current) if current.is_file() else {"format_version": 2}
    extras = [read_json(site_local_dir() / RESOURCES)]
    if is_site:
        extras.append(read_json(site_policy_dir() / RESOURCES))
    (local / RESOURCES).write_text(json.dumps(merge_resources(base, *extras), indent=2) + "\n")
    written = [RESOURCES]
    for name in SITE_POLICY_FILES if is_site else COMMON_POLICY_FILES:
        shutil.copyfile(site_policy_dir() / name, local / name)
        written.append(name)
    if is_site and roster:
        SitePolicy(roster=tuple(roster), pinned_certificates=pins or None).write(local / POLICY_FILE)
        written.append(POLICY_FILE)
    return written
