from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRST = ("test_readme.py",)  # the longest file: the README smoke test


def pytest_collection_modifyitems(items):
    """The longest files first: the README smoke test, then every file with an end-to-end (``slow``) test, then the
    rest, each file's tests together and in their order. With scripts/test.sh's three pytest-xdist workers the long
    files start at once and the short ones fill the gaps, so the run ends about when its longest file does."""
    rank: dict = {}
    for item in items:
        first = 0 if item.path.name in FIRST else 1 if item.get_closest_marker("slow") else 2
        rank[item.path] = min(rank.get(item.path, 2), first)
    items.sort(key=lambda item: rank[item.path])


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
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    out_dir = tmp_path_factory.mktemp("chembl_small")
    config = PrepareConfig(sites=["site-1", "site-2"], max_compounds=4000)
    summary = prepare_chem(str(chembl_csv), str(out_dir), config, progress=None)
    assert all(site["tasks_eval"] > 0 for site in summary["sites"].values())
    return out_dir


# protein fixtures
GPSITE_DIR = REPO_ROOT.parent / "shared" / "data" / "proteins" / "gpsite"


@pytest.fixture(scope="session")
def gpsite_dir() -> Path:
    """The GPSite binding-site files ({ATP,...,ZN}_{train,test}.txt, three lines per chain), read in place."""
    if not (GPSITE_DIR / "ATP_train.txt").is_file():
        pytest.skip(f"real GPSite data not found at {GPSITE_DIR}")
    return GPSITE_DIR


@pytest.fixture(scope="session")
def gpsite_small(gpsite_dir, tmp_path_factory) -> Path:
    """The first 60 chains of ATP_train and HEM_train, cropped to 256, split iid into site-1 and site-2.

    Returns the out_dir: site-1/, site-2/ (train.jsonl, test.jsonl, manifest.json), common_test/, summary.json.
    """
    from pharmafl.binding_sites.splits import SplitConfig, prepare_binding_sites

    out_dir = tmp_path_factory.mktemp("gpsite_small")
    config = SplitConfig(clients=2, split="iid", max_length=256, max_chains_per_input=60)
    inputs = [str(gpsite_dir / "ATP_train.txt"), str(gpsite_dir / "HEM_train.txt")]
    prepare_binding_sites(inputs, str(out_dir), config, progress=None)
    return out_dir


# esm fixtures
# The public ESM-2 alphabet (fair-esm), in id order, and a tiny random ESM-2 geometry for fast tests.
ESM_VOCAB = "<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>".split()
TINY_ESM = {
    "vocab_size": 33,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "position_embedding_type": "rotary",
    "token_dropout": True,
    "pad_token_id": 1,
    "mask_token_id": 32,
}


@pytest.fixture(scope="session")
def esm_vocab_file(tmp_path_factory) -> Path:
    """A vocab.txt with the ESM-2 alphabet, for ``EsmTokenizer(vocab_file=...)``."""
    path = tmp_path_factory.mktemp("esm_vocab") / "vocab.txt"
    path.write_text("\n".join(ESM_VOCAB) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_esm_config(esm_vocab_file) -> dict:
    """``EsmConfig`` kwargs of a 2-layer, hidden-16 random ESM-2, plus ``vocab_file`` (the executor's model_config)."""
    return {**TINY_ESM, "vocab_file": str(esm_vocab_file)}


# clinical fixtures
EICU_DIR = REPO_ROOT.parent / "shared" / "data" / "eicu"


@pytest.fixture(scope="session")
def eicu_dir() -> Path:
    """The eICU-CRD demo tables (2,520 ICU stays, 186 hospitals), read in place."""
    if not (EICU_DIR / "patient.csv.gz").is_file():
        pytest.skip(f"the eICU-CRD demo not found at {EICU_DIR}")
    return EICU_DIR


@pytest.fixture(scope="session")
def eicu_regions(eicu_dir, tmp_path_factory) -> Path:
    """The demo prepared by region (midwest, northeast, south, west); returns the out_dir."""
    from pharmafl.clinical.prepare import EicuConfig, prepare_eicu

    out_dir = tmp_path_factory.mktemp("eicu_regions")
    prepare_eicu(eicu_dir, out_dir, EicuConfig(sites="region"), say=lambda _line: None)
    return out_dir
