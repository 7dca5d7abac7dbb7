"""Protein binding-site data: read per-residue 0/1 labels, split them into clients, load prepared folders."""

from pharmafl.binding_sites.dataset import ProteinSplit, load_client, load_common_test
from pharmafl.binding_sites.formats import ESM_ALPHABET, Chain, crop, read_chains
from pharmafl.binding_sites.splits import SplitConfig, prepare_binding_sites

__all__ = [
    "ESM_ALPHABET",
    "Chain",
    "ProteinSplit",
    "SplitConfig",
    "crop",
    "load_client",
    "load_common_test",
    "prepare_binding_sites",
    "read_chains",
]
