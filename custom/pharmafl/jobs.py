"""Reading and adapting the FLARE job folders under jobs/ (JSON; executor classes imported only to check overrides)."""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
from dataclasses import fields
from pathlib import Path

from pharmafl.errors import UserError
from pharmafl.proteins.dataset import COMMON_TEST

SERVER_CONFIG = "app/config/config_fed_server.json"
CLIENT_CONFIG = "app/config/config_fed_client.json"


def repo_root() -> Path:
    """The checkout that holds jobs/ and poc_workspace/ (the package lives in <repo>/custom/pharmafl)."""
    return Path(__file__).resolve().parents[2]


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise UserError(f"'{path}' does not exist; is this a FLARE job folder?") from err
    except json.JSONDecodeError as err:
        raise UserError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}).") from err


def job_configs(job_dir: str | Path) -> tuple[dict, dict]:
    job = Path(job_dir)
    if not job.is_dir():
        raise UserError(f"Job folder '{job}' does not exist.")
    return read_json(job / SERVER_CONFIG), read_json(job / CLIENT_CONFIG)


def find_component(config: dict, component_id: str) -> dict:
    for section in ("components", "workflows"):
        for component in config.get(section, []):
            if component.get("id") == component_id:
                return component
    for entry in config.get("executors", []):
        if entry.get("executor", {}).get("id") == component_id:
            return entry["executor"]
    raise UserError(f"the job config has no component with id '{component_id}'")


def executor_args(job_dir: str | Path) -> dict:
    return dict(find_component(job_configs(job_dir)[1], "executor").get("args", {}))


def accepted_arguments(class_path: str) -> set[str]:
    """The constructor argument names of the component class at ``class_path`` (e.g. a job's executor)."""
    module_name, _, class_name = class_path.rpartition(".")
    component = getattr(importlib.import_module(module_name), class_name)
    return set(inspect.signature(component.__init__).parameters) - {"self"}


def settings_from_args(settings_class, args: dict):
    """A settings dataclass (e.g. a training config) from the executor arguments that name its fields."""
    return settings_class(**{field.name: args[field.name] for field in fields(settings_class) if field.name in args})


def write_job_copy(
    job_dir: str | Path,
    out_dir: str | Path,
    num_rounds: int | None = None,
    min_clients: int | None = None,
    executor_overrides: dict | None = None,
) -> Path:
    """Copy a job folder, changing the server's top-level variables and executor arguments."""
    job = Path(job_dir)
    server, client = job_configs(job)
    out = Path(out_dir) / job.name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(job, out)
    if num_rounds is not None:
        if num_rounds <= 0:
            raise UserError(f"--rounds must be positive, got {num_rounds}")
        server["num_rounds"] = num_rounds
    if min_clients is not None:
        threshold = secure_threshold(server, min_clients)
        if threshold is None:
            server["min_clients"] = min_clients
        meta = read_json(out / "meta.json")
        # a secure-sum job runs on as long as t sites live: FLARE must not abort it for fewer
        meta["min_clients"] = min_clients if threshold is None else threshold
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if executor_overrides:
        executor = find_component(client, "executor")
        unknown = sorted(set(executor_overrides) - accepted_arguments(executor["path"]))
        if unknown:
            raise UserError(f"{executor['path']} has no argument {', '.join(unknown)}.")
        executor.setdefault("args", {}).update(executor_overrides)
    (out / SERVER_CONFIG).write_text(json.dumps(server, indent=2) + "\n")
    (out / CLIENT_CONFIG).write_text(json.dumps(client, indent=2) + "\n")
    return out


def secure_threshold(server: dict, sites: int) -> int | None:
    """The secure-sum threshold t a job's server config gives for ``sites`` sites (None: not a secure-sum job)."""
    for workflow in server.get("workflows", []):
        if workflow.get("path", "").endswith(".SecureSumWorkflow"):
            threshold = workflow.get("args", {}).get("secure_sum", {}).get("threshold", 0)
            return threshold or sites // 2 + 1
    return None


def site_local_dir() -> Path:
    """The site ``local/`` files every site needs (FLARE 2.9's component allow-list admitting pharmafl.)."""
    path = repo_root() / "poc_workspace" / "local"
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


def trunk_model_args(job_dir: str | Path) -> dict:
    server, _ = job_configs(job_dir)
    return dict(find_component(server, "persistor")["args"]["model"]["args"])
