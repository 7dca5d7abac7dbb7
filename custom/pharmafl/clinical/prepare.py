"""``pharmafl prepare eicu``: one row per ICU stay from the eICU-CRD tables, in one folder per site.

The same code reads the public demo (``../shared/data/eicu``) and the full, credentialed eICU-CRD: both have the
tables ``patient``, ``apachePatientResult``, ``apacheApsVar``, ``apachePredVar`` and ``hospital`` (``.csv`` or
``.csv.gz``) with the same columns.

- **Stays:** a patient's first ICU stay (lowest ``patienthealthsystemstayid``, then ``unitvisitnumber``); later stays
  of the same patient are counted and left out, so no patient is in two splits or two sites.
- **Label:** ``hospitaldischargestatus`` Expired = 1, Alive = 0; a stay without it is counted and left out.
- **Features:** APACHE physiology (``apacheApsVar``), admission variables and comorbidities (``apachePredVar``),
  age (``> 89`` as 90), sex, height, weight, unit type, admission source and diagnosis group (one-hot). ``-1`` and
  empty mean missing (NaN here; the training imputes and adds a missing indicator per variable). Outcome and
  prediction columns (``actual*``, ``predicted*``, ``apachescore``, discharge fields, ``diedinhospital``) never
  become features.
- **APACHE IVa:** each stay's ``predictedhospitalmortality`` (IVa row; -1 = none) is kept aside in
  ``apache_iva`` for the comparison on the same test patients; it is not a feature.
- **Sites:** ``region`` (midwest, south, west, northeast; a hospital without a region is counted and left out) or
  ``hospital`` (``hospital-<id>`` for every hospital with at least ``min_stays`` stays). Each site's stays are split
  train/validation/test, stratified by the label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pharmafl.core.errors import InputError
from pharmafl.core.manifest import sha256_file
from pharmafl.core.outputs import PREPARATIONS, PREPARE_EICU, check_output, staged_output
from pharmafl.core.paths import check_site_names

KEY = "patientunitstayid"
LABEL, APACHE, SPLIT = "label", "apache_iva", "split"
STAYS_FILE = "stays.csv"
TABLES = ("patient", "apachePatientResult", "apacheApsVar", "apachePredVar", "hospital")
REGIONS = ("Midwest", "South", "West", "Northeast")
SITE_KINDS = ("region", "hospital")

APS_FEATURES = (
    "intubated", "vent", "dialysis", "eyes", "motor", "verbal", "meds", "urine", "wbc", "temperature",
    "respiratoryrate", "sodium", "heartrate", "meanbp", "ph", "hematocrit", "creatinine", "albumin", "pao2", "pco2",
    "bun", "glucose", "bilirubin", "fio2",
)  # fmt: skip
PRED_FEATURES = (
    "thrombolytics", "aids", "hepaticfailure", "lymphoma", "metastaticcancer", "leukemia", "immunosuppression",
    "cirrhosis", "electivesurgery", "activetx", "readmit", "ima", "midur", "ventday1", "oobventday1", "oobintubday1",
    "diabetes", "var03hspxlos", "ejectfx", "graftcount",
)  # fmt: skip
PATIENT_COLUMNS = (
    KEY, "patienthealthsystemstayid", "uniquepid", "hospitalid", "unitvisitnumber", "gender", "age",
    "admissionheight", "admissionweight", "unittype", "unitadmitsource", "apacheadmissiondx",
    "hospitaldischargestatus",
)  # fmt: skip
UNIT_TYPES = ("Med-Surg ICU", "MICU", "SICU", "CCU-CTICU", "Neuro ICU", "Cardiac ICU", "CSICU", "CTICU")
ADMIT_SOURCES = (
    "Emergency Department", "Floor", "Operating Room", "Direct Admit", "Recovery Room", "Step-Down Unit (SDU)",
    "Other Hospital", "ICU",
)  # fmt: skip
# Diagnosis groups by words of apacheadmissiondx (first match wins); everything else is "other".
DIAGNOSIS_GROUPS = (
    ("sepsis", ("sepsis",)),
    ("cardiac_arrest", ("cardiac arrest",)),
    ("cardiovascular", ("chf", "infarction", "rhythm", "angina", "cabg", "valve", "cardiomyopathy", "hypertension")),
    ("neurological", ("cva", "stroke", "hemorrhage", "seizure", "coma", "neuro", "subdural", "intracranial")),
    ("respiratory", ("pneumonia", "emphysema", "respiratory", "asthma", "pulmonary", "embolus")),
    ("gastrointestinal", ("bleeding", "gi ", "pancreatitis", "hepatic", "bowel", "cholecyst")),
    ("metabolic", ("diabetic", "ketoacidosis", "hypoglycemia", "electrolyte", "acid-base")),
    ("overdose", ("overdose", "toxicity")),
    ("trauma", ("trauma", "fracture")),
    ("renal", ("renal", "uti")),
)
# Columns that describe the outcome or a model's prediction of it: never features (a test checks it).
LEAKING = ("actual", "predicted", "apachescore", "discharge", "diedinhospital", "unabridged")


@dataclass(frozen=True)
class EicuConfig:
    sites: str = "region"
    min_stays: int = 10
    test_fraction: float = 0.25
    validation_fraction: float = 0.2  # of the stays that are not test stays
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sites not in SITE_KINDS:
            raise InputError(f"--sites must be one of {', '.join(SITE_KINDS)}, got '{self.sites}'.")
        if self.min_stays < 1:
            raise InputError(f"--min-stays must be at least 1, got {self.min_stays}.")
        for name, value in (("--test-fraction", self.test_fraction), ("validation fraction", self.validation_fraction)):
            if not 0.0 < value < 1.0:
                raise InputError(f"{name} must be between 0 and 1, got {value}.")


def feature_names() -> list[str]:
    """The feature columns of ``stays.csv``, in order."""
    one_hot = [f"unittype={v}" for v in (*UNIT_TYPES, "other")]
    one_hot += [f"admitsource={v}" for v in (*ADMIT_SOURCES, "other")]
    one_hot += [f"diagnosis={g}" for g, _ in (*DIAGNOSIS_GROUPS, ("other", ()))]
    return ["age", "female", "admissionheight", "admissionweight", *APS_FEATURES, *PRED_FEATURES, *one_hot]


def is_leaking(column: str) -> bool:
    return any(part in column.lower() for part in LEAKING)


def table_path(folder: Path, name: str) -> Path:
    """``name.csv.gz`` or ``name.csv`` in ``folder``; InputError when neither is there."""
    for ext in (".csv.gz", ".csv"):
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    raise InputError(f"the eICU table {name} is missing: no {name}.csv.gz or {name}.csv in '{folder}'.")


def read_table(folder: Path, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """Table ``name`` with ``columns``; InputError naming a missing table or column."""
    path = table_path(folder, name)
    try:
        table = pd.read_csv(path, low_memory=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the eICU table {path}: {err}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"the eICU table {path.name} has no column {', '.join(missing)}.")
    return table[list(columns)]


def _numeric(values: pd.Series, name: str, non_numeric: dict[str, int]) -> pd.Series:
    """``values`` as floats, -1 and empty as NaN; text that is no number counted in ``non_numeric`` as NaN."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = int((numbers.isna() & values.notna() & (values.astype(str).str.strip() != "")).sum())
    if bad:
        non_numeric[name] = non_numeric.get(name, 0) + bad
    return numbers.where(numbers != -1).astype(float)


def diagnosis_group(text: object) -> str:
    words = str(text).lower() if isinstance(text, str) else ""
    for group, keys in DIAGNOSIS_GROUPS:
        if any(key in words for key in keys):
            return group
    return "other"


def build_stays(folder: str | Path) -> tuple[pd.DataFrame, dict]:
    """One row per first ICU stay with a known outcome: ids, label, APACHE IVa, region and features; counts."""
    folder = Path(folder)
    patient = read_table(folder, "patient", PATIENT_COLUMNS)
    result = read_table(folder, "apachePatientResult", (KEY, "apacheversion", "predictedhospitalmortality"))
    aps = read_table(folder, "apacheApsVar", (KEY, *APS_FEATURES))
    pred = read_table(folder, "apachePredVar", (KEY, *PRED_FEATURES))
    hospital = read_table(folder, "hospital", ("hospitalid", "region"))
    counts: dict = {"icu_stays": len(patient)}
    non_numeric: dict[str, int] = {}

    patient = patient.drop_duplicates(KEY)
    order = patient.sort_values(["uniquepid", "patienthealthsystemstayid", "unitvisitnumber", KEY])
    first = order.drop_duplicates("uniquepid", keep="first")
    counts["later_stays_of_a_patient"] = len(patient) - len(first)
    status = first["hospitaldischargestatus"].astype(str).str.strip().str.lower()
    known = status.isin(["expired", "alive"])
    counts["without_outcome"] = int((~known).sum())
    stays = first[known].copy()
    stays[LABEL] = (status[known] == "expired").astype(int)

    features = pd.DataFrame({KEY: stays[KEY].to_numpy()})
    age = stays["age"].astype(str).str.strip().replace({"> 89": "90"})
    features["age"] = _numeric(age.where(age != "nan"), "age", non_numeric).to_numpy()
    sex = stays["gender"].astype(str).str.strip().str.lower()
    features["female"] = np.where(sex == "female", 1.0, np.where(sex == "male", 0.0, np.nan))
    for column in ("admissionheight", "admissionweight"):
        features[column] = _numeric(stays[column], column, non_numeric).to_numpy()
    for table, columns, what in ((aps, APS_FEATURES, "apacheApsVar"), (pred, PRED_FEATURES, "apachePredVar")):
        table = table.drop_duplicates(KEY)
        counts[f"without_{what}"] = int((~stays[KEY].isin(table[KEY])).sum())
        numbers = pd.DataFrame({KEY: table[KEY]})
        for column in columns:
            numbers[column] = _numeric(table[column], f"{what}.{column}", non_numeric)
        features = features.merge(numbers, on=KEY, how="left")
    for prefix, column, values in (
        ("unittype", "unittype", UNIT_TYPES),
        ("admitsource", "unitadmitsource", ADMIT_SOURCES),
    ):
        text = stays[column].astype(str).str.strip().to_numpy()
        for value in values:
            features[f"{prefix}={value}"] = (text == value).astype(float)
        features[f"{prefix}=other"] = (~np.isin(text, values)).astype(float)
    groups = stays["apacheadmissiondx"].map(diagnosis_group).to_numpy()
    for group, _ in (*DIAGNOSIS_GROUPS, ("other", ())):
        features[f"diagnosis={group}"] = (groups == group).astype(float)

    iva = result[result["apacheversion"].astype(str).str.strip() == "IVa"].drop_duplicates(KEY)
    prediction = _numeric(iva["predictedhospitalmortality"], "apachePatientResult.predictedhospitalmortality", {})
    apache = pd.DataFrame({KEY: iva[KEY], APACHE: prediction})
    regions = hospital.drop_duplicates("hospitalid")
    out = stays[[KEY, "hospitalid", LABEL]].merge(regions, on="hospitalid", how="left")
    out = out.merge(apache, on=KEY, how="left").merge(features, on=KEY, how="left")
    counts["stays"] = len(out)
    counts["deaths"] = int(out[LABEL].sum())
    counts["with_apache_iva"] = int(out[APACHE].notna().sum())
    counts["non_numeric_values"] = non_numeric
    return out, counts


def assign_sites(stays: pd.DataFrame, config: EicuConfig, counts: dict) -> pd.Series:
    """The site of each stay (NaN: left out, counted in ``counts``)."""
    if config.sites == "region":
        region = stays["region"].astype(str).str.strip()
        known = region.isin(REGIONS)
        counts["left_out_without_region"] = int((~known).sum())
        return region.str.lower().where(known)
    per_hospital = stays.groupby("hospitalid")[KEY].transform("count")
    big = per_hospital >= config.min_stays
    counts["left_out_small_hospitals"] = int((~big).sum())
    counts["hospitals_left_out"] = int(stays.loc[~big, "hospitalid"].nunique())
    return ("hospital-" + stays["hospitalid"].astype(int).astype(str)).where(big)


def stratified_split(labels: np.ndarray, config: EicuConfig, rng: np.random.Generator) -> np.ndarray:
    """``train``/``validation``/``test`` per stay, each class split in the same proportions."""
    split = np.full(len(labels), "train", dtype=object)
    for value in (0, 1):
        rows = rng.permutation(np.flatnonzero(labels == value))
        n_test = int(round(len(rows) * config.test_fraction))
        n_validation = int(round((len(rows) - n_test) * config.validation_fraction))
        split[rows[:n_test]] = "test"
        split[rows[n_test : n_test + n_validation]] = "validation"
    return split


def prepare_eicu(
    folder: str | Path, out_dir: str | Path, config: EicuConfig, overwrite: bool = False, say: Callable = print
) -> dict:
    """Write ``<site>/stays.csv`` and ``<site>/manifest.json`` per site and ``summary.json``; returns the summary."""
    check_output(out_dir, PREPARATIONS, overwrite, "--out", reads=[folder])
    stays, counts = build_stays(folder)
    site = assign_sites(stays, config, counts)
    stays = stays[site.notna()].assign(site=site[site.notna()])
    names = sorted(stays["site"].unique())
    if not names:
        raise InputError(f"no site has stays: {counts}")
    check_site_names(names)
    inputs = {name: sha256_file(table_path(Path(folder), name)) for name in TABLES}
    columns = [KEY, "hospitalid", SPLIT, LABEL, APACHE, *feature_names()]
    summary = {"source": str(Path(folder).resolve()), "config": asdict(config), "counts": counts, "sites": {}}
    with staged_output(out_dir, PREPARE_EICU) as out:
        for index, name in enumerate(names):
            part = stays[stays["site"] == name].sort_values(KEY).reset_index(drop=True)
            rng = np.random.default_rng([config.seed, index])
            part[SPLIT] = stratified_split(part[LABEL].to_numpy(), config, rng)
            (out / name).mkdir()
            part[columns].to_csv(out / name / STAYS_FILE, index=False)
            facts = {
                "site": name,
                "stays": len(part),
                "deaths": int(part[LABEL].sum()),
                "splits": {s: int((part[SPLIT] == s).sum()) for s in ("train", "validation", "test")},
                "test_with_apache_iva": int((part[APACHE].notna() & (part[SPLIT] == "test")).sum()),
                "hospitals": int(part["hospitalid"].nunique()),
            }
            manifest = {
                **facts,
                "kind": "eicu",
                "features": feature_names(),
                "config": asdict(config),
                "inputs": inputs,
                "files": {STAYS_FILE: sha256_file(out / name / STAYS_FILE)},
            }
            (out / name / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            summary["sites"][name] = facts
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"{len(names)} sites, {sum(s['stays'] for s in summary['sites'].values())} stays "
        f"({counts['later_stays_of_a_patient']} later stays of a patient, {counts['without_outcome']} without outcome "
        f"left out); wrote {out_dir}"
    )
    return summary
