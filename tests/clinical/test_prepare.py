import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from pharmafl.cli import main
from pharmafl.clinical.prepare import (
    APACHE,
    KEY,
    LABEL,
    STAYS_FILE,
    EicuConfig,
    build_stays,
    feature_names,
    is_leaking,
    prepare_eicu,
)
from pharmafl.core.errors import InputError


def stays_of(out_dir):
    return pd.concat([pd.read_csv(p / STAYS_FILE).assign(site=p.name) for p in sorted(out_dir.iterdir()) if p.is_dir()])


def test_no_outcome_or_prediction_column_is_a_feature(eicu_regions):
    for column in feature_names():
        assert not is_leaking(column), column
    for forbidden in ("apachescore", "predictedhospitalmortality", "actualhospitalmortality", "diedinhospital",
                      "hospitaldischargestatus", "unitdischargestatus", "hospitaldischargeoffset"):  # fmt: skip
        assert forbidden not in feature_names() and is_leaking(forbidden)
    stays = stays_of(eicu_regions)
    features = [c for c in stays.columns if c not in (KEY, "hospitalid", "split", LABEL, APACHE, "site")]
    assert features == feature_names()


def test_one_row_per_first_stay_with_its_label_and_apache_prediction(eicu_dir, eicu_regions):
    patient = pd.read_csv(eicu_dir / "patient.csv.gz")
    stays = stays_of(eicu_regions)
    assert stays[KEY].is_unique
    by_stay = patient.set_index(KEY)
    assert (by_stay.loc[stays[KEY], "uniquepid"].value_counts() == 1).all()  # one stay per patient
    status = by_stay.loc[stays[KEY], "hospitaldischargestatus"].to_numpy()
    assert ((status == "Expired") == (stays[LABEL].to_numpy() == 1)).all() and set(status) == {"Alive", "Expired"}
    result = pd.read_csv(eicu_dir / "apachePatientResult.csv.gz")
    iva = result[result.apacheversion == "IVa"].set_index(KEY)["predictedhospitalmortality"]
    kept = stays.dropna(subset=[APACHE])
    assert np.allclose(kept[APACHE], iva.loc[kept[KEY]]) and (kept[APACHE] >= 0).all()  # -1 is "none"
    summary = json.loads((eicu_regions / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["icu_stays"] == 2520
    assert counts["stays"] == counts["icu_stays"] - counts["later_stays_of_a_patient"] - counts["without_outcome"]
    assert len(stays) == counts["stays"] - counts["left_out_without_region"]


def test_missing_values_are_nan_and_age_above_89_is_90(eicu_dir, eicu_regions):
    stays = stays_of(eicu_regions)
    aps = pd.read_csv(eicu_dir / "apacheApsVar.csv.gz").set_index(KEY)
    both = stays[stays[KEY].isin(aps.index)]
    raw = aps.loc[both[KEY], "albumin"].to_numpy()
    assert (np.isnan(both["albumin"].to_numpy()) == (raw == -1)).all() and (raw == -1).any()
    patient = pd.read_csv(eicu_dir / "patient.csv.gz").set_index(KEY)
    old = patient.loc[stays[KEY], "age"].to_numpy() == "> 89"
    assert old.any() and (stays["age"].to_numpy()[old] == 90).all()
    assert set(np.unique(stays["female"].dropna())) == {0.0, 1.0}


def test_sites_and_stratified_splits(eicu_regions):
    summary = json.loads((eicu_regions / "summary.json").read_text())
    assert sorted(summary["sites"]) == ["midwest", "northeast", "south", "west"]
    for site, facts in summary["sites"].items():
        stays = pd.read_csv(eicu_regions / site / STAYS_FILE)
        rate = stays[LABEL].mean()
        test = stays[stays.split == "test"]
        assert abs(test[LABEL].mean() - rate) < 0.03 and abs(len(test) / len(stays) - 0.25) < 0.02
        assert facts["splits"] == {s: int((stays.split == s).sum()) for s in ("train", "validation", "test")}
        manifest = json.loads((eicu_regions / site / "manifest.json").read_text())
        assert manifest["kind"] == "eicu" and manifest["stays"] == len(stays)


def test_hospital_sites_keep_hospitals_with_enough_stays(eicu_dir, tmp_path):
    # the demo holds about 10 patients per hospital: 153 of its 186 hospitals keep 10 first stays
    summary = prepare_eicu(eicu_dir, tmp_path / "h", EicuConfig(sites="hospital", min_stays=10), say=lambda _l: None)
    sites = summary["sites"].values()
    assert len(sites) >= 100 and all(f["stays"] >= 10 and f["hospitals"] == 1 for f in sites)
    kept = sum(f["stays"] for f in summary["sites"].values())
    assert kept + summary["counts"]["left_out_small_hospitals"] == summary["counts"]["stays"]


@pytest.fixture
def tables(eicu_dir, tmp_path):
    folder = tmp_path / "tables"
    shutil.copytree(eicu_dir, folder)
    return folder


def test_a_missing_table_or_column_is_one_sentence_with_exit_2(eicu_dir, tables, tmp_path, capsys):
    (tables / "apacheApsVar.csv.gz").unlink()
    assert main(["prepare", "eicu", str(tables), "--out", str(tmp_path / "out")]) == 2
    assert "the eICU table apacheApsVar is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    shutil.copy(eicu_dir / "apacheApsVar.csv.gz", tables)
    hospital = pd.read_csv(tables / "hospital.csv.gz").drop(columns=["region"])
    hospital.to_csv(tables / "hospital.csv.gz", index=False)
    with pytest.raises(InputError, match="hospital.csv.gz has no column region"):
        build_stays(tables)


def test_non_numeric_values_are_counted_and_missing(tables):
    aps = pd.read_csv(tables / "apacheApsVar.csv.gz")
    aps["heartrate"] = aps["heartrate"].astype(object)
    aps.loc[:4, "heartrate"] = "fast"
    with gzip.open(tables / "apacheApsVar.csv.gz", "wt") as f:
        aps.to_csv(f, index=False)
    stays, counts = build_stays(tables)
    assert counts["non_numeric_values"] == {"apacheApsVar.heartrate": 5}
    assert stays.loc[stays[KEY].isin(aps.loc[:4, KEY]), "heartrate"].isna().all()


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="--sites must be one of region, hospital"):
        EicuConfig(sites="state")
    with pytest.raises(InputError, match="--test-fraction must be between 0 and 1"):
        EicuConfig(test_fraction=1.5)
