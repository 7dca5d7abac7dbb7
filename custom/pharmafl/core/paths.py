"""Where pharmafl finds its job folders and consortium files, and where a site finds its data.

The job folders (``jobs/``) and the consortium files (``poc_workspace/``) live at the top of the checkout. A
wheel carries copies of both inside the package (``pharmafl/_resources/``), so a plain ``pip install`` works
without the checkout; ``PHARMAFL_HOME`` names another folder holding ``jobs/`` and ``poc_workspace/``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from pharmafl.core.errors import InputError

HOME_ENV = "PHARMAFL_HOME"
DATA_ENV = "PHARMAFL_DATA"  # a site's data root when the executor's data_root is empty
# a model as named arrays: the server's global model (flare.state_persistor) and the centralized ESM-2 baseline's
STATE_FILE = "global_state.npz"
CHEMBL_URL = "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/chembl_5thresh.csv.gz"


def _is_home(path: Path) -> bool:
    return (path / "jobs").is_dir() and (path / "poc_workspace").is_dir()


def repo_root() -> Path:
    """The folder holding ``jobs/`` and ``poc_workspace/``: ``$PHARMAFL_HOME``, the checkout, or the package data."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[3]  # <checkout>/custom/pharmafl/core/paths.py
    if _is_home(checkout):
        return checkout
    return Path(str(resources.files("pharmafl") / "_resources"))


def jobs_dir() -> Path:
    return repo_root() / "jobs"


def job_dir(name: str) -> Path:
    """``jobs/<name>`` (e.g. ``multitask_fedavg``)."""
    return jobs_dir() / name


def poc_workspace_dir() -> Path:
    return repo_root() / "poc_workspace"


def default_chem_input() -> str:
    """The shared ChEMBL file beside the checkout when present, else its public URL (downloaded once)."""
    local = repo_root().parent / "shared" / "data" / "chem" / "chembl_5thresh.csv.gz"
    return str(local) if local.is_file() else CHEMBL_URL


def default_eicu_input() -> Path:
    """The eICU-CRD demo beside the checkout (``../shared/data/eicu``)."""
    return repo_root().parent / "shared" / "data" / "eicu"


def check_site_names(names: list[str], what: str = "Site") -> None:
    """Refuse site names that are not distinct or not safe as folder names (`InputError`).

    Args:
        names: the site (or client) names, each becoming a folder.
        what: the word for them in the message (``"Site"``, ``"Client"``).
    """
    if len(set(names)) != len(names):
        raise InputError(f"{what} names must be distinct, got {', '.join(names)}.")
    for name in names:
        if not name or name in (".", "..") or not all(ch.isalnum() or ch in "-_." for ch in name):
            raise InputError(f"{what} name '{name}' may only use letters, digits, '-', '_' and '.'.")
