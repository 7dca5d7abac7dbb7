import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pharmafl.core.errors import InputError
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.prepare import SITE_FILES as PREPARED_FILES
from pharmafl.multitask.prepare import PrepareConfig, audit_draw, prepare_chem
from pharmafl.multitask.standardize import ecfp_bits, fold_for_scaffold, murcko_scaffold, standardize_smiles

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
IBUPROFEN = "CC(C)Cc1ccc(C(C)C(=O)O)cc1"
SITE_FILES = {*PREPARED_FILES, "manifest.json"}
NO_QUORUM = dict(min_train_actives=0, min_train_inactives=0, min_eval_actives=0, min_eval_inactives=0)


# --- standardisation, fingerprints, folds -------------------------------------------------------------


def test_standardize_strips_salt_neutralises_and_canonicalises():
    assert standardize_smiles("CC(=O)Oc1ccccc1C(=O)[O-].[Na+]") == ASPIRIN
    assert standardize_smiles("C[NH3+].[Cl-]") == "CN"
    assert standardize_smiles("OC(=O)c1ccccc1OC(C)=O") == ASPIRIN
    assert standardize_smiles("OCC") == standardize_smiles("C(O)C") == "CCO"


@pytest.mark.parametrize("smiles", ["", "   ", "not_a_smiles", "C1CC", "c1cccc1"])
def test_standardize_rejects_invalid(smiles):
    assert standardize_smiles(smiles) is None


def test_standardize_rejects_too_many_heavy_atoms():
    assert standardize_smiles("C" * 101) is None
    assert standardize_smiles("C" * 101, max_heavy_atoms=101) == "C" * 101


def test_ecfp_bits_deterministic_sorted_and_in_range():
    bits = ecfp_bits(IBUPROFEN, radius=3, n_bits=1024)
    assert bits.dtype == np.int32
    assert len(bits) > 5
    assert np.all(np.diff(bits) > 0)
    assert bits.min() >= 0 and bits.max() < 1024
    assert np.array_equal(bits, ecfp_bits(IBUPROFEN, radius=3, n_bits=1024))
    assert np.array_equal(ecfp_bits("CC(C)Cc1ccc(cc1)C(C)C(=O)O"), ecfp_bits(IBUPROFEN))
    assert not np.array_equal(ecfp_bits(ASPIRIN), ecfp_bits(IBUPROFEN))
    assert len(ecfp_bits(IBUPROFEN, radius=1)) < len(ecfp_bits(IBUPROFEN, radius=3))
    with pytest.raises(InputError):
        ecfp_bits("not_a_smiles")


def test_murcko_scaffold():
    assert murcko_scaffold(IBUPROFEN) == "c1ccccc1"
    assert murcko_scaffold("CCO") == ""
    assert murcko_scaffold("C[C@H]1CCCN1Cc1ccccc1") == murcko_scaffold("C[C@@H]1CCCN1Cc1ccccc1")


def test_fold_is_deterministic_keyed_and_pinned():
    assert fold_for_scaffold("c1ccccc1", "s3cret") == fold_for_scaffold("c1ccccc1", "s3cret")
    # pinned: changing the scheme would silently break agreement between partners
    assert fold_for_scaffold("c1ccccc1", "pharmafl-demo-secret", 5) == 2
    assert fold_for_scaffold("c1ccc2ccccc2c1", "pharmafl-demo-secret", 5) == 4
    scaffolds = [f"C1CC{'C' * i}1" for i in range(200)]
    first = [fold_for_scaffold(s, "secret-a") for s in scaffolds]
    second = [fold_for_scaffold(s, "secret-b") for s in scaffolds]
    assert sum(a != b for a, b in zip(first, second, strict=True)) > 100  # about 4/5 differ


def test_folds_roughly_uniform():
    counts = Counter(fold_for_scaffold(f"scaffold-{i}", "secret", 5) for i in range(5000))
    assert set(counts) == {0, 1, 2, 3, 4}
    assert all(850 < n < 1150 for n in counts.values())


# --- a small wide table with every kind of problem --------------------------------------------------

WIDE_ROWS = [
    # id, smiles, BIN, P1, P2, note
    ("m0", ASPIRIN, "0", "6.0", "5.0", "parent"),
    ("m1", "CC(=O)Oc1ccccc1C(=O)[O-].[Na+]", "1", "7.0", "", "sodium salt"),
    ("m2", "OC(=O)c1ccccc1OC(C)=O", "0", "9.0", "", "written another way"),
    ("m3", "not_a_smiles", "1", "", "", "invalid"),
    ("m4", "", "", "6.0", "", "no structure"),
    ("m5", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "", "", "", "no labels"),
    ("m6", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "1", "abc", "4.0", "one bad cell"),
    ("m7", "C" * 101, "", "5.0", "", "too large"),
    ("m8", "CCO", "0", "8.0", "", "acyclic"),
    ("m9", "C[NH3+].[Cl-]", "", "", "7.0", "charged salt"),
    ("m10", "c1ccccc1", "", "", "n.d.", "only a bad cell"),
]


@pytest.fixture
def wide_csv(tmp_path):
    path = tmp_path / "wide.csv"
    frame = pd.DataFrame(WIDE_ROWS, columns=["id", "smiles", "BIN", "P1", "P2", "note"])
    frame.to_csv(path, index=False)
    return path


def _labels(site_dir) -> dict:
    """{(smiles, task_id): label} of a prepared site."""
    data = load_site(str(site_dir))
    smiles = pd.read_csv(site_dir / "compounds.csv")["smiles"]
    coo = data.Y.tocoo()
    cells = zip(coo.row, coo.col, coo.data, strict=True)
    return {(smiles[r], data.tasks["task_id"][c]): int(v) for r, c, v in cells}


def _values(site_dir) -> dict:
    data = load_site(str(site_dir))
    smiles = pd.read_csv(site_dir / "compounds.csv")["smiles"]
    coo = data.values.tocoo()
    cells = zip(coo.row, coo.col, coo.data, strict=True)
    return {(smiles[r], data.tasks["task_id"][c]): float(v) for r, c, v in cells}


def test_wide_counts_and_outputs(wide_csv, tmp_path):
    messages = []
    config = PrepareConfig(sites=["solo"], n_bits=2048, **NO_QUORUM)
    summary = prepare_chem(str(wide_csv), str(tmp_path / "out"), config, progress=messages.append)

    assert summary["rows_read"] == 11
    assert summary["skipped"] == {
        "invalid_smiles": 1,
        "empty_smiles": 1,
        "too_large": 1,
        "unreadable_standard_form": 0,
        "fingerprint_failed": 0,
        "scaffold_failed": 0,
        "non_numeric_values": 2,
        "empty_rows": 2,
        "invalid_qualifiers": 0,
    }
    assert summary["duplicates_merged"] == 2
    assert summary["ignored_columns"] == ["id", "note"]
    assert sum("'id'" in m for m in messages) == 1 and sum("'note'" in m for m in messages) == 1
    assert summary["compounds"] == 4
    assert summary["assays"] == 3 and summary["binary_assays"] == 1
    assert summary["tasks_total"] == 7 and summary["tasks_train_quorum"] == 7
    assert summary["sites"]["solo"]["labels"] == 18
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    site = tmp_path / "out" / "solo"
    assert {p.name for p in site.iterdir()} == SITE_FILES
    X, Y, values = (sp.load_npz(site / f) for f in ("X.npz", "Y.npz", "values.npz"))
    folds = np.load(site / "folds.npy")
    assert X.format == Y.format == values.format == "csr"
    assert X.dtype == values.dtype == np.float32
    assert Y.dtype == folds.dtype == np.int8
    assert X.shape == (4, 2048) and Y.shape == values.shape == (4, 7) and folds.shape == (4,)
    assert set(np.unique(X.data)) == {1.0}
    audit = np.load(site / "audit.npy")  # no hold-out by default: the outputs above are those made before it
    assert audit.dtype == np.int64 and audit.shape == (0,)
    manifest = json.loads((site / "manifest.json").read_text())
    assert manifest["audit_fraction"] == 0.0 and manifest["n_audit"] == 0
    assert summary["sites"]["solo"]["audit_compounds"] == 0 == summary["audit_compounds_in_sites"]
    compounds = list(pd.read_csv(site / "compounds.csv")["smiles"])
    assert compounds == [ASPIRIN, IBUPROFEN, "CCO", "CN"]
    for row, smiles in enumerate(compounds):
        assert np.array_equal(X[row].indices, ecfp_bits(smiles, 3, 2048))
        assert folds[row] == fold_for_scaffold(murcko_scaffold(smiles), config.fold_secret, 5)

    tasks = pd.read_csv(site / "tasks.csv")
    assert list(tasks["task_id"]) == ["BIN", "P1@5.5", "P1@6.5", "P1@7.5", "P2@5.5", "P2@6.5", "P2@7.5"]
    assert tasks["threshold"].isna().tolist() == [True] + [False] * 6
    assert list(tasks.columns) == [
        "task_id",
        "assay",
        "threshold",
        "actives",
        "inactives",
        "test_actives",
        "test_inactives",
        "evaluate",
    ]


def test_wide_duplicates_merged_with_median_and_max(wide_csv, tmp_path):
    prepare_chem(str(wide_csv), str(tmp_path / "out"), PrepareConfig(sites=["solo"], **NO_QUORUM), progress=None)
    labels, values = _labels(tmp_path / "out" / "solo"), _values(tmp_path / "out" / "solo")
    # aspirin: BIN max(0, 1, 0) = 1; P1 median(6, 7, 9) = 7 (the mean would be 7.33); P2 = 5
    assert labels[ASPIRIN, "BIN"] == 1
    assert [labels[ASPIRIN, f"P1@{t}"] for t in ("5.5", "6.5", "7.5")] == [1, 1, -1]
    assert values[ASPIRIN, "P1@6.5"] == 7.0
    assert [labels[ASPIRIN, f"P2@{t}"] for t in ("5.5", "6.5", "7.5")] == [-1, -1, -1]
    # ibuprofen: its non-numeric P1 cell is missing, not a label
    assert labels[IBUPROFEN, "BIN"] == 1 and (IBUPROFEN, "P1@5.5") not in labels
    assert labels["CCO", "BIN"] == -1 and labels["CCO", "P1@7.5"] == 1
    assert [labels["CN", f"P2@{t}"] for t in ("5.5", "6.5", "7.5")] == [1, 1, -1]
    assert not any(task == "BIN" for _, task in values)  # binary tasks carry no continuous value
    assert len(labels) == 18


def test_fold_secret_never_written(wide_csv, tmp_path):
    secret = "a-consortium-secret-7f3a"
    prepare_chem(
        str(wide_csv),
        str(tmp_path / "out"),
        PrepareConfig(sites=["solo"], fold_secret=secret, **NO_QUORUM),
        progress=None,
    )
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_site_without_tasks_is_a_user_error(wide_csv, tmp_path):
    with pytest.raises(InputError, match="fewer partners"):
        prepare_chem(
            str(wide_csv),
            str(tmp_path / "out"),
            PrepareConfig(sites=["a", "b", "c", "d"], **NO_QUORUM),
            progress=None,
        )


def test_quorum_drops_small_tasks(wide_csv, tmp_path):
    config = PrepareConfig(
        sites=["solo"], min_train_actives=1, min_train_inactives=1, min_eval_actives=0, min_eval_inactives=0
    )
    summary = prepare_chem(str(wide_csv), str(tmp_path / "out"), config, progress=None)
    tasks = pd.read_csv(tmp_path / "out" / "solo" / "tasks.csv")
    # P2@7.5 has only inactives and P1@5.5, P1@6.5 only actives
    assert set(tasks["task_id"]) == {"BIN", "P1@7.5", "P2@5.5", "P2@6.5"}
    assert summary["tasks_total"] == 7 and summary["tasks_train_quorum"] == 4
    assert (tasks["actives"] >= 1).all() and (tasks["inactives"] >= 1).all()


# --- long format ------------------------------------------------------------------------------------

NAPHTHALENE, PYRIDINE, PARACETAMOL, BENZOIC_ACID = (
    "c1ccc2ccccc2c1",
    "c1ccncc1",
    "CC(=O)Nc1ccc(O)cc1",
    "O=C(O)c1ccccc1",
)
LONG_ROWS = [
    (NAPHTHALENE, "T1", "7.0", ">"),
    (PYRIDINE, "T1", "6.0", "<"),
    (PARACETAMOL, "T1", "7.0", "="),
    ("Oc1ccc(NC(C)=O)cc1", "T1", "8.0", "="),  # paracetamol again: median 7.5
    (BENZOIC_ACID, "T1", "5.0", "="),
    (BENZOIC_ACID, "T1", "9.0", ">"),  # a measurement beats a bound
    (NAPHTHALENE, "T2", "1", ""),
    (PYRIDINE, "T2", "0", "="),
    ("", "T2", "1", "="),  # empty SMILES
    (PARACETAMOL, "", "5", "="),  # no task
    (BENZOIC_ACID, "T1", "", "="),  # no value
    (BENZOIC_ACID, "T2", "abc", "="),  # non-numeric
    (NAPHTHALENE, "T1", "5", "?"),  # unknown qualifier
    (PYRIDINE, "T3", "6.5", ">"),
    (NAPHTHALENE, "T3", "6.0", "<"),
]


def test_long_format_with_qualifiers(tmp_path):
    path = tmp_path / "long.csv"
    pd.DataFrame(LONG_ROWS, columns=["smiles", "task", "value", "qualifier"]).to_csv(path, index=False)
    summary = prepare_chem(str(path), str(tmp_path / "out"), PrepareConfig(sites=["solo"], **NO_QUORUM), progress=None)
    assert summary["format"] == "long"
    assert summary["rows_read"] == 15
    assert summary["skipped"] == {
        "invalid_smiles": 0,
        "empty_smiles": 1,
        "too_large": 0,
        "unreadable_standard_form": 0,
        "fingerprint_failed": 0,
        "scaffold_failed": 0,
        "non_numeric_values": 1,
        "empty_rows": 2,
        "invalid_qualifiers": 1,
    }
    assert summary["duplicates_merged"] == 2
    assert summary["compounds"] == 4 and summary["binary_assays"] == 1
    labels, values = _labels(tmp_path / "out" / "solo"), _values(tmp_path / "out" / "solo")
    expected = {
        (NAPHTHALENE, "T1@5.5"): 1,
        (NAPHTHALENE, "T1@6.5"): 1,
        (PYRIDINE, "T1@6.5"): -1,
        (PYRIDINE, "T1@7.5"): -1,
        (PARACETAMOL, "T1@5.5"): 1,
        (PARACETAMOL, "T1@6.5"): 1,
        (PARACETAMOL, "T1@7.5"): 1,
        (BENZOIC_ACID, "T1@5.5"): -1,
        (BENZOIC_ACID, "T1@6.5"): -1,
        (BENZOIC_ACID, "T1@7.5"): -1,
        (NAPHTHALENE, "T2"): 1,
        (PYRIDINE, "T2"): -1,
        (PYRIDINE, "T3@5.5"): 1,
        (PYRIDINE, "T3@6.5"): 1,
        (NAPHTHALENE, "T3@6.5"): -1,
        (NAPHTHALENE, "T3@7.5"): -1,
    }
    assert labels == expected
    # only exact measurements carry a value for the regression head
    assert values == {(PARACETAMOL, f"T1@{t}"): 7.5 for t in ("5.5", "6.5", "7.5")} | {
        (BENZOIC_ACID, f"T1@{t}"): 5.0 for t in ("5.5", "6.5", "7.5")
    }


def test_regression_tasks_keep_values_and_censoring_per_continuous_assay(tmp_path):
    from pharmafl.multitask.dataset import CENSOR_ABOVE, CENSOR_BELOW, CENSOR_EXACT, load_site

    path = tmp_path / "long.csv"
    pd.DataFrame(LONG_ROWS, columns=["smiles", "task", "value", "qualifier"]).to_csv(path, index=False)
    config = PrepareConfig(sites=["solo"], **NO_QUORUM, min_regression_values=2, min_eval_regression_values=0)
    prepare_chem(str(path), str(tmp_path / "out"), config, progress=None)
    site = load_site(str(tmp_path / "out" / "solo"), verify=True)  # the regression files are in the checksums
    regression = site.regression
    assert list(regression.tasks["task_id"]) == ["T1", "T3"]  # T2 is binary: classification only
    smiles = pd.read_csv(tmp_path / "out" / "solo" / "compounds.csv")["smiles"].tolist()
    stored = {
        (smiles[r], str(regression.tasks["task_id"][c])): (float(regression.values[r, c]), int(regression.censor[r, c]))
        for r, c in zip(*regression.censor.nonzero(), strict=True)
    }
    assert stored == {
        (NAPHTHALENE, "T1"): (7.0, CENSOR_ABOVE),
        (PYRIDINE, "T1"): (6.0, CENSOR_BELOW),
        (PARACETAMOL, "T1"): (7.5, CENSOR_EXACT),  # the median of two measurements
        (BENZOIC_ACID, "T1"): (5.0, CENSOR_EXACT),  # a measurement beats a bound
        (PYRIDINE, "T3"): (6.5, CENSOR_ABOVE),
        (NAPHTHALENE, "T3"): (6.0, CENSOR_BELOW),
    }
    assert regression.tasks.set_index("task_id").loc["T1", ["values", "measured"]].tolist() == [4, 2]
    quorum = PrepareConfig(sites=["solo"], **NO_QUORUM, min_regression_values=3)
    prepare_chem(str(path), str(tmp_path / "q"), quorum, progress=None)
    assert list(load_site(str(tmp_path / "q" / "solo")).regression.tasks["task_id"]) == ["T1"]  # T3 has 2 values


# --- user errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"Input file '.*nope\.csv' does not exist\."):
        prepare_chem(str(tmp_path / "nope.csv"), str(tmp_path / "out"), PrepareConfig(sites=["a"]))


def test_missing_smiles_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("structure,CHEMBL1\nCCO,5.0\n")
    with pytest.raises(InputError, match="SMILES column 'smiles' not found.*'structure', 'CHEMBL1'"):
        prepare_chem(str(path), str(tmp_path / "out"), PrepareConfig(sites=["a"]), progress=None)


def test_no_usable_label_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("smiles,name\nCCO,ethanol\nCCN,ethylamine\n")
    with pytest.raises(InputError, match="No usable label column"):
        prepare_chem(str(path), str(tmp_path / "out"), PrepareConfig(sites=["a"]), progress=None)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sites": []}, "at least one site"),
        ({"sites": ["a", "a"]}, "distinct"),
        ({"sites": ["../escape"]}, "may only use"),
        ({"thresholds": ()}, "at least one activity threshold"),
        ({"test_fold": 5}, "test fold"),
        ({"fmt": "tall"}, "Input format"),
        ({"audit_fraction": 0.5}, r"^--audit-fraction must be at least 0 and below 0\.5, got 0\.5\.$"),
        ({"audit_fraction": -0.1}, r"^--audit-fraction must be at least 0 and below 0\.5, got -0\.1\.$"),
        ({"audit_fraction": float("nan")}, "audit-fraction must be at least 0 and below 0.5, got nan"),
    ],
)
def test_invalid_config(wide_csv, tmp_path, changes, message):
    config = PrepareConfig(**{"sites": ["a"], **changes})
    with pytest.raises(InputError, match=message):
        prepare_chem(str(wide_csv), str(tmp_path / "out"), config, progress=None)


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # keep the download cache inside the test
    with pytest.raises(InputError, match="download .* failed.*local file"):
        prepare_chem("http://127.0.0.1:9/data.csv.gz", str(tmp_path / "out"), PrepareConfig(sites=["a"]), progress=None)


# --- the audit hold-out -----------------------------------------------------------------------------

# 400 distinct small molecules, so the share held out can be measured; six 0/1 assays with gaps
AUDIT_MOLECULES = [
    f"{'C' * i}{ring}{'C' * j}{end}"
    for i in range(1, 6)
    for ring in ("c1ccccc1", "C1CCNCC1", "c1ccncc1", "C1CCOC1")
    for j in range(5)
    for end in ("O", "N", "C(=O)O", "Cl")
]


@pytest.fixture(scope="module")
def audit_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 2, size=(len(AUDIT_MOLECULES), 6)).astype(str).astype(object)
    missing = rng.random(cells.shape) < 0.5
    missing[np.arange(len(cells)), np.arange(len(cells)) % 6] = False  # every compound has a label
    cells[missing] = ""
    path = tmp_path_factory.mktemp("audit") / "audit.csv"
    frame = pd.DataFrame(cells, columns=[f"A{k}" for k in range(6)])
    frame.insert(0, "smiles", AUDIT_MOLECULES)
    frame.to_csv(path, index=False)
    return path


def _held_out(out, sites) -> dict[str, tuple[set[str], set[str]]]:
    """{site: (its compounds, those in its audit hold-out)} by SMILES, from verified site folders."""
    held = {}
    for site in sites:
        data = load_site(str(out / site), verify=True)  # audit.npy is in the checksums
        smiles = pd.read_csv(out / site / "compounds.csv")["smiles"]
        assert data.audit_rows.dtype == np.int64 and np.all(np.diff(data.audit_rows) > 0)
        assert data.manifest["n_audit"] == len(data.audit_rows)
        held[site] = (set(smiles), set(smiles[data.audit_rows]))
    return held


def test_audit_holdout_is_the_requested_share_drawn_by_keyed_smiles(audit_csv, tmp_path):
    config = PrepareConfig(sites=["solo"], audit_fraction=0.2, **NO_QUORUM)
    summary = prepare_chem(str(audit_csv), str(tmp_path / "out"), config, progress=None)
    assert summary["compounds"] == len(AUDIT_MOLECULES) == 400
    data = load_site(str(tmp_path / "out" / "solo"), verify=True)
    smiles = list(pd.read_csv(tmp_path / "out" / "solo" / "compounds.csv")["smiles"])
    assert len(data.audit_rows) / len(smiles) == pytest.approx(0.2, abs=0.05)
    drawn = [row for row, s in enumerate(smiles) if audit_draw(s, config.fold_secret) < 0.2]
    assert data.audit_rows.tolist() == drawn
    assert data.manifest["audit_fraction"] == 0.2
    assert summary["sites"]["solo"]["audit_compounds"] == len(drawn) == summary["audit_compounds_in_sites"]
    assert summary["config"]["audit_fraction"] == 0.2
    # keyed: another secret holds out other compounds; a larger share holds out a superset
    other = {s for s in smiles if audit_draw(s, "another-secret") < 0.2}
    assert len(other ^ {smiles[row] for row in drawn}) > 50
    assert {smiles[row] for row in drawn} < {s for s in smiles if audit_draw(s, config.fold_secret) < 0.3}


def test_audit_draw_is_pinned_and_apart_from_the_folds():
    # pinned: changing the scheme would silently change which compounds the audits treat as non-members
    assert audit_draw(ASPIRIN, "pharmafl-demo-secret") == 0.4209142455855831
    draws = [audit_draw(f"C{'C' * i}O", "secret") for i in range(2000)]
    assert all(0 <= d < 1 for d in draws) and 0.45 < np.mean(draws) < 0.55


def test_audit_holdout_is_the_same_for_any_partner_count(audit_csv, tmp_path):
    held = {}
    for sites in (["solo"], ["a", "b", "c"]):
        config = PrepareConfig(sites=sites, audit_fraction=0.2, **NO_QUORUM)
        out = tmp_path / str(len(sites))
        summary = prepare_chem(str(audit_csv), str(out), config, progress=None)
        held.update(_held_out(out, sites))
        assert summary["audit_compounds_in_sites"] == len(held["solo"][1])  # the pooled hold-out, counted once
    pooled = held.pop("solo")[1]
    assert len({frozenset(members) for members, _ in held.values()}) == 3  # the partners hold different compounds
    for members, audit in held.values():
        assert audit == members & pooled  # a compound is held out everywhere or nowhere


def test_audit_holdout_keeps_every_compound_label_and_fold(audit_csv, tmp_path):
    loaded, compounds = {}, {}
    for fraction in (0.0, 0.3):
        out = tmp_path / str(fraction)
        prepare_chem(
            str(audit_csv),
            str(out),
            PrepareConfig(sites=["a", "b"], audit_fraction=fraction, **NO_QUORUM),
            progress=None,
        )
        loaded[fraction] = [load_site(str(out / site)) for site in ("a", "b")]
        compounds[fraction] = [(out / site / "compounds.csv").read_bytes() for site in ("a", "b")]
    assert compounds[0.0] == compounds[0.3]
    for without, held in zip(loaded[0.0], loaded[0.3], strict=True):
        assert len(without.audit_rows) == 0 and len(held.audit_rows) > 0
        assert (without.X != held.X).nnz == 0 and (without.Y != held.Y).nnz == 0
        assert (without.values != held.values).nnz == 0 and np.array_equal(without.folds, held.folds)
        pd.testing.assert_frame_equal(without.tasks, held.tasks)
        assert (without.regression.values != held.regression.values).nnz == 0
        assert set(np.unique(held.folds[held.audit_rows])) == set(np.unique(held.folds))  # in every fold


def test_out_of_range_audit_fraction_exits_2_with_one_sentence(wide_csv, tmp_path, capsys):
    from pharmafl.cli import main

    args = ["prepare", "chem", str(wide_csv), "--out", str(tmp_path / "out"), "--partners", "1"]
    assert main([*args, "--audit-fraction", "0.5"]) == 2
    assert capsys.readouterr().err == ("pharmafl: error: --audit-fraction must be at least 0 and below 0.5, got 0.5.\n")
    assert not (tmp_path / "out").exists()


# --- the real ChEMBL table --------------------------------------------------------------------------


def test_real_chembl_three_sites(chembl_csv, tmp_path):
    out = tmp_path / "out"
    sites = ["site-1", "site-2", "site-3"]
    summary = prepare_chem(str(chembl_csv), str(out), PrepareConfig(sites=sites, max_compounds=3000), progress=None)
    assert summary["compounds"] == 3000
    assert summary["rows_read"] == 23871
    fold_of: dict[str, set] = {}
    members: dict[str, set] = {}
    assays: dict[str, set] = {}
    for site in sites:
        data = load_site(str(out / site), verify=True)
        assert data.n_tasks > 0 and data.X.shape[0] > 0 and data.eval_task_mask.any()
        smiles = pd.read_csv(out / site / "compounds.csv")["smiles"]
        members[site] = set(smiles)
        assays[site] = set(data.tasks["assay"])
        for s, fold in zip(smiles, data.folds, strict=True):
            fold_of.setdefault(s, set()).add(int(fold))
        assert data.Y.getnnz(axis=1).min() > 0  # every row has a label
        assert (data.tasks["actives"] >= 10).all() and (data.tasks["inactives"] >= 10).all()
    assert all(len(f) == 1 for f in fold_of.values())  # same compound, same fold, everywhere
    assert members["site-1"] & members["site-2"] and members["site-2"] & members["site-3"]
    assert not (
        assays["site-1"] & assays["site-2"]
        or assays["site-2"] & assays["site-3"]
        or assays["site-1"] & assays["site-3"]
    )  # an assay belongs to one partner


def test_private_compounds_stay_with_one_partner(chembl_csv, tmp_path):
    sites = ["site-1", "site-2", "site-3"]
    config = PrepareConfig(sites=sites, max_compounds=3000, compound_overlap="private")
    summary = prepare_chem(str(chembl_csv), str(tmp_path), config, progress=None)
    members = {site: set(pd.read_csv(tmp_path / site / "compounds.csv")["smiles"]) for site in sites}
    assert all(members[site] for site in sites)
    assert not (members["site-1"] & members["site-2"] or members["site-2"] & members["site-3"])
    assert not members["site-1"] & members["site-3"]
    assert summary["compounds_in_sites"] == sum(len(m) for m in members.values())
    for site in sites:
        data = load_site(str(tmp_path / site))
        assert data.Y.getnnz(axis=1).min() > 0  # only compounds with labels of their own partner
        assert (data.tasks["actives"] >= 10).all() and (data.tasks["inactives"] >= 10).all()
    with pytest.raises(InputError, match="compound overlap"):
        prepare_chem(str(chembl_csv), str(tmp_path / "x"), PrepareConfig(sites=sites, compound_overlap="some"))


# --- the output folder ------------------------------------------------------------------------------


def test_re_preparing_with_fewer_partners_is_refused_then_replaces_exactly(wide_csv, tmp_path):
    out = tmp_path / "out"
    prepare_chem(str(wide_csv), str(out), PrepareConfig(sites=["a", "b", "c"], **NO_QUORUM), progress=None)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="--overwrite"):
        prepare_chem(str(wide_csv), str(out), PrepareConfig(sites=["a", "b"], **NO_QUORUM), progress=None)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    prepare_chem(str(wide_csv), str(out), PrepareConfig(sites=["a", "b"], **NO_QUORUM), progress=None, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b"]
    assert set(json.loads((out / "summary.json").read_text())["sites"]) == {"a", "b"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []  # no staging folder left


def test_prepare_never_writes_into_a_folder_it_did_not_make(wide_csv, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a pharmafl output"):
            prepare_chem(
                str(wide_csv), str(mine), PrepareConfig(sites=["a"], **NO_QUORUM), progress=None, overwrite=overwrite
            )
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="which this command reads"):  # --out holding the input
        prepare_chem(str(wide_csv), str(tmp_path), PrepareConfig(sites=["a"], **NO_QUORUM), progress=None)


def test_a_failed_preparation_leaves_the_old_one_whole(wide_csv, tmp_path):
    out = tmp_path / "out"
    prepare_chem(str(wide_csv), str(out), PrepareConfig(sites=["a", "b"], **NO_QUORUM), progress=None)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    strict = PrepareConfig(sites=["a", "b"], min_train_actives=10**6)  # no site passes: refused after reading
    with pytest.raises(InputError, match="no task"):
        prepare_chem(str(wide_csv), str(out), strict, progress=None, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- inputs people actually have ------------------------------------------------------------------


def test_utf16_is_read_and_latin1_gets_a_hint(wide_csv, tmp_path):
    text = wide_csv.read_text()
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text(text, encoding="utf-16")  # with its byte-order mark, as spreadsheets write it
    config = PrepareConfig(sites=["a"], **NO_QUORUM)
    expected = prepare_chem(str(wide_csv), str(tmp_path / "from_utf8"), config, progress=None)
    assert (
        prepare_chem(str(utf16), str(tmp_path / "from_utf16"), config, progress=None)["compounds"]
        == expected["compounds"]
    )
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(text.replace("note", "Säure").encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text .*save it as UTF-8") as error:
        prepare_chem(str(latin1), str(tmp_path / "from_latin1"), config, progress=None)
    assert "\n" not in str(error.value)


def test_text_labels_get_one_note_and_a_hint_not_a_note_per_column(tmp_path):
    columns = {f"target_{i}": ["active", "inactive", "active"] for i in range(316)}
    path = tmp_path / "text_labels.csv"
    pd.DataFrame({"smiles": [ASPIRIN, IBUPROFEN, "CCO"], **columns}).to_csv(path, index=False)
    messages = []
    with pytest.raises(InputError, match="text labels \\(active, inactive\\): write labels as numbers, 1 for active"):
        prepare_chem(
            str(path), str(tmp_path / "out"), PrepareConfig(sites=["a"], **NO_QUORUM), progress=messages.append
        )
    notes = [m for m in messages if m.startswith("note: ignoring")]
    assert len(notes) == 1 and "316 column(s)" in notes[0] and "and 313 more" in notes[0]
    assert not (tmp_path / "out").exists()


def test_a_molecule_that_fails_any_stage_is_counted_and_skipped_never_an_abort(tmp_path, monkeypatch):
    import pharmafl.multitask.standardize as standardize

    failing = {
        "c1cccc1": "invalid_smiles",  # unkekulizable aromatic ring as input
        "C(C)(C)(C)(C)C": "invalid_smiles",  # hypervalent carbon
        "FAIL": "invalid_smiles",  # a placeholder where a structure should be
        ".": "invalid_smiles",  # only empty fragments
        "[cH-]1cccc1": "unreadable_standard_form",  # standardises to c1cccc1, which RDKit cannot read back
        "CCCCCCCCN": "fingerprint_failed",  # made to fail below, as an RDKit error in that stage would
        "CCCCCCCCCN": "scaffold_failed",
    }
    real_bits, real_scaffold = standardize.ecfp_bits, standardize.murcko_scaffold

    def bits(mol, *args):
        if standardize.Chem.MolToSmiles(mol) == "CCCCCCCCN":
            raise RuntimeError("Pre-condition Violation")
        return real_bits(mol, *args)

    def scaffold(mol):
        if standardize.Chem.MolToSmiles(mol) == "CCCCCCCCCN":
            raise ValueError("scaffold")
        return real_scaffold(mol)

    monkeypatch.setattr(standardize, "ecfp_bits", bits)
    monkeypatch.setattr(standardize, "murcko_scaffold", scaffold)
    good = [ASPIRIN, IBUPROFEN, "CCO", "c1ccccc1O"]
    rows = [(smiles, 1 if i % 2 else 0) for i, smiles in enumerate(good + list(failing))]
    path = tmp_path / "mixed.csv"
    pd.DataFrame(rows, columns=["smiles", "BIN"]).to_csv(path, index=False)
    summary = prepare_chem(str(path), str(tmp_path / "out"), PrepareConfig(sites=["a"], **NO_QUORUM), progress=None)
    assert summary["compounds"] == len(good)
    expected = Counter(failing.values())
    assert {reason: summary["skipped"][reason] for reason in expected} == dict(expected)


# --- partners with their own compound libraries -----------------------------------------------------


def _scaffold(smiles):
    return murcko_scaffold(smiles) or f"acyclic:{smiles}"


def test_libraries_partition_gives_disjoint_scaffold_libraries_sharing_targets(chembl_csv, tmp_path):
    sites = ["pharma-a", "pharma-b", "pharma-c"]
    config = PrepareConfig(sites=sites, max_compounds=4000, partition="libraries", library_sizes=(0.5, 0.3, 0.2))
    summary = prepare_chem(str(chembl_csv), str(tmp_path / "out"), config, progress=None)
    members, scaffolds, targets = {}, {}, {}
    for site in sites:
        folder = tmp_path / "out" / site
        data = load_site(str(folder), verify=True)
        members[site] = set(pd.read_csv(folder / "compounds.csv")["smiles"])
        scaffolds[site] = {_scaffold(s) for s in members[site]}
        targets[site] = set(zip(data.tasks["assay"], data.tasks["threshold"], strict=True))
        assert all(task_id.startswith(f"{site}/") for task_id in data.tasks["task_id"])  # the partner's own ids
        assert (data.tasks["actives"] >= 10).all() and (data.tasks["inactives"] >= 10).all()  # its own quorum
        assert json.loads((folder / "manifest.json").read_text())["partition"] == "libraries"
    for a, b in (("pharma-a", "pharma-b"), ("pharma-b", "pharma-c"), ("pharma-a", "pharma-c")):
        assert not members[a] & members[b]  # a compound is in one library
        assert not scaffolds[a] & scaffolds[b]  # chemically distinct: no scaffold in two libraries
        assert len(targets[a] & targets[b]) >= 10  # the same targets measured on their own compounds
    partition = summary["partition"]
    assert partition["kind"] == "libraries" and partition["library_split"] == "scaffold"
    library = partition["library_compounds"]
    assert sum(library.values()) == summary["compounds"]
    shares = [library[site] / summary["compounds"] for site in sites]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.02)


def test_libraries_work_for_ten_partners_and_a_random_split(chembl_csv, tmp_path):
    sites = [f"site-{i}" for i in range(1, 11)]
    config = PrepareConfig(sites=sites, max_compounds=4000, partition="libraries", library_split="random")
    summary = prepare_chem(str(chembl_csv), str(tmp_path / "out"), config, progress=None)
    library = summary["partition"]["library_compounds"]
    assert set(library) == set(sites) and max(library.values()) - min(library.values()) <= 1
    assert set(summary["sites"]) == set(sites) and all(s["tasks"] > 0 for s in summary["sites"].values())
    with pytest.raises(InputError, match="--library-sizes needs one positive share per site"):
        prepare_chem(str(chembl_csv), str(tmp_path / "x"), PrepareConfig(sites=sites, library_sizes=(1.0, 2.0)))


def test_a_moleculenet_layout_file_with_failing_molecules_prepares_without_code_changes(chembl_csv, tmp_path):
    # Tox21-style layout built from ChEMBL's columns: an id column, SMILES, one 0/1 column per target (empty = not
    # measured), and molecules that fail standardisation among them
    frame = pd.read_csv(chembl_csv, nrows=3000)
    targets = [c for c in frame.columns if c != "smiles"][:60]
    binary = frame[targets].apply(lambda column: column.map(lambda v: "" if pd.isna(v) else str(int(v >= 6.5))))
    layout = pd.concat(
        [pd.Series([f"MOL{i:05d}" for i in range(len(frame))], name="mol_id"), frame["smiles"], binary], axis=1
    )
    bad = pd.DataFrame({"mol_id": ["BAD1", "BAD2", "BAD3"], "smiles": ["[cH-]1cccc1", "FAIL", "C(C)(C)(C)(C)C"]})
    for target in targets:
        bad[target] = "1"
    path = tmp_path / "moleculenet_style.csv"
    pd.concat([layout, bad]).to_csv(path, index=False)
    config = PrepareConfig(sites=["a", "b"], partition="libraries", min_train_actives=5, min_train_inactives=5)
    summary = prepare_chem(str(path), str(tmp_path / "out"), config, progress=None)
    assert summary["skipped"]["unreadable_standard_form"] == 1 and summary["skipped"]["invalid_smiles"] == 2
    assert summary["ignored_columns"] == ["mol_id"] and summary["binary_assays"] > 0
    assert all(site["tasks"] > 0 for site in summary["sites"].values())
