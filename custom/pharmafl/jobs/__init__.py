"""Reading the exported FLARE job folders under jobs/ (JSON only; ``pharmafl.jobs.export`` builds them)."""

from __future__ import annotations

import importlib
from pathlib import Path

from pharmafl.binding_sites.dataset import COMMON_TEST
from pharmafl.core.errors import UserError
from pharmafl.core.files import read_json as core_read_json
from pharmafl.core.paths import poc_workspace_dir

TRAIN_TASK = "train"
SERVER_CONFIG = "app/config/config_fed_server.json"
CLIENT_CONFIG = "app/config/config_fed_client.json"


def read_json(path: Path) -> dict:
    """A job folder's JSON file (``meta.json``, ``config_fed_*.json``)."""
    return core_read_json(path, "job file", hint="is this a FLARE job folder?")


def job_configs(job_dir: str | Path) -> tuple[dict, dict]:
    job = Path(job_dir)
    if not job.is_dir():
        raise UserError(f"Job folder '{job}' does not exist.")
    return read_json(job / SERVER_CONFIG), read_json(job / CLIENT_CONFIG)


def find_component(config: dict, component_id: str) -> dict:
    """The component, workflow or executor with ``component_id`` (``executor``: the one running ``train``)."""
    for section in ("components", "workflows"):
        for component in config.get(section, []):
            if component.get("id") == component_id:
                return component
    for entry in config.get("executors", []):
        executor = entry.get("executor", {})
        tasks = entry.get("tasks", [])
        if executor.get("id") == component_id or (component_id == "executor" and (TRAIN_TASK in tasks or "*" in tasks)):
            return executor
    raise UserError(f"the job config has no component with id '{component_id}'")


def executor_args(job_dir: str | Path) -> dict:
    """The arguments of a job folder's training executor."""
    return dict(find_component(job_configs(job_dir)[1], "executor").get("args", {}))


def num_rounds(job_dir: str | Path) -> int:
    """The training rounds of a job folder (its training workflow's ``num_rounds``)."""
    for workflow in job_configs(job_dir)[0].get("workflows", []):
        if "num_rounds" in workflow.get("args", {}):
            return int(workflow["args"]["num_rounds"])
    raise UserError(f"the job at '{job_dir}' has no training workflow with num_rounds")


def component_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"the job names a component class {class_path} that cannot be imported ({err}).") from err


def secure_threshold(server: dict, sites: int) -> int | None:
    """The secure-sum threshold t a job's server config gives for ``sites`` sites (None: not a secure-sum job)."""
    for workflow in server.get("workflows", []):
        if workflow.get("path", "").endswith(".SecureSumWorkflow"):
            threshold = workflow.get("args", {}).get("secure_sum", {}).get("threshold", 0)
            return threshold or sites // 2 + 1
    return None


def site_local_dir() -> Path:
    """The site ``local/`` files every site needs (FLARE 2.9's component allow-list admitting pharmafl.)."""
    path = poc_workspace_dir() / "local"
    if not (path / "resources.json").is_file():
        raise UserError(f"site local files not found at '{path}'; run pharmafl from its checkout")
    return path


def prepared_sites(data_dir: str | Path) -> list[str]:
    """Site folders (those with a manifest.json, except the shared common test set) of a prepared data folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"Data folder '{root}' does not exist; run `pharmafl prepare` first.")
    # common_test/ (binding-site data) is the test set every client shares, not a site.
    sites = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file() and p.name != COMMON_TEST)
    if not sites:
        raise UserError(f"'{root}' holds no prepared site folders (no */manifest.json).")
    return sites
