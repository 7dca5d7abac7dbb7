"""Load one site's prepared folder (written by `prepare_chem`) with its consistency checks."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pharmafl.core.errors import InputError
from pharmafl.core.manifest import verify_checksums

REQUIRED_FILES = ("X.npz", "Y.npz", "folds.npy", "tasks.csv", "manifest.json")
AUDIT_FILE = "audit.npy"  # optional: preparations made before the audit hold-out have none
# Censoring of a regression value: measured, or only a bound (">": a lower bound, "<": an upper bound).
CENSOR_EXACT, CENSOR_ABOVE, CENSOR_BELOW = 1, 2, 3


@dataclass
class RegressionData:
    """One partner's regression tasks: compounds x tasks matrices of values and their censoring codes
    (``CENSOR_EXACT`` measured, ``CENSOR_ABOVE`` a ">" bound, ``CENSOR_BELOW`` a "<" bound)."""

    values: sp.csr_matrix
    censor: sp.csr_matrix
    tasks: pd.DataFrame

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def eval_task_mask(self) -> np.ndarray:
        return self.tasks["evaluate"].to_numpy(dtype=bool)


@dataclass
class SiteData:
    """One partner's data: fingerprints X, labels Y (+1 active, -1 inactive, absent = unlabeled).

    `values` holds the continuous measurement behind a label where one exists (for a regression head);
    its own sparsity pattern says which labels have one, stored zeros included.

    `audit_rows` are the sorted rows of the audit hold-out (`PrepareConfig.audit_fraction`): compounds that keep
    their labels and folds but are never trained on, the non-members of a membership-inference audit.
    """

    X: sp.csr_matrix
    Y: sp.csr_matrix
    folds: np.ndarray
    tasks: pd.DataFrame
    manifest: dict
    path: str
    values: sp.csr_matrix | None = None
    regression: RegressionData | None = None  # None: prepared before regression tasks existed
    audit_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_tasks(self) -> int:
        return int(self.Y.shape[1])

    @property
    def eval_task_mask(self) -> np.ndarray:
        """Boolean mask of the tasks that pass the evaluation quorum."""
        return self.tasks["evaluate"].to_numpy(dtype=bool)

    def rows_in_folds(self, folds: Iterable[int]) -> np.ndarray:
        """Row indices of the compounds whose fold is in `folds`."""
        return np.flatnonzero(np.isin(self.folds, np.fromiter(folds, dtype=np.int64)))


def load_site(path: str, verify: bool = False) -> SiteData:
    """Load a site folder; `verify` also checks every file against the manifest's sha256."""
    folder = Path(path)
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise InputError(
                f"No prepared data for site at '{path}' (missing {name}); run `pharmafl prepare chem` first."
            )
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"The manifest at '{folder / 'manifest.json'}' is not valid JSON.") from None
    if verify:
        verify_checksums(folder, manifest)

    X = _load_matrix(folder / "X.npz").astype(np.float32, copy=False)
    Y = _load_matrix(folder / "Y.npz").astype(np.int8, copy=False)
    values = _load_matrix(folder / "values.npz") if (folder / "values.npz").is_file() else None
    try:
        folds = np.load(folder / "folds.npy", allow_pickle=False)
        tasks = pd.read_csv(folder / "tasks.csv", dtype={"task_id": str, "assay": str})
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        raise InputError(f"The prepared data at '{path}' is damaged; prepare it again.") from None

    problems = []
    if Y.shape[0] != X.shape[0] or len(folds) != X.shape[0]:
        problems.append(f"X has {X.shape[0]} rows, Y {Y.shape[0]} and folds {len(folds)}")
    if Y.shape[1] != len(tasks):
        problems.append(f"Y has {Y.shape[1]} task columns but tasks.csv lists {len(tasks)} tasks")
    if "n_bits" in manifest and X.shape[1] != manifest["n_bits"]:
        problems.append(f"X has {X.shape[1]} columns but the manifest says {manifest['n_bits']} bits")
    if values is not None and values.shape != Y.shape:
        problems.append(f"values has shape {values.shape} but Y has {Y.shape}")
    if "evaluate" not in tasks.columns:
        problems.append("tasks.csv has no 'evaluate' column")
    if Y.nnz and not np.isin(Y.data, (-1, 1)).all():
        problems.append("Y holds labels other than +1 and -1")
    regression = _load_regression(folder, X.shape[0], problems)
    audit_rows = _load_audit_rows(folder, manifest, X.shape[0], problems)
    if problems:
        raise InputError(f"The prepared data at '{path}' is inconsistent ({'; '.join(problems)}); prepare it again.")
    return SiteData(
        X=X,
        Y=Y,
        folds=folds,
        tasks=tasks,
        manifest=manifest,
        path=str(path),
        values=values,
        regression=regression,
        audit_rows=audit_rows,
    )


def _load_audit_rows(folder: Path, manifest: dict, n_compounds: int, problems: list[str]) -> np.ndarray:
    """The audit hold-out's rows, sorted; none for a folder prepared before the hold-out existed."""
    none = np.zeros(0, dtype=np.int64)
    manifest = manifest if isinstance(manifest, dict) else {}
    checksums = manifest.get("sha256")
    listed = AUDIT_FILE in checksums if isinstance(checksums, dict) else False
    if not (folder / AUDIT_FILE).is_file():
        if listed or manifest.get("n_audit"):  # a deleted hold-out would silently be trained on
            problems.append(f"{AUDIT_FILE} is missing but the manifest lists it")
        return none
    try:
        rows = np.load(folder / AUDIT_FILE, allow_pickle=False)
    except (ValueError, OSError):
        raise InputError(f"The audit hold-out at '{folder / AUDIT_FILE}' is damaged; prepare it again.") from None
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        problems.append(f"{AUDIT_FILE} is not a list of row indices")
    elif len(rows) and (rows.min() < 0 or rows.max() >= n_compounds):
        problems.append(f"{AUDIT_FILE} points outside the {n_compounds} compounds")
    elif len(np.unique(rows)) != len(rows):
        problems.append(f"{AUDIT_FILE} lists a row twice")
    elif "n_audit" in manifest and manifest["n_audit"] != len(rows):
        problems.append(f"{AUDIT_FILE} lists {len(rows)} rows but the manifest says {manifest['n_audit']}")
    else:
        return np.sort(rows).astype(np.int64, copy=False)
    return none


def _load_regression(folder: Path, n_compounds: int, problems: list[str]) -> RegressionData | None:
    if not (folder / "regression.npz").is_file():
        return None
    try:
        with np.load(folder / "regression.npz", allow_pickle=False) as stored:
            row, task, value, censor = (stored[k] for k in ("row", "task", "value", "censor"))
        tasks = pd.read_csv(folder / "regression_tasks.csv", dtype={"task_id": str, "assay": str})
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, pd.errors.ParserError, pd.errors.EmptyDataError):
        raise InputError(f"The regression data at '{folder}' is damaged; prepare it again.") from None
    if not len(row) == len(task) == len(value) == len(censor):
        problems.append("regression.npz arrays differ in length")
    elif len(row) and (row.min() < 0 or row.max() >= n_compounds or task.min() < 0 or task.max() >= len(tasks)):
        problems.append(f"regression.npz points outside {n_compounds} compounds x {len(tasks)} regression tasks")
    elif not (np.isin(censor, (CENSOR_EXACT, CENSOR_ABOVE, CENSOR_BELOW)).all() and np.isfinite(value).all()):
        problems.append("regression.npz holds unknown censoring codes or non-finite values")
    if problems:
        return None
    shape = (n_compounds, len(tasks))
    return RegressionData(
        values=sp.csr_matrix((value, (row, task)), shape=shape, dtype=np.float32),
        censor=sp.csr_matrix((censor, (row, task)), shape=shape, dtype=np.int8),
        tasks=tasks,
    )


def _load_matrix(path: Path) -> sp.csr_matrix:
    try:
        return sp.csr_matrix(sp.load_npz(path))
    except (ValueError, OSError, KeyError, zipfile.BadZipFile):
        raise InputError(f"'{path}' is not a readable sparse matrix; prepare the data again.") from None
