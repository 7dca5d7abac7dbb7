import random
import socket
from pathlib import Path

import pytest

SITES = ["pharma-a", "pharma-b", "pharma-c"]


def free_port_pair() -> int:
    """A port P such that P and P + 1 are free on loopback now (server FL and admin ports)."""
    for _ in range(50):
        port = random.randint(20000, 40000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("localhost", port))
                b.bind(("localhost", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair found")


@pytest.fixture(scope="session")
def chembl_consortium(chembl_csv, tmp_path_factory) -> Path:
    """The first 4,000 ChEMBL compounds prepared for the POC sites pharma-a, pharma-b, pharma-c."""
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    out_dir = tmp_path_factory.mktemp("chembl_consortium")
    summary = prepare_chem(str(chembl_csv), str(out_dir), PrepareConfig(sites=SITES, max_compounds=4000), progress=None)
    assert all(site["tasks_eval"] > 0 for site in summary["sites"].values())
    return out_dir
