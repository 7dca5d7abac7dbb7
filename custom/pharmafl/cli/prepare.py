"""``pharmafl prepare chem|binding-sites``: one folder per site from a public or a partner's table."""

from __future__ import annotations

import argparse

from pharmafl.cli.common import (
    add_overwrite,
    floats,
)
from pharmafl.core.errors import UserError
from pharmafl.core.paths import default_chem_input


def cmd_prepare_chem(args: argparse.Namespace) -> int:
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    if args.sites:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    else:
        if args.partners <= 0:
            raise UserError(f"--partners must be positive, got {args.partners}")
        sites = [f"site-{i + 1}" for i in range(args.partners)]
    config = PrepareConfig(
        sites=sites,
        fmt=args.format,
        smiles_col=args.smiles_col,
        thresholds=args.thresholds,
        fold_secret=args.fold_secret,
        n_bits=args.bits,
        radius=args.radius,
        test_fold=args.test_fold,
        min_train_actives=args.min_train_actives,
        min_train_inactives=args.min_train_inactives,
        min_eval_actives=args.min_eval_actives,
        min_eval_inactives=args.min_eval_inactives,
        seed=args.seed,
        max_compounds=args.max_compounds,
        compound_overlap=args.compound_overlap,
        partition=args.partition,
        library_split=args.library_split,
        library_sizes=args.library_sizes,
        audit_fraction=args.audit_fraction,
    )
    summary = prepare_chem(args.input or default_chem_input(), args.out, config, overwrite=args.overwrite)
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items())
    print(f"skipped rows: {skipped}; duplicate structures merged: {summary['duplicates_merged']}")
    print(f"wrote {args.out}")
    return 0


def split_config(args: argparse.Namespace):
    """The ``SplitConfig`` of the binding-site split options (``add_split_options``)."""
    from pharmafl.binding_sites.splits import SplitConfig

    return SplitConfig(
        clients=args.clients,
        split=args.split,
        max_length=args.max_length,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        skew_ratios=args.skew_ratios,
        seed=getattr(args, "seed", 0),
        client_names=[s.strip() for s in args.sites.split(",")] if args.sites else None,
        max_chains_per_input=args.max_chains_per_input,
    )


def add_split_options(parser: argparse.ArgumentParser, max_length: int, val_fraction: float) -> None:
    """How binding-site chains are cropped and split into clients (``prepare binding-sites``, ``experiment esm``)."""
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--sites", default=None, help="comma-separated client names (default site-1..site-N)")
    parser.add_argument("--split", default="iid", choices=["iid", "label-skew", "by-source"])
    parser.add_argument("--max-length", type=int, default=max_length, help="crop longer chains")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=val_fraction,
        help="share of each client's non-test chains held out as val.jsonl (thresholds, model choice)",
    )
    parser.add_argument("--skew-ratios", type=floats, default=(0.2, 0.8), help="label-skew high-half shares")
    parser.add_argument("--max-chains-per-input", type=int, default=None)


def cmd_prepare_binding_sites(args: argparse.Namespace) -> int:
    from pharmafl.binding_sites.splits import prepare_binding_sites

    prepare_binding_sites(
        args.inputs, args.out, split_config(args), fmt=args.format, labels_path=args.labels, overwrite=args.overwrite
    )
    return 0


def cmd_prepare_eicu(args: argparse.Namespace) -> int:
    from pharmafl.clinical.prepare import EicuConfig, prepare_eicu
    from pharmafl.core.paths import default_eicu_input

    folder = args.input or default_eicu_input()
    config = EicuConfig(sites=args.sites, min_stays=args.min_stays, test_fraction=args.test_fraction, seed=args.seed)
    prepare_eicu(folder, args.out, config, overwrite=args.overwrite)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser("prepare", help="prepare site data").add_subparsers(dest="kind", required=True)
    chem = prepare.add_parser("chem", help="MELLODDY-style compound x assay data -> one folder per partner")
    chem.add_argument(
        "input", nargs="?", help="CSV/CSV.GZ path or URL (default: the shared chembl_5thresh.csv.gz, else its URL)"
    )
    chem.add_argument("--out", required=True, help="output folder (one subfolder per site)")
    add_overwrite(chem, "an earlier preparation in --out")
    who = chem.add_mutually_exclusive_group(required=True)
    who.add_argument("--partners", type=int, help="number of simulated partners (sites site-1..site-N)")
    who.add_argument("--sites", help="comma-separated site names")
    chem.add_argument("--format", default="auto", choices=["auto", "wide", "long"])
    chem.add_argument("--smiles-col", default="smiles")
    chem.add_argument("--thresholds", type=floats, default=(5.5, 6.5, 7.5), help="activity thresholds")
    chem.add_argument("--fold-secret", default="pharmafl-demo-secret", help="consortium secret for scaffold folds")
    chem.add_argument("--bits", type=int, default=32000, help="fingerprint length (folded ECFP)")
    chem.add_argument("--radius", type=int, default=3, help="Morgan radius (3 = ECFP6)")
    chem.add_argument("--test-fold", type=int, default=0)
    chem.add_argument("--min-train-actives", type=int, default=10)
    chem.add_argument("--min-train-inactives", type=int, default=10)
    chem.add_argument("--min-eval-actives", type=int, default=5)
    chem.add_argument("--min-eval-inactives", type=int, default=5)
    chem.add_argument("--seed", type=int, default=0, help="seed of the task-to-partner assignment")
    chem.add_argument("--max-compounds", type=int, default=None, help="use only the first N valid compounds")
    chem.add_argument(
        "--compound-overlap",
        default="shared",
        choices=["shared", "private"],
        help="--partition assays: shared = a compound is at every partner with labels on it; private = at one",
    )
    chem.add_argument(
        "--partition",
        default="assays",
        choices=["assays", "libraries"],
        help="assays: each assay belongs to one partner; libraries: each compound belongs to one partner's library "
        "and every partner has its own task for each target it measured on its compounds",
    )
    chem.add_argument(
        "--library-split",
        default="scaffold",
        choices=["scaffold", "random"],
        help="--partition libraries: whole Murcko-scaffold groups per partner (chemically distinct), or random",
    )
    chem.add_argument(
        "--library-sizes",
        type=floats,
        default=None,
        help="--partition libraries: each partner's share, e.g. 0.5,0.3,0.2 (default: equal)",
    )
    chem.add_argument(
        "--audit-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of compounds (0 <= F < 0.5, drawn by a hash of the SMILES keyed with --fold-secret, the same "
        "for any partner count) kept with their labels but never trained on: 0.1 reserves 10%% of compounds for "
        "`pharmafl audit membership`; 0 keeps the results in docs/RESULTS.md reproducible",
    )
    chem.set_defaults(func=cmd_prepare_chem)

    proteins = prepare.add_parser("binding-sites", help="per-residue binding-site chains -> one folder per client")
    proteins.add_argument("inputs", nargs="+", help="GPSite three-line files, FASTA (with --labels) or CSV")
    proteins.add_argument("--out", required=True, help="output folder (one subfolder per client + common_test)")
    add_overwrite(proteins, "an earlier preparation in --out")
    add_split_options(proteins, max_length=1000, val_fraction=0.0)
    proteins.add_argument("--format", default="auto", choices=["auto", "threeline", "fasta", "csv"])
    proteins.add_argument(
        "--labels",
        default=None,
        help="labels for FASTA input: >id + 0/1 lines, an id,labels CSV, or binding positions "
        "(id<TAB>1-based positions, comma-separated; positions outside the chain are counted and dropped)",
    )
    proteins.add_argument("--seed", type=int, default=0)
    proteins.set_defaults(func=cmd_prepare_binding_sites)

    eicu = prepare.add_parser("eicu", help="eICU-CRD ICU stays -> one folder per region or hospital")
    eicu.add_argument(
        "input", nargs="?", help="folder with the eICU-CRD tables (default: the shared demo, ../shared/data/eicu)"
    )
    eicu.add_argument("--out", required=True, help="output folder (one subfolder per site)")
    add_overwrite(eicu, "an earlier preparation in --out")
    eicu.add_argument("--sites", default="region", choices=["region", "hospital"])
    eicu.add_argument("--min-stays", type=int, default=10, help="--sites hospital: the smallest hospital kept")
    eicu.add_argument("--test-fraction", type=float, default=0.25, help="each site's stratified test share")
    eicu.add_argument("--seed", type=int, default=0)
    eicu.set_defaults(func=cmd_prepare_eicu)
