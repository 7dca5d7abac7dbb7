"""Write a MoleculeNet-layout classification CSV (``mol_id, smiles, <0/1 task columns>``) from the shared ChEMBL file.

A second wide multi-task file for ``pharmafl prepare chem`` in the layout of Tox21/ToxCast/MUV: binary
columns with blanks for unmeasured, an id column, and a few molecules that fail standardisation
(appended, so the preparation's skip counts can be checked). Usage:

    .venv/bin/python scripts/moleculenet_from_chembl.py runs/moleculenet.csv [--targets 12] [--threshold 6.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

CHEMBL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chem" / "chembl_5thresh.csv.gz"
# One per failure stage of the preparation: unparsable, a placeholder string, an empty fragment,
# a hypervalent carbon, and a cyclopentadienide whose neutral form RDKit cannot kekulize.
FAILING = ["c1ccccc1(", "FAIL", "C..C", "C(C)(C)(C)(C)C", "[cH-]1cccc1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--input", type=Path, default=CHEMBL)
    parser.add_argument("--targets", type=int, default=12, help="the most-measured targets kept (default 12)")
    parser.add_argument("--threshold", type=float, default=6.5, help="active iff pChEMBL >= this (default 6.5)")
    args = parser.parse_args()
    frame = pd.read_csv(args.input)
    targets = frame.drop(columns="smiles").notna().sum().nlargest(args.targets).index
    kept = frame[frame[targets].notna().any(axis=1)]
    labels = (kept[targets] >= args.threshold).astype("Int8").where(kept[targets].notna())
    wide = pd.concat([kept[["smiles"]], labels], axis=1)
    bad = pd.DataFrame({"smiles": FAILING, targets[0]: 1}).astype({targets[0]: "Int8"})
    wide = pd.concat([wide, bad], ignore_index=True)
    wide.insert(0, "mol_id", [f"M{i:06d}" for i in range(len(wide))])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wide.to_csv(args.out, index=False)
    print(f"wrote {args.out}: {len(wide)} molecules ({len(FAILING)} that fail standardisation), {len(targets)} tasks")


if __name__ == "__main__":
    main()
