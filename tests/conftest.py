from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# chem fixtures
CHEMBL_CSV = REPO_ROOT.parent / "shared" / "data" / "chem" / "chembl_5thresh.csv.gz"


@pytest.fixture(scope="session")
def chembl_csv() -> Path:
    """The real ChEMBL table (23,871 SMILES x 691 targets, pChEMBL values), read in place."""
    if not CHEMBL_CSV.is_file():
        pytest.skip(f"real ChEMBL data not found at {CHEMBL_CSV}")
    return CHEMBL_CSV


@pytest.fixture(scope="session")
def chembl_small(chembl_csv, tmp_path_factory) -> Path:
    """The first 4,000 ChEMBL compounds prepared for two sites (site-1, site-2); returns the out_dir.

    The default quorum leaves both sites with evaluable tasks at this size (about 150 tasks, 50+ evaluable).
    """
    from pharmafl.chem.prepare import PrepareConfig, prepare_chem

    out_dir = tmp_path_factory.mktemp("chembl_small")
    config = PrepareConfig(sites=["site-1", "site-2"], max_compounds=4000)
    summary = prepare_chem(str(chembl_csv), str(out_dir), config, progress=None)
    assert all(site["tasks_eval"] > 0 for site in summary["sites"].values())
    return out_dir
