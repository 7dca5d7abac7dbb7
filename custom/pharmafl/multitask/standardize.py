"""Structure standardisation, ECFP fingerprints, Murcko scaffolds and keyed scaffold folds.

Every partner must turn the same structure into the same features and the same fold, so these are pure
functions of the SMILES (and, for folds, of the consortium secret) and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator
from rdkit.Chem.MolStandardize import rdMolStandardize
from rdkit.Chem.Scaffolds import MurckoScaffold
from rdkit.rdBase import BlockLogs

from pharmafl.core.errors import InputError

# Built once: constructing the standardisers costs more than applying them to a small molecule.
_LARGEST_FRAGMENT = rdMolStandardize.LargestFragmentChooser()
_UNCHARGER = rdMolStandardize.Uncharger()


def standardize_with_reason(smiles: str, max_heavy_atoms: int = 100) -> tuple[str | None, str | None]:
    """Standardise one SMILES; returns (canonical SMILES, None) or (None, reason it was rejected).

    Keeps the largest fragment (strips salts and solvents), neutralises charges where a neutral form
    exists and writes canonical isomeric SMILES. Reasons: "empty_smiles", "invalid_smiles", "too_large"
    (more than `max_heavy_atoms` heavy atoms in the kept fragment).
    """
    if not isinstance(smiles, str) or not smiles.strip():
        return None, "empty_smiles"
    with BlockLogs():  # RDKit logs every unparsable SMILES; callers count them instead
        mol = Chem.MolFromSmiles(smiles.strip())
        if mol is None or mol.GetNumAtoms() == 0:
            return None, "invalid_smiles"
        try:
            mol = _UNCHARGER.uncharge(_LARGEST_FRAGMENT.choose(mol))
        except (RuntimeError, ValueError):  # sanitisation failures inside the standardiser
            return None, "invalid_smiles"
    if mol.GetNumHeavyAtoms() > max_heavy_atoms:
        return None, "too_large"
    return Chem.MolToSmiles(mol), None


def standardize_smiles(smiles: str, max_heavy_atoms: int = 100) -> str | None:
    """Canonical SMILES of the neutral largest fragment, or None if empty, invalid or too large."""
    return standardize_with_reason(smiles, max_heavy_atoms)[0]


@lru_cache(maxsize=8)
def _morgan_generator(radius: int, n_bits: int):
    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)


def _as_mol(mol_or_smiles: Chem.Mol | str) -> Chem.Mol:
    if isinstance(mol_or_smiles, Chem.Mol):
        return mol_or_smiles
    with BlockLogs():
        mol = Chem.MolFromSmiles(mol_or_smiles) if mol_or_smiles else None
    if mol is None:
        raise InputError(f"Invalid SMILES '{mol_or_smiles}'.")
    return mol


def ecfp_bits(mol_or_smiles: Chem.Mol | str, radius: int = 3, n_bits: int = 32000) -> np.ndarray:
    """Sorted int32 indices of the on bits of a Morgan fingerprint (radius 3 = ECFP6) folded to n_bits."""
    fingerprint = _morgan_generator(radius, n_bits).GetFingerprint(_as_mol(mol_or_smiles))
    return np.asarray(fingerprint.GetOnBits(), dtype=np.int32)


def murcko_scaffold(mol_or_smiles: Chem.Mol | str) -> str:
    """Bemis-Murcko scaffold SMILES without stereo; "" for acyclic molecules.

    Stereo is dropped so that stereoisomers, which share a fingerprint, also share a fold.
    """
    scaffold = MurckoScaffold.GetScaffoldForMol(_as_mol(mol_or_smiles))
    if scaffold.GetNumAtoms() == 0:
        return ""
    return Chem.MolToSmiles(scaffold, isomericSmiles=False)


FEATURE_FAILURES = ("unreadable_standard_form", "fingerprint_failed", "scaffold_failed")


def features_with_reason(
    canonical: str, radius: int = 3, n_bits: int = 32000
) -> tuple[tuple[np.ndarray, str] | None, str | None]:
    """(ECFP on-bits, Murcko scaffold) of a standardised SMILES, or (None, the stage that failed).

    Reasons: "unreadable_standard_form" (the standard form does not parse back, e.g. an uncharged
    cyclopentadienide RDKit cannot kekulize), "fingerprint_failed", "scaffold_failed". A molecule that fails
    is counted and skipped by the caller, never an abort.
    """
    with BlockLogs():
        mol = Chem.MolFromSmiles(canonical)
        if mol is None:
            return None, "unreadable_standard_form"
        try:
            bits = ecfp_bits(mol, radius, n_bits)
        except Exception:  # noqa: BLE001 - RDKit raises several kinds; one molecule must not abort the rest
            return None, "fingerprint_failed"
        try:
            scaffold = murcko_scaffold(mol)
        except Exception:  # noqa: BLE001
            return None, "scaffold_failed"
    return (bits, scaffold), None


def fold_for_scaffold(scaffold: str, secret: str, n_folds: int = 5) -> int:
    """Fold of a scaffold: HMAC-SHA256(secret, scaffold), first 8 bytes big-endian, modulo n_folds.

    Keyed so partners agree on folds without revealing structures to anyone outside the consortium.
    """
    if n_folds < 1:
        raise InputError(f"The number of folds must be at least 1, got {n_folds}.")
    digest = hmac.new(secret.encode("utf-8"), scaffold.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % n_folds
