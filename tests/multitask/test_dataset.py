import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pharmafl.core.errors import InputError
from pharmafl.multitask.dataset import SiteData, load_site
from pharmafl.multitask.prepare import SITE_FILES, PrepareConfig, prepare_chem

MOLECULES = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
    "CC(=O)Nc1ccc(O)cc1",
    "c1ccc2ccccc2c1",
    "c1ccncc1",
    "O=C(O)c1ccccc1",
    "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
    "CCO",
    "CCN",
    "c1ccc2[nH]ccc2c1",
    "C1CCNCC1",
    "O=C1CCCN1",
    "c1ccoc1",
    "c1ccsc1",
    "CC1=CC(=O)CCC1",
    "OC1CCCCC1",
]


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    rows = [(s, f"{4 + (i % 5)}.0", f"{8 - (i % 4)}.5") for i, s in enumerate(MOLECULES)]
    path = out / "table.csv"
    pd.DataFrame(rows, columns=["smiles", "A", "B"]).to_csv(path, index=False)
    config = PrepareConfig(
        sites=["s1"],
        n_bits=1024,
        min_train_actives=1,
        min_train_inactives=1,
        min_eval_actives=1,
        min_eval_inactives=1,
    )
    prepare_chem(str(path), str(out / "prepared"), config, progress=None)
    return out / "prepared" / "s1"


def test_round_trip(site_dir):
    data = load_site(str(site_dir), verify=True)
    assert isinstance(data, SiteData)
    assert data.X.dtype == np.float32 and data.Y.dtype == np.int8
    assert data.n_features == 1024 == data.manifest["n_bits"]
    assert data.n_tasks == len(data.tasks) == data.manifest["n_tasks"] > 0
    assert data.X.shape[0] == data.Y.shape[0] == len(data.folds) == data.manifest["n_compounds"]
    assert np.array_equal(data.X.toarray(), sp.load_npz(site_dir / "X.npz").toarray())
    assert data.values.shape == data.Y.shape
    assert data.path == str(site_dir)
    assert data.eval_task_mask.dtype == bool
    assert data.eval_task_mask.sum() == data.manifest["n_tasks_evaluate"]


def test_rows_in_folds(site_dir):
    data = load_site(str(site_dir))
    everything = data.rows_in_folds(range(5))
    assert np.array_equal(everything, np.arange(len(data.folds)))
    test = data.rows_in_folds([0])
    assert np.all(data.folds[test] == 0)
    assert len(test) + len(data.rows_in_folds(f for f in (1, 2, 3, 4))) == len(data.folds)


def test_missing_folder_is_a_user_error(tmp_path):
    missing = tmp_path / "site-9"
    with pytest.raises(InputError) as error:
        load_site(str(missing))
    assert str(error.value) == (
        f"No prepared data for site at '{missing}' (missing X.npz); run `pharmafl prepare chem` first."
    )


def test_shape_mismatch_is_a_user_error(site_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in site_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    np.save(broken / "folds.npy", np.zeros(1, dtype=np.int8))
    with pytest.raises(InputError, match="inconsistent"):
        load_site(str(broken))


def test_verify_detects_a_changed_file(site_dir, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    for file in site_dir.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    tasks = pd.read_csv(changed / "tasks.csv")
    tasks["evaluate"] = ~tasks["evaluate"]
    tasks.to_csv(changed / "tasks.csv", index=False)
    load_site(str(changed))  # still consistent in shape
    with pytest.raises(InputError, match="tasks.csv' does not match its manifest checksum"):
        load_site(str(changed), verify=True)


def test_manifest_keeps_no_secret_and_lists_checksums(site_dir):
    manifest = json.loads((site_dir / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(SITE_FILES)  # every file of the preparation
    assert "fold_secret" not in json.dumps(manifest)
    assert manifest["format_version"] == 1 and manifest["site"] == "s1"


def test_chembl_small_fixture(chembl_small):
    for site in ("site-1", "site-2"):
        data = load_site(str(chembl_small / site), verify=True)
        assert data.n_features == 32000
        assert data.eval_task_mask.any()
        assert len(data.rows_in_folds([0])) > 0


def test_damaged_or_inconsistent_regression_data_is_a_user_error(site_dir, tmp_path):
    for name, damage in [
        ("garbage", lambda path: path.write_bytes(b"not an npz")),
        ("outside", lambda path: np.savez(path, row=[10**6], task=[0], value=[1.0], censor=[1])),
        ("code", lambda path: np.savez(path, row=[0], task=[0], value=[1.0], censor=[7])),
    ]:
        copy = tmp_path / name
        shutil.copytree(site_dir, copy)
        damage(copy / "regression.npz")
        with pytest.raises(InputError, match="regression"):
            load_site(str(copy))


@pytest.fixture(scope="module")
def audit_site_dir(site_dir):
    """``site_dir``'s table prepared again with an audit hold-out."""
    config = PrepareConfig(
        sites=["s1"],
        n_bits=1024,
        min_train_actives=1,
        min_train_inactives=1,
        min_eval_actives=1,
        min_eval_inactives=1,
        audit_fraction=0.4,
    )
    out = site_dir.parent.parent / "prepared_audit"
    prepare_chem(str(site_dir.parent.parent / "table.csv"), str(out), config, progress=None)
    return out / "s1"


def test_audit_rows_round_trip(site_dir, audit_site_dir):
    none = load_site(str(site_dir), verify=True).audit_rows
    assert none.dtype == np.int64 and none.shape == (0,)
    data = load_site(str(audit_site_dir), verify=True)
    assert data.audit_rows.dtype == np.int64 and 0 < len(data.audit_rows) < data.X.shape[0]
    assert np.array_equal(data.audit_rows, np.load(audit_site_dir / "audit.npy"))
    assert data.manifest["n_audit"] == len(data.audit_rows) and data.manifest["audit_fraction"] == 0.4


def test_a_folder_prepared_before_the_audit_hold_out_loads_without_one(audit_site_dir, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(audit_site_dir, older)
    (older / "audit.npy").unlink()
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["sha256"]["audit.npy"], manifest["n_audit"], manifest["audit_fraction"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    data = load_site(str(older), verify=True)
    assert data.audit_rows.dtype == np.int64 and data.audit_rows.shape == (0,)


@pytest.mark.parametrize(
    "name, rows, problem",
    [
        ("outside", np.array([10**6]), "audit.npy points outside"),
        ("negative", np.array([-1]), "audit.npy points outside"),
        ("twice", np.array([0, 0]), "audit.npy lists a row twice"),
        ("floats", np.array([0.5]), "audit.npy is not a list of row indices"),
        ("miscounted", np.array([], dtype=np.int64), "audit.npy lists 0 rows but the manifest says"),
        ("deleted", None, "audit.npy is missing but the manifest lists it"),
    ],
)
def test_an_inconsistent_audit_hold_out_is_refused(audit_site_dir, tmp_path, name, rows, problem):
    copy = tmp_path / name
    shutil.copytree(audit_site_dir, copy)
    if rows is None:
        (copy / "audit.npy").unlink()  # training would silently use the held-out compounds
    else:
        np.save(copy / "audit.npy", rows)
    with pytest.raises(InputError, match=f"inconsistent \\({problem}.*\\); prepare it again"):
        load_site(str(copy))


def test_a_damaged_audit_file_is_a_user_error(audit_site_dir, tmp_path):
    copy = tmp_path / "garbage"
    shutil.copytree(audit_site_dir, copy)
    (copy / "audit.npy").write_bytes(b"not an npy file")
    with pytest.raises(InputError, match="audit hold-out at .* is damaged; prepare it again"):
        load_site(str(copy))
