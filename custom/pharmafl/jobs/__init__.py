"""Reading and adapting the FLARE job folders under jobs/ (JSON; executor classes imported only to check overrides)."""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import types
import typing
from dataclasses import fields
from pathlib import Path

from pharmafl.binding_sites.dataset import COMMON_TEST
from pharmafl.core.errors import UserError
from pharmafl.core.files import read_json as core_read_json
from pharmafl.core.paths import poc_workspace_dir

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


def component_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"the job names a component class {class_path} that cannot be imported ({err}).") from err


def argument_types(class_path: str) -> dict[str, object]:
    """The constructor arguments of the component class at ``class_path`` (e.g. a job's executor) and their types."""
    init = component_class(class_path).__init__
    hints = typing.get_type_hints(init)
    return {name: hints.get(name, object) for name in inspect.signature(init).parameters if name != "self"}


def typed_arguments(class_path: str, values: dict) -> dict:
    """``values`` (e.g. ``--set`` overrides) converted to the types of the constructor arguments they name.

    A wrong name or a value that is not of the argument's type is one sentence naming the argument, its type and
    the valid names.
    """
    types_ = argument_types(class_path)
    class_name = class_path.rpartition(".")[2]
    valid = ", ".join(sorted(types_))
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise UserError(f"{class_name} has no argument {', '.join(unknown)}; its arguments are: {valid}.")
    typed = {}
    for name, value in values.items():
        try:
            typed[name] = _convert(value, types_[name])
        except (TypeError, ValueError):
            raise UserError(
                f"{name}={value!r} is not a valid {_type_name(types_[name])} for {class_name}'s argument {name}; "
                f"its arguments are: {valid}."
            ) from None
    return typed


def check_component_arguments(class_path: str, args: dict) -> None:
    """Build the component once with ``args`` so that its own checks (ranges, choices) run before FLARE starts."""
    class_name = class_path.rpartition(".")[2]
    try:
        component_class(class_path)(**args)
    except (UserError, ValueError, TypeError) as err:
        raise UserError(f"{class_name} refuses its arguments: {err}") from err


def _convert(value, hint):
    """``value`` as ``hint`` (int, float, str, bool, list[...], tuple[...], dict, X | None); TypeError if it is not."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is not type(None):
                try:
                    return _convert(value, member)
                except (TypeError, ValueError):
                    continue
        raise TypeError(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise TypeError(value)
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        if members and members[-1] is not Ellipsis and origin is tuple:
            return [_convert(v, m) for v, m in zip(value, members, strict=True)]
        return [_convert(v, members[0]) for v in value] if members else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    return value


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(m) for m in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


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
        executor.setdefault("args", {}).update(typed_arguments(executor["path"], executor_overrides))
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


def trunk_model_args(job_dir: str | Path) -> dict:
    server, _ = job_configs(job_dir)
    return dict(find_component(server, "persistor")["args"]["model"]["args"])
