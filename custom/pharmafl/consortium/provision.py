"""Provisioned mode: TLS startup kits for the consortium (``nvflare provision``) with the site policies installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pharmafl.consortium.poc import load_project, participants, site_names
from pharmafl.consortium.policies import default_project_file, install_policies, kit_certificate_pins
from pharmafl.core.errors import UserError


def latest_prod_dir(out_dir: Path, project_name: str) -> Path:
    """The newest ``prod_NN`` folder that ``nvflare provision`` wrote for the project."""
    prods = sorted((out_dir / project_name).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))
    if not prods:
        raise UserError(f"nvflare provision wrote no kits under '{out_dir / project_name}'")
    return prods[-1]


def provision(project_file: str | Path | None, out_dir: str | Path) -> dict:
    """Run ``nvflare provision`` and install the consortium policies into every server and site kit.

    Args:
        project_file: the project.yml (default: ``poc_workspace/project.yml``); the server's ``name`` must
            be the DNS name the sites reach it by (it is the name in its TLS certificate).
        out_dir: provisioning workspace; kits land in ``<out_dir>/<project>/prod_NN/<participant>/``.
    """
    project_path = Path(project_file) if project_file else default_project_file()
    project = load_project(project_path)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_path.resolve()), "-w", str(out)]
    result = subprocess.run(
        command + ["--force"], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=dict(os.environ)
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"nvflare provision failed: {detail[-1] if detail else f'exit code {result.returncode}'}")
    prod = latest_prod_dir(out, project["name"])
    installed = {}
    for server in participants(project, "server"):
        installed[server["name"]] = install_policies(prod / server["name"], is_site=False)
    pins = kit_certificate_pins(prod, site_names(project))
    for site in participants(project, "client"):
        installed[site["name"]] = install_policies(prod / site["name"], True, site_names(project), pins)
    return {
        "kits": str(prod),
        "installed": installed,
        "admins": [a["name"] for a in participants(project, "admin")],
    }
