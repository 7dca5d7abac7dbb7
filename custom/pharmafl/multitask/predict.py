"""Scoring new molecules with a partner's final model (the global trunk and its own head).

The site saves its model as a torch state dict with a model card beside it (``local_model.json``): the task
table, the featurisation of its preparation and the manifest's hash. ``predict`` featurises new SMILES exactly
as ``prepare chem`` did (same standardisation, radius and bits) and writes one probability column per task
(and one predicted value per regression task, when the model has a regression head);
a molecule that cannot be featurised keeps its row, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pharmafl.core.errors import InputError
from pharmafl.core.manifest import sha256_file
from pharmafl.multitask.prepare import fingerprint_matrix
from pharmafl.multitask.standardize import features_with_reason, standardize_with_reason
from pharmafl.multitask.train import predict_probabilities, predict_values

MODEL_CARD = "local_model.json"
CARD_VERSION = 1


def model_card(data, hidden_sizes: list[int], dropout: float, regression_tasks: list[str] | None = None) -> dict:
    """What ``predict`` needs besides the weights: tasks (and regression tasks, when the model has a regression
    head), geometry, featurisation, the preparation's hash."""
    manifest = data.manifest
    return {
        "card_version": CARD_VERSION,
        "site": manifest.get("site"),
        "tasks": list(data.tasks["task_id"]),
        "regression_tasks": list(regression_tasks or []),
        "n_features": data.n_features,
        "hidden_sizes": list(hidden_sizes),
        "dropout": dropout,
        "featurisation": {
            "radius": manifest.get("radius", 3),
            "n_bits": manifest.get("n_bits", data.n_features),
            "max_heavy_atoms": manifest.get("max_heavy_atoms", 100),
        },
        "manifest_sha256": sha256_file(Path(data.path) / "manifest.json"),
    }


def load_site_model(path: str | Path):
    """(model in eval mode, card) from a site's model file (``local_model.pt``) or the folder holding it."""
    from pharmafl.multitask.model import MultiTaskNet

    weights = Path(path)
    if weights.is_dir():
        weights = weights / "local_model.pt"
    card_path = weights.with_name(MODEL_CARD)
    if not weights.is_file() or not card_path.is_file():
        raise InputError(f"no site model at '{path}': expected local_model.pt with its {MODEL_CARD} beside it.")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as err:
        raise InputError(f"'{card_path}' is not valid JSON ({err}).") from None
    if card.get("card_version") != CARD_VERSION:
        raise InputError(f"'{card_path}' is a model card of version {card.get('card_version')}, not {CARD_VERSION}.")
    model = MultiTaskNet(
        card["n_features"],
        len(card["tasks"]),
        card["hidden_sizes"],
        card["dropout"],
        len(card.get("regression_tasks", [])),
    )
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    return model, card


def featurise(smiles: list[str], featurisation: dict) -> tuple[sp.csr_matrix, list[str | None], list[str]]:
    """(fingerprints of the rows that featurised, standard SMILES per row or None, status per row: ok or why)."""
    rows, standard, status = [], [], []
    for text in smiles:
        canonical, reason = standardize_with_reason(text, featurisation["max_heavy_atoms"])
        features = None
        if canonical is not None:
            features, reason = features_with_reason(canonical, featurisation["radius"], featurisation["n_bits"])
        standard.append(canonical if features is not None else None)
        status.append("ok" if features is not None else reason)
        if features is not None:
            rows.append(features[0])
    return fingerprint_matrix(rows, featurisation["n_bits"]), standard, status


def predict_smiles_file(
    model_path: str | Path, smiles_file: str | Path, out_file: str | Path, smiles_col: str = "smiles"
):
    """Score every row of ``smiles_file``; writes ``out_file`` (CSV) and returns (rows scored, rows skipped)."""
    model, card = load_site_model(model_path)
    try:
        frame = pd.read_csv(smiles_file, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(f"could not read '{smiles_file}' as a CSV file ({err}).") from None
    if smiles_col not in frame.columns:
        raise InputError(f"'{smiles_file}' has no '{smiles_col}' column; its columns are {list(frame.columns)}.")
    X, standard, status = featurise(list(frame[smiles_col]), card["featurisation"])
    scores = np.full((len(frame), len(card["tasks"])), np.nan, dtype=np.float64)
    ok = np.array([s == "ok" for s in status], dtype=bool)
    scores[ok] = predict_probabilities(model, X, np.arange(X.shape[0]))
    out = pd.DataFrame(
        {"row": np.arange(len(frame)), smiles_col: frame[smiles_col], "standard_smiles": standard, "status": status}
    )
    columns = [pd.DataFrame(scores, columns=card["tasks"])]
    if card.get("regression_tasks"):  # predicted values (e.g. pChEMBL) of the regression head, one column per task
        values = np.full((len(frame), len(card["regression_tasks"])), np.nan, dtype=np.float64)
        values[ok] = predict_values(model, X, np.arange(X.shape[0]))
        columns.append(pd.DataFrame(values, columns=card["regression_tasks"]))
    out = pd.concat([out, *columns], axis=1)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(out_file, index=False)
    return int(ok.sum()), int((~ok).sum())
