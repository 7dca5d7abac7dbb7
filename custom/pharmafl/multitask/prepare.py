"""MELLODDY-style data preparation: activity table -> per-site sparse fingerprints, labels and folds.

The pipeline: read a wide (one column per assay) or long (smiles, task, value[, qualifier]) CSV, parse
labels, standardise and featurise every distinct SMILES once, merge duplicate structures, threshold
continuous activities into classification tasks, assign scaffold folds with a keyed hash, draw the audit
hold-out with another keyed hash, split the assays between simulated partners and write one folder per
partner. Everything skipped is counted.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pharmafl.core.errors import InputError
from pharmafl.core.manifest import sha256_file
from pharmafl.core.outputs import PREPARATIONS, PREPARE_CHEM, check_output, staged_output
from pharmafl.core.paths import check_site_names
from pharmafl.multitask.dataset import CENSOR_ABOVE, CENSOR_BELOW, CENSOR_EXACT
from pharmafl.multitask.standardize import (
    FEATURE_FAILURES,
    features_with_reason,
    fold_for_scaffold,
    standardize_with_reason,
)

FORMAT_VERSION = 1
SITE_FILES = (
    "X.npz",
    "Y.npz",
    "values.npz",
    "folds.npy",
    "tasks.csv",
    "compounds.csv",
    "regression.npz",
    "regression_tasks.csv",
    "audit.npy",
)

MISSING_TOKENS = {"", "na", "nan", "n/a", "null", "none"}
EXACT, BELOW, ABOVE = 0, 1, 2
# ChEMBL-style relations; "<=" and ">=" imply the same labels as "<" and ">" under our threshold rules.
QUALIFIERS = {
    "": EXACT,
    "=": EXACT,
    "~": EXACT,
    "<": BELOW,
    "<=": BELOW,
    "<<": BELOW,
    ">": ABOVE,
    ">=": ABOVE,
    ">>": ABOVE,
}
PROGRESS_EVERY = 2000


@dataclass
class PrepareConfig:
    """Options of `prepare_chem`.

    `fold_secret` keys the scaffold-to-fold hash and the audit hold-out. The default is public and only fit
    for demos: a consortium must choose its own secret and share it only among its partners.

    `audit_fraction` of the compounds (drawn per canonical SMILES, see `audit_draw`) form the audit hold-out:
    they keep their labels and folds, and training leaves them out, so a membership-inference audit has
    non-members from the training distribution. 0 (no hold-out) reproduces preparations made before it existed.
    """

    sites: list[str]
    fmt: str = "auto"  # "wide", "long", or "auto" (long if the columns include task and value)
    smiles_col: str = "smiles"
    thresholds: tuple[float, ...] = (5.5, 6.5, 7.5)
    fold_secret: str = field(default="pharmafl-demo-secret", repr=False)
    n_bits: int = 32000
    radius: int = 3
    n_folds: int = 5
    test_fold: int = 0
    min_train_actives: int = 10
    min_train_inactives: int = 10
    min_eval_actives: int = 5
    min_eval_inactives: int = 5
    # Regression tasks (one per continuous assay and partner, for the optional regression head): trained with
    # at least this many values (measured or censored), evaluated with this many measured ones in the test fold.
    min_regression_values: int = 25
    min_eval_regression_values: int = 10
    max_heavy_atoms: int = 100
    seed: int = 0
    max_compounds: int | None = None  # keep only the first N valid compounds (tests, quick demos)
    # "shared": a compound is at every partner that has labels on it (public-data style overlap);
    # "private": each compound stays with one of those partners (seeded), like proprietary libraries.
    compound_overlap: str = "shared"
    # "assays": each assay (all its compounds) belongs to one partner. "libraries": each compound belongs to one
    # partner's library (by scaffold cluster or at random), and every partner has its own task for every
    # (target, threshold) it measured on its own compounds, as pharma partners screening the same targets do.
    partition: str = "assays"
    library_split: str = "scaffold"  # "scaffold" (whole Murcko-scaffold groups) or "random"
    library_sizes: tuple[float, ...] | None = None  # one share per site (normalised); None: equal libraries
    audit_fraction: float = 0.0  # share of compounds held out of training for `pharmafl audit membership`


@dataclass
class _Labels:
    """Parsed measurements before standardisation: one entry per (input row, assay) value."""

    row_smiles: np.ndarray  # raw SMILES per input row
    usable_rows: np.ndarray  # bool per input row: has a SMILES and at least one label
    row: np.ndarray  # input row of each measurement
    assay: np.ndarray  # index into assay_names
    value: np.ndarray
    qualifier: np.ndarray  # EXACT, BELOW or ABOVE
    assay_names: list[str]
    assay_binary: np.ndarray  # bool per assay: all values 0/1, used as one task without thresholds
    counts: dict[str, int]
    ignored_columns: list[str] = field(default_factory=list)
    empty_columns: list[str] = field(default_factory=list)


@dataclass
class _Task:
    task_id: str
    assay: int
    threshold: float | None
    compound: np.ndarray
    label: np.ndarray  # +1 / -1
    value: np.ndarray  # continuous source value, NaN where censored or binary


def prepare_chem(
    input_path: str,
    out_dir: str,
    config: PrepareConfig,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
) -> dict:
    """Prepare `input_path` (local CSV[.gz] or http(s) URL) into one folder per site under `out_dir`.

    `out_dir` must be new, empty or (with `overwrite`) an earlier preparation, which is then replaced as a whole:
    checked before the input is read, written next to it and swapped in at the end (see `pharmafl.core.outputs`).

    Returns the summary that is also written to `out_dir/summary.json`. A skipped row is counted once,
    under the first reason that applies: empty_smiles, empty_rows (no label), invalid_smiles, too_large,
    then the featurisation stage that failed (unreadable_standard_form, fingerprint_failed, scaffold_failed);
    non_numeric_values counts cells (in long format, rows). `duplicates_merged` counts records folded
    into an earlier one: rows of the same structure (wide), measurements of the same structure and task
    (long).
    """
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    _validate_config(config)
    local = [] if str(input_path).startswith(("http://", "https://")) else [input_path]
    check_output(out_dir, PREPARATIONS, overwrite, "--out", reads=local)
    path = _resolve_input(input_path, say)
    frame = _read_csv(path)
    fmt = _detect_format(frame, config)
    smiles_col = _find_smiles_column(frame, config.smiles_col, say)
    say(f"read {len(frame)} rows x {frame.shape[1]} columns from {input_path} ({fmt} format)")
    labels = _parse_wide(frame, smiles_col, say) if fmt == "wide" else _parse_long(frame, smiles_col)
    text_hint = _text_label_hint(frame, labels.ignored_columns) if not labels.assay_names else ""
    del frame
    if not labels.assay_names:
        raise InputError(
            f"No usable label column in '{input_path}': no column holds numeric activity values{text_hint or '.'}"
        )

    row_compound, compounds, fingerprints, scaffolds, counts = _featurize(labels, config, say)
    counts = {**labels.counts, **counts}
    kept = row_compound[labels.row] >= 0
    compound, assay = row_compound[labels.row][kept], labels.assay[kept]
    value, qualifier = labels.value[kept], labels.qualifier[kept]
    if len(compounds) == 0:
        raise InputError(f"No valid structure with labels in '{input_path}'; check the SMILES column.")
    pairs = _merge_duplicates(compound, assay, value, qualifier, labels.assay_binary)
    if fmt == "wide":  # a record is a row: rows folded into an earlier row of the same structure
        duplicates_merged = int(np.count_nonzero(row_compound >= 0) - len(compounds))
    else:  # a record is a measurement: folded into an earlier one of the same structure and task
        duplicates_merged = int(len(compound) - len(pairs))

    fold_of_scaffold: dict[str, int] = {}
    folds = np.array(
        [fold_of_scaffold.setdefault(s, fold_for_scaffold(s, config.fold_secret, config.n_folds)) for s in scaffolds],
        dtype=np.int8,
    )
    audit = audit_holdout(compounds, config.fold_secret, config.audit_fraction)
    tasks = _threshold_tasks(pairs, labels.assay_binary, labels.assay_names, config.thresholds)

    assays = np.unique(pairs["assay"].to_numpy())  # assays with at least one label left
    library = None
    if config.partition == "libraries":
        library = _library_of_compounds(scaffolds, _library_sizes(config), config.library_split, config.seed)
        tasks, site_of_task = _split_by_library(tasks, library, config.sites)
    else:
        site_of_assay = np.full(len(labels.assay_names), -1)
        order = np.random.default_rng(config.seed).permutation(len(assays))
        site_of_assay[assays[order]] = np.arange(len(assays)) % len(config.sites)
        if config.compound_overlap == "private":
            tasks = _keep_compounds_private(tasks, site_of_assay, len(compounds), len(config.sites), config.seed)
        site_of_task = np.array([site_of_assay[task.assay] for task in tasks], dtype=np.int64)
    stats = _task_statistics(tasks, folds, config)  # the quorums, per partner's own task
    regression = _regression_tasks(pairs, labels.assay_binary, labels.assay_names)
    if library is not None:
        regression, site_of_regression = _split_by_library(regression, library, config.sites)
    else:
        site_of_regression = np.array([site_of_assay[task.assay] for task in regression], dtype=np.int64)

    site_tasks = {site: [] for site in config.sites}
    for index in range(len(tasks)):
        if stats["train"][index]:
            site_tasks[config.sites[site_of_task[index]]].append(index)
    for site, indices in site_tasks.items():
        if not indices:
            raise InputError(
                f"Site '{site}' has no task with {config.min_train_actives} actives and "
                f"{config.min_train_inactives} inactives; use fewer partners or a lower training quorum."
            )

    source = {"path": str(input_path), "sha256": sha256_file(path)}
    x_all = fingerprint_matrix(fingerprints, config.n_bits)
    with staged_output(out_dir, PREPARE_CHEM) as out:
        site_summaries = {}
        for site, indices in site_tasks.items():
            site_summaries[site] = _write_site(
                out / site,
                site,
                [tasks[i] for i in indices],
                stats.loc[indices],
                [
                    task
                    for task, owner in zip(regression, site_of_regression, strict=True)
                    if config.sites[owner] == site
                ],
                x_all,
                folds,
                audit,
                compounds,
                labels.assay_names,
                config,
                source,
            )
            s = site_summaries[site]
            say(
                f"{site}: {s['compounds']} compounds, {s['tasks']} tasks ({s['tasks_eval']} evaluable), "
                f"{s['labels']} labels, {s['audit_compounds']} compounds in the audit hold-out"
            )

        in_sites = np.unique(np.concatenate([tasks[i].compound for ids in site_tasks.values() for i in ids]))
        summary = {
            "format_version": FORMAT_VERSION,
            "input": source,
            "format": fmt,
            "rows_read": int(len(labels.row_smiles)),
            "skipped": {
                key: counts[key]
                for key in (
                    "invalid_smiles",
                    "empty_smiles",
                    "too_large",
                    *FEATURE_FAILURES,
                    "non_numeric_values",
                    "empty_rows",
                    "invalid_qualifiers",
                )
            },
            "rows_beyond_max_compounds": counts["rows_beyond_max_compounds"],
            "duplicates_merged": duplicates_merged,
            "ignored_columns": labels.ignored_columns,
            "empty_columns": labels.empty_columns,
            "compounds": len(compounds),
            "compounds_in_sites": int(len(in_sites)),
            "audit_compounds_in_sites": int(audit[in_sites].sum()),
            "assays": int(len(assays)),
            "binary_assays": int(labels.assay_binary[assays].sum()),
            "labels": int(sum(len(t.label) for t in tasks)),
            "tasks_total": len(tasks),
            "tasks_train_quorum": int(stats["train"].sum()),
            "tasks_eval_quorum": int(stats["evaluate"].sum()),
            "sites": site_summaries,
            "partition": _partition_summary(config, library),
            "config": {
                **{k: v for k, v in asdict(config).items() if k != "fold_secret"},
                "thresholds": sorted(config.thresholds),
            },
            "seconds": round(time.perf_counter() - started, 2),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"prepared {summary['compounds']} compounds, {summary['tasks_train_quorum']} of "
        f"{summary['tasks_total']} tasks pass the training quorum, in {summary['seconds']} s -> {out_dir}"
    )
    return summary


def _validate_config(config: PrepareConfig) -> None:
    if config.compound_overlap not in ("shared", "private"):
        raise InputError(f"compound overlap must be 'shared' or 'private', got '{config.compound_overlap}'.")
    if config.partition not in PARTITIONS:
        raise InputError(f"--partition must be one of {', '.join(PARTITIONS)}, got '{config.partition}'.")
    if config.library_split not in LIBRARY_SPLITS:
        raise InputError(f"--library-split must be one of {', '.join(LIBRARY_SPLITS)}, got '{config.library_split}'.")
    sites = list(config.sites)
    if not sites:
        raise InputError("Give at least one site name.")
    _library_sizes(config)
    check_site_names(sites)
    if config.fmt not in ("auto", "wide", "long"):
        raise InputError(f"Input format must be 'auto', 'wide' or 'long', got '{config.fmt}'.")
    thresholds = list(config.thresholds)
    if not thresholds:
        raise InputError("Give at least one activity threshold.")
    if not all(np.isfinite(t) for t in thresholds) or len(set(thresholds)) != len(thresholds):
        raise InputError(f"Thresholds must be distinct finite numbers, got {thresholds}.")
    if not 2 <= config.n_folds <= 127:
        raise InputError(f"The number of folds must be between 2 and 127, got {config.n_folds}.")
    if not 0 <= config.test_fold < config.n_folds:
        raise InputError(f"The test fold must be between 0 and {config.n_folds - 1}, got {config.test_fold}.")
    if config.n_bits < 1 or config.radius < 0:
        raise InputError("The fingerprint needs at least 1 bit and a radius of at least 0.")
    quorum = (
        config.min_train_actives,
        config.min_train_inactives,
        config.min_eval_actives,
        config.min_eval_inactives,
    )
    if min(quorum) < 0:
        raise InputError("Quorum counts cannot be negative.")
    if config.max_compounds is not None and config.max_compounds < 1:
        raise InputError(f"max_compounds must be at least 1, got {config.max_compounds}.")
    if not config.fold_secret:
        raise InputError("The fold secret cannot be empty.")
    if not 0 <= config.audit_fraction < 0.5:
        raise InputError(f"--audit-fraction must be at least 0 and below 0.5, got {config.audit_fraction}.")


def _resolve_input(input_path: str, say: Callable[[str], None]) -> Path:
    if str(input_path).startswith(("http://", "https://")):
        return _download(str(input_path), say)
    path = Path(input_path).expanduser()
    if not path.exists():
        raise InputError(f"Input file '{input_path}' does not exist.")
    if not path.is_file():
        raise InputError(f"Input '{input_path}' is not a file.")
    return path


def _download(url: str, say: Callable[[str], None]) -> Path:
    """Download once into ~/.cache/pharmafl/ and reuse; the URL's hash keeps equal file names apart."""
    name = Path(urllib.parse.urlparse(url).path).name or "download.csv"
    target = Path.home() / ".cache" / "pharmafl" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if target.is_file():
        say(f"using cached download {target}")
        return target
    partial = target.with_name(target.name + ".part")
    say(f"downloading {url} -> {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        partial.replace(target)
    except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise InputError(
            f"The download of '{url}' failed ({reason}); download it yourself and pass the local file."
        ) from None
    return target


def _read_csv(path: Path) -> pd.DataFrame:
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"  # by content, so cached downloads need no extension
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
        start = handle.read(4)
    # UTF-16 (as some spreadsheets save "Unicode text") and UTF-8 with a byte-order mark are unambiguous: read them.
    encoding = "utf-16" if start[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        # dtype=str and no NA parsing: every cell stays text, so nothing is coerced behind our back.
        frame = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            compression="gzip" if gzipped else "infer",
            encoding=encoding,
        )
    except pd.errors.EmptyDataError:
        raise InputError(f"Input file '{path}' is empty.") from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"'{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}, e.g. Latin-1): "
            "save it as UTF-8 (spreadsheets: 'CSV UTF-8'), or convert it with `iconv -f latin1 -t utf-8 IN > OUT`."
        ) from None
    except (pd.errors.ParserError, gzip.BadGzipFile, EOFError, OSError) as exc:
        raise InputError(f"Could not read '{path}' as a CSV file ({str(exc).strip()[:200]}).") from None
    if len(frame) == 0:
        raise InputError(f"Input file '{path}' has a header but no data rows.")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _detect_format(frame: pd.DataFrame, config: PrepareConfig) -> str:
    columns = set(frame.columns)
    if config.fmt == "auto":
        return "long" if {"task", "value"} <= columns else "wide"
    if config.fmt == "long" and not {"task", "value"} <= columns:
        missing = sorted({"task", "value"} - columns)
        raise InputError(f"Long format needs columns smiles, task and value; missing {', '.join(missing)}.")
    return config.fmt


def _find_smiles_column(frame: pd.DataFrame, smiles_col: str, say: Callable[[str], None]) -> str:
    if smiles_col in frame.columns:
        return smiles_col
    matches = [c for c in frame.columns if c.lower() == smiles_col.lower()]
    if len(matches) == 1:
        say(f"note: using column '{matches[0]}' as the SMILES column")
        return matches[0]
    shown = ", ".join(f"'{c}'" for c in list(frame.columns)[:8])
    more = f" and {frame.shape[1] - 8} more" if frame.shape[1] > 8 else ""
    raise InputError(f"SMILES column '{smiles_col}' not found; available columns are {shown}{more}.")


def _parse_numbers(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, missing) for text cells; non-numeric cells are NaN and not missing."""
    text = pd.Series(cells, dtype=object).str.strip()
    missing = (text.isna() | text.str.lower().isin(MISSING_TOKENS)).to_numpy()
    values = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan  # "inf" parses, but is no activity
    return values, missing


def _empty_smiles(smiles: np.ndarray) -> np.ndarray:
    return ~pd.Series(smiles, dtype=object).str.strip().fillna("").astype(bool).to_numpy()


TEXT_LABELS = {"active", "inactive", "yes", "no", "true", "false", "positive", "negative", "binder", "non-binder"}


def _text_label_hint(frame: pd.DataFrame, columns: list[str]) -> str:
    """A hint when ignored columns hold text labels such as 'active'/'inactive' (empty string otherwise)."""
    found = sorted(
        {value.strip().lower() for name in columns[:50] for value in frame[name].unique()[:20]} & TEXT_LABELS
    )
    if not found:
        return ""
    return (
        f"; they hold text labels ({', '.join(found)}): write labels as numbers, 1 for active and 0 for inactive, "
        "or give activity values such as pIC50."
    )


def _parse_wide(frame: pd.DataFrame, smiles_col: str, say: Callable[[str], None]) -> _Labels:
    """One column per assay; entirely non-numeric columns (ids, names) are ignored with a note."""
    columns = [c for c in frame.columns if c != smiles_col]
    cells = frame[columns].to_numpy(dtype=object)
    rows, cols = np.nonzero(cells != "")  # only non-empty cells are parsed: the table is mostly empty
    values, missing = _parse_numbers(cells[rows, cols])
    rows, cols, values = rows[~missing], cols[~missing], values[~missing]
    numeric = ~np.isnan(values)
    present_count = np.bincount(cols, minlength=len(columns))
    numeric_count = np.bincount(cols[numeric], minlength=len(columns))
    non_binary = np.bincount(cols[numeric & (values != 0) & (values != 1)], minlength=len(columns))

    ignored = [columns[c] for c in np.flatnonzero((present_count > 0) & (numeric_count == 0))]
    if ignored:
        shown = ", ".join(f"'{name}'" for name in ignored[:3]) + (
            f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        )
        say(f"note: ignoring {len(ignored)} column(s) that hold no numbers: {shown}{_text_label_hint(frame, ignored)}")
    if (present_count == 0).any():
        say(f"note: {int((present_count == 0).sum())} columns hold no values at all")
    label_columns = np.flatnonzero(numeric_count > 0)
    assay_of_column = np.full(len(columns), -1)
    assay_of_column[label_columns] = np.arange(len(label_columns))

    row_smiles = frame[smiles_col].to_numpy(dtype=object)
    empty_smiles = _empty_smiles(row_smiles)
    has_label = np.bincount(rows[numeric], minlength=len(frame)) > 0
    counts = {
        "empty_smiles": int(empty_smiles.sum()),
        "empty_rows": int((~empty_smiles & ~has_label).sum()),
        # cells of ignored columns are not values; cells of numeric columns that do not parse are
        "non_numeric_values": int((~numeric & (numeric_count[cols] > 0)).sum()),
        "invalid_qualifiers": 0,
    }
    return _Labels(
        row_smiles=row_smiles,
        usable_rows=~empty_smiles & has_label,
        row=rows[numeric],
        assay=assay_of_column[cols[numeric]],
        value=values[numeric],
        qualifier=np.full(int(numeric.sum()), EXACT, dtype=np.int8),
        assay_names=[columns[c] for c in label_columns],
        assay_binary=non_binary[label_columns] == 0,
        counts=counts,
        ignored_columns=ignored,
        empty_columns=[columns[c] for c in np.flatnonzero(present_count == 0)],
    )


def _parse_long(frame: pd.DataFrame, smiles_col: str) -> _Labels:
    """Rows of smiles, task, value[, qualifier]; each row is at most one measurement."""
    row_smiles = frame[smiles_col].to_numpy(dtype=object)
    empty_smiles = _empty_smiles(row_smiles)
    task = frame["task"].str.strip().fillna("").to_numpy(dtype=object)
    values, missing = _parse_numbers(frame["value"].to_numpy(dtype=object))
    if "qualifier" in frame.columns:
        qualifier_text = frame["qualifier"].str.strip().fillna("")
    else:
        qualifier_text = pd.Series("", index=frame.index)
    qualifier = qualifier_text.map(QUALIFIERS).to_numpy()

    empty = ~empty_smiles & ((task == "") | missing)
    non_numeric = ~empty_smiles & ~empty & np.isnan(values)
    bad_qualifier = ~empty_smiles & ~empty & ~non_numeric & pd.isna(qualifier)
    usable = ~(empty_smiles | empty | non_numeric | bad_qualifier)
    counts = {
        "empty_smiles": int(empty_smiles.sum()),
        "empty_rows": int(empty.sum()),
        "non_numeric_values": int(non_numeric.sum()),
        "invalid_qualifiers": int(bad_qualifier.sum()),
    }
    rows = np.flatnonzero(usable)
    assay_names = list(pd.unique(task[rows]))
    assay = pd.Index(assay_names).get_indexer(task[rows])
    qualifier = qualifier[rows].astype(np.int8)
    values = values[rows]
    not_binary = (qualifier != EXACT) | ((values != 0) & (values != 1))
    return _Labels(
        row_smiles=row_smiles,
        usable_rows=usable,
        row=rows,
        assay=assay,
        value=values,
        qualifier=qualifier,
        assay_names=assay_names,
        assay_binary=np.bincount(assay[not_binary], minlength=len(assay_names)) == 0,
        counts=counts,
    )


def _featurize(labels: _Labels, config: PrepareConfig, say: Callable[[str], None]):
    """Standardise, fingerprint and scaffold each distinct SMILES once; returns per-row compound ids.

    Fingerprints and scaffolds come from the canonical SMILES, not the input, so they depend only on the
    structure: `ecfp_bits(smiles)` of a row of compounds.csv reproduces its row of X.
    """
    unique = pd.unique(labels.row_smiles[labels.usable_rows])
    total = len(unique) if config.max_compounds is None else min(len(unique), config.max_compounds)
    outcome: dict[str, int | str] = {}  # raw SMILES -> compound index or rejection reason
    index_of: dict[str, int] = {}
    compounds: list[str] = []
    fingerprints: list[np.ndarray] = []
    scaffolds: list[str] = []
    for done, smiles in enumerate(unique, start=1):
        canonical, reason = standardize_with_reason(smiles, config.max_heavy_atoms)
        if canonical is None:
            outcome[smiles] = reason
        elif canonical in index_of:
            outcome[smiles] = index_of[canonical]
        else:
            if config.max_compounds is not None and len(compounds) >= config.max_compounds:
                break
            features, reason = features_with_reason(canonical, config.radius, config.n_bits)
            if features is None:
                outcome[smiles] = reason
                continue
            index_of[canonical] = outcome[smiles] = len(compounds)
            compounds.append(canonical)
            fingerprints.append(features[0])
            scaffolds.append(features[1])
        if done % PROGRESS_EVERY == 0:
            say(f"featurising {done}/{total} compounds")

    row_compound = np.full(len(labels.row_smiles), -1, dtype=np.int64)
    counts = dict.fromkeys(("invalid_smiles", "too_large", *FEATURE_FAILURES, "rows_beyond_max_compounds"), 0)
    for row in np.flatnonzero(labels.usable_rows):
        result = outcome.get(labels.row_smiles[row], "rows_beyond_max_compounds")
        if isinstance(result, str):
            counts[result] += 1
        else:
            row_compound[row] = result
    return row_compound, compounds, fingerprints, scaffolds, counts


def _merge_duplicates(compound, assay, value, qualifier, assay_binary) -> pd.DataFrame:
    """One row per (compound, assay): exact = median of "=" values (max for binary assays).

    Without an exact value, lower = the largest ">" bound and upper = the smallest "<" bound.
    """
    frame = pd.DataFrame({"compound": compound, "assay": assay, "value": value})
    keys = ["compound", "assay"]
    exact = frame[qualifier == EXACT]
    binary = assay_binary[exact["assay"].to_numpy()]
    merged = (
        pd.concat(
            [
                pd.concat(
                    [
                        exact[~binary].groupby(keys)["value"].median(),
                        exact[binary].groupby(keys)["value"].max(),
                    ]
                ).rename("exact"),
                frame[qualifier == ABOVE].groupby(keys)["value"].max().rename("lower"),
                frame[qualifier == BELOW].groupby(keys)["value"].min().rename("upper"),
            ],
            axis=1,
        )
        .sort_index(level=["assay", "compound"])
        .reset_index()
    )
    has_exact = merged["exact"].notna()
    merged.loc[has_exact, ["lower", "upper"]] = np.nan  # a measurement beats a bound
    return merged


def _regression_tasks(pairs: pd.DataFrame, assay_binary: np.ndarray, assay_names: list[str]) -> list[_Task]:
    """One regression task per continuous assay: the measured value, else the bound (label = censoring code)."""
    tasks = []
    for assay, group in pairs.groupby("assay", sort=True):
        if assay_binary[assay]:
            continue
        exact, lower, upper = (group[c].to_numpy() for c in ("exact", "lower", "upper"))
        # a measurement, else a lone bound; a compound with both a ">" and a "<" bound says too little
        censor = np.select(
            [~np.isnan(exact), ~np.isnan(lower) & np.isnan(upper), np.isnan(lower) & ~np.isnan(upper)],
            [CENSOR_EXACT, CENSOR_ABOVE, CENSOR_BELOW],
            0,
        ).astype(np.int8)
        value = np.where(censor == CENSOR_EXACT, exact, np.where(censor == CENSOR_ABOVE, lower, upper))
        keep = censor > 0
        if keep.any():
            compound = group["compound"].to_numpy()[keep]
            tasks.append(_Task(assay_names[assay], int(assay), None, compound, censor[keep], value[keep]))
    return tasks


def _threshold_tasks(
    pairs: pd.DataFrame, assay_binary: np.ndarray, assay_names: list[str], thresholds: tuple[float, ...]
) -> list[_Task]:
    """Binary assays -> one task; continuous assays -> one task per threshold (active iff value >= t)."""
    tasks = []
    for assay, group in pairs.groupby("assay", sort=True):
        compound = group["compound"].to_numpy()
        exact, lower, upper = (group[c].to_numpy() for c in ("exact", "lower", "upper"))
        if assay_binary[assay]:
            label = np.where(exact >= 1, 1, -1).astype(np.int8)
            tasks.append(_Task(assay_names[assay], int(assay), None, compound, label, np.full(len(label), np.nan)))
            continue
        measured = ~np.isnan(exact)
        for threshold in sorted(thresholds):
            # NaN comparisons are False, so a missing bound says nothing; a conflict (> t and < t) sums to 0
            censored = (lower >= threshold).astype(np.int8) - (upper < threshold).astype(np.int8)
            label = np.where(measured, np.where(exact >= threshold, 1, -1), censored).astype(np.int8)
            keep = label != 0
            if keep.any():
                tasks.append(
                    _Task(
                        f"{assay_names[assay]}@{threshold:g}",
                        int(assay),
                        float(threshold),
                        compound[keep],
                        label[keep],
                        exact[keep],
                    )
                )
    return tasks


PARTITIONS = ("assays", "libraries")
LIBRARY_SPLITS = ("scaffold", "random")


def _partition_summary(config: PrepareConfig, library: np.ndarray | None) -> dict:
    """How the partners were simulated; for libraries, each partner's library size (compounds)."""
    summary = {"kind": config.partition}
    if library is not None:
        counts = np.bincount(library, minlength=len(config.sites))
        summary.update(
            library_split=config.library_split,
            library_sizes=[float(x) for x in _library_sizes(config)],
            library_compounds={site: int(count) for site, count in zip(config.sites, counts, strict=True)},
        )
    return summary


def _library_sizes(config: PrepareConfig) -> np.ndarray:
    """Each site's share of the compounds (sums to 1)."""
    if config.library_sizes is None:
        return np.full(len(config.sites), 1.0 / len(config.sites))
    sizes = np.asarray(config.library_sizes, dtype=float)
    if len(sizes) != len(config.sites) or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        shares = list(config.library_sizes)
        raise InputError(f"--library-sizes needs one positive share per site ({len(config.sites)}), got {shares}.")
    return sizes / sizes.sum()


def _library_of_compounds(scaffolds: list[str], sizes: np.ndarray, split: str, seed: int) -> np.ndarray:
    """The partner (index) whose library each compound is in, with about ``sizes`` shares of the compounds.

    ``scaffold``: compounds sharing a Murcko scaffold stay together (an acyclic compound is its own group), so
    the libraries are chemically distinct; the groups, in a seeded random order, go one by one to the partner
    furthest below its share. ``random``: compounds are dealt at random in those shares.
    """
    rng = np.random.default_rng([seed, 2])
    n = len(scaffolds)
    if split == "random":
        owner = np.empty(n, dtype=np.int64)
        bounds = np.round(np.cumsum(sizes) * n).astype(np.int64)
        order = rng.permutation(n)
        for partner, (start, end) in enumerate(zip(np.concatenate([[0], bounds[:-1]]), bounds, strict=True)):
            owner[order[start:end]] = partner
        return owner
    keys = [s if s else f"acyclic:{i}" for i, s in enumerate(scaffolds)]
    _, group = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    members = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[members], np.arange(group.max() + 1))
    sizes_of_group = np.diff(np.concatenate([starts, [n]]))
    owner_of_group = np.empty(len(starts), dtype=np.int64)
    filled = np.zeros(len(sizes))
    for g in rng.permutation(len(starts)):
        partner = int(np.argmin(filled / sizes))  # the partner furthest below its share
        owner_of_group[g] = partner
        filled[partner] += sizes_of_group[g]
    return owner_of_group[group]


def _split_by_library(tasks: list[_Task], library: np.ndarray, sites: list[str]) -> tuple[list[_Task], np.ndarray]:
    """Each task split into one task per partner on that partner's own compounds, under a partner-own task id."""
    split, owner = [], []
    for task in tasks:
        holder = library[task.compound]
        for partner in np.unique(holder):
            keep = holder == partner
            split.append(
                _Task(
                    f"{sites[partner]}/{task.task_id}",
                    task.assay,
                    task.threshold,
                    task.compound[keep],
                    task.label[keep],
                    task.value[keep],
                )
            )
            owner.append(int(partner))
    return split, np.asarray(owner, dtype=np.int64)


def _keep_compounds_private(
    tasks: list[_Task], site_of_assay: np.ndarray, n_compounds: int, n_sites: int, seed: int
) -> list[_Task]:
    """Give each compound to one partner among those with labels on it; drop its labels elsewhere."""
    measured_by = np.zeros((n_compounds, n_sites), dtype=bool)
    for task in tasks:
        measured_by[task.compound, site_of_assay[task.assay]] = True
    priority = np.random.default_rng([seed, 1]).random((n_compounds, n_sites))
    owner = np.argmax(np.where(measured_by, priority, -1.0), axis=1)
    private = []
    for task in tasks:
        keep = owner[task.compound] == site_of_assay[task.assay]
        if keep.any():
            private.append(
                _Task(task.task_id, task.assay, task.threshold, task.compound[keep], task.label[keep], task.value[keep])
            )
    return private


def _task_statistics(tasks: list[_Task], folds: np.ndarray, config: PrepareConfig) -> pd.DataFrame:
    rows = []
    for task in tasks:
        test = folds[task.compound] == config.test_fold
        rows.append(
            {
                "actives": int((task.label > 0).sum()),
                "inactives": int((task.label < 0).sum()),
                "test_actives": int((task.label[test] > 0).sum()),
                "test_inactives": int((task.label[test] < 0).sum()),
            }
        )
    stats = pd.DataFrame(rows, columns=["actives", "inactives", "test_actives", "test_inactives"])
    stats["train"] = (stats["actives"] >= config.min_train_actives) & (stats["inactives"] >= config.min_train_inactives)
    stats["evaluate"] = (
        stats["train"]
        & (stats["test_actives"] >= config.min_eval_actives)
        & (stats["test_inactives"] >= config.min_eval_inactives)
    )
    return stats


def audit_draw(smiles: str, secret: str) -> float:
    """A compound's audit draw in [0, 1): HMAC-SHA256(secret, "audit:" + canonical SMILES), top 53 bits / 2**53.

    A compound is held out iff its draw is below the audit fraction, so every preparation of the same input with
    the same secret and fraction (any partner count, the pooled one included) holds out the same compounds, and a
    larger fraction holds out a superset. The prefix keeps the draw apart from the scaffold-fold hash.
    """
    digest = hmac.new(secret.encode("utf-8"), f"audit:{smiles}".encode(), hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def audit_holdout(compounds: list[str], secret: str, fraction: float) -> np.ndarray:
    """Boolean per compound (canonical SMILES): in the audit hold-out (see `audit_draw`)."""
    if fraction <= 0:
        return np.zeros(len(compounds), dtype=bool)
    return np.fromiter((audit_draw(s, secret) < fraction for s in compounds), dtype=bool, count=len(compounds))


def fingerprint_matrix(fingerprints: list[np.ndarray], n_bits: int) -> sp.csr_matrix:
    """Compounds x bits CSR matrix of ones from each compound's sorted on-bit indices."""
    lengths = np.array([len(f) for f in fingerprints], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(fingerprints) if fingerprints else np.zeros(0, dtype=np.int32)
    data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(fingerprints), n_bits))


def _write_site(
    folder: Path,
    site: str,
    tasks: list[_Task],
    stats: pd.DataFrame,
    regression: list[_Task],
    x_all: sp.csr_matrix,
    folds: np.ndarray,
    audit: np.ndarray,
    compounds: list[str],
    assay_names: list[str],
    config: PrepareConfig,
    source: dict,
) -> dict:
    """Write one partner's folder; rows are the compounds with a label on one of its tasks.

    ``audit.npy`` lists the rows in the audit hold-out (``audit``, per compound), sorted; they stay in every file.
    """
    rows = np.unique(np.concatenate([t.compound for t in tasks]))
    position = [np.searchsorted(rows, t.compound) for t in tasks]
    column = [np.full(len(t.compound), j) for j, t in enumerate(tasks)]
    shape = (len(rows), len(tasks))
    label = np.concatenate([t.label for t in tasks])
    y = sp.csr_matrix((label, (np.concatenate(position), np.concatenate(column))), shape=shape, dtype=np.int8)
    # Only exact measurements carry a value; explicit zeros stay stored, so the pattern marks what exists.
    value = np.concatenate([t.value for t in tasks])
    has_value = ~np.isnan(value)
    values = sp.csr_matrix(
        (
            value[has_value].astype(np.float32),
            (np.concatenate(position)[has_value], np.concatenate(column)[has_value]),
        ),
        shape=shape,
        dtype=np.float32,
    )
    table = pd.DataFrame(
        {
            "task_id": [t.task_id for t in tasks],
            "assay": [assay_names[t.assay] for t in tasks],
            "threshold": [t.threshold for t in tasks],
            "actives": stats["actives"].to_numpy(),
            "inactives": stats["inactives"].to_numpy(),
            "test_actives": stats["test_actives"].to_numpy(),
            "test_inactives": stats["test_inactives"].to_numpy(),
            "evaluate": stats["evaluate"].to_numpy(dtype=bool),
        }
    )

    regression_table = _write_regression(folder, regression, rows, folds, config)
    sp.save_npz(folder / "X.npz", x_all[rows])
    sp.save_npz(folder / "Y.npz", y)
    sp.save_npz(folder / "values.npz", values)
    np.save(folder / "folds.npy", folds[rows])
    audit_rows = np.flatnonzero(audit[rows]).astype(np.int64)
    np.save(folder / "audit.npy", audit_rows)
    table.to_csv(folder / "tasks.csv", index=False)
    pd.DataFrame({"smiles": [compounds[i] for i in rows]}).to_csv(folder / "compounds.csv", index=False)
    manifest = {
        "format_version": FORMAT_VERSION,
        "site": site,
        "n_compounds": int(len(rows)),
        "n_tasks": len(tasks),
        "n_tasks_evaluate": int(table["evaluate"].sum()),
        "n_labels": int(y.nnz),
        "audit_fraction": float(config.audit_fraction),
        "n_audit": int(len(audit_rows)),
        "partition": config.partition,
        "n_bits": config.n_bits,
        "radius": config.radius,
        "max_heavy_atoms": config.max_heavy_atoms,
        "n_folds": config.n_folds,
        "test_fold": config.test_fold,
        "thresholds": sorted(config.thresholds),
        "quorum": {
            "min_train_actives": config.min_train_actives,
            "min_train_inactives": config.min_train_inactives,
            "min_eval_actives": config.min_eval_actives,
            "min_eval_inactives": config.min_eval_inactives,
            "min_regression_values": config.min_regression_values,
            "min_eval_regression_values": config.min_eval_regression_values,
        },
        "n_regression_tasks": len(regression_table),
        "n_regression_tasks_evaluate": int(regression_table["evaluate"].sum()),
        "source": source,
        "sha256": {name: sha256_file(folder / name) for name in SITE_FILES},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {
        "compounds": manifest["n_compounds"],
        "tasks": manifest["n_tasks"],
        "tasks_eval": manifest["n_tasks_evaluate"],
        "labels": manifest["n_labels"],
        "assays": int(table["assay"].nunique()),
        "regression_tasks": manifest["n_regression_tasks"],
        "regression_tasks_eval": manifest["n_regression_tasks_evaluate"],
        "audit_compounds": manifest["n_audit"],
    }


def _write_regression(
    folder: Path, regression: list[_Task], rows: np.ndarray, folds: np.ndarray, config: PrepareConfig
) -> pd.DataFrame:
    """The partner's regression tasks on its own compounds (``rows``) that pass the regression quorum:
    ``regression.npz`` (row, task, value, censor per value) and ``regression_tasks.csv``."""
    entries, table = [], []
    for task in regression:
        keep = np.isin(task.compound, rows)
        compound, censor, value = task.compound[keep], task.label[keep], task.value[keep]
        measured_in_test = (censor == CENSOR_EXACT) & (folds[compound] == config.test_fold)
        if len(compound) < config.min_regression_values:
            continue
        entries.append((np.searchsorted(rows, compound), np.full(len(compound), len(table)), value, censor))
        table.append(
            {
                "task_id": task.task_id,
                "assay": task.task_id.rpartition("/")[2],
                "values": int(len(compound)),
                "measured": int((censor == CENSOR_EXACT).sum()),
                "test_measured": int(measured_in_test.sum()),
                "evaluate": bool(measured_in_test.sum() >= config.min_eval_regression_values),
            }
        )
    if entries:
        row, column, value, censor = (np.concatenate(parts) for parts in zip(*entries, strict=True))
    else:
        row = column = value = censor = np.zeros(0)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        folder / "regression.npz",
        row=row.astype(np.int64),
        task=column.astype(np.int64),
        value=value.astype(np.float32),
        censor=censor.astype(np.int8),
    )
    frame = pd.DataFrame(table, columns=["task_id", "assay", "values", "measured", "test_measured", "evaluate"])
    frame.to_csv(folder / "regression_tasks.csv", index=False)
    return frame
