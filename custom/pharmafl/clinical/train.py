"""In-hospital mortality from one site's ICU stays: data, preprocessing, model, training loop and metrics.

Plain PyTorch with no FLARE import: ``pharmafl.clinical.mortality`` runs it on one site alone, and the FLARE
Client API script (``pharmafl.flare.mortality_client``) runs the same functions round after round.

With DP-SGD (a ``DPConfig``; the privacy unit is one ICU stay) each step is a Poisson sample of the training stays,
each stay's gradient is clipped and Gaussian noise is added (``pharmafl.privacy.dp_sgd``). Outside the guarantee:
the site's own standardisation statistics (when no federated statistics are given) and the class ratio behind the
positive weight, both counted from the training stays.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from torch import nn

from pharmafl.clinical.prepare import APACHE, LABEL, SPLIT, STAYS_FILE, feature_names
from pharmafl.core.errors import InputError
from pharmafl.privacy.dp_sgd import DPConfig, GhostClipper, PrivacyBudget

MODELS = ("logistic", "mlp")
WEIGHTINGS = ("samples", "uniform")
POS_WEIGHTS = ("1", "sqrt", "balanced")  # candidates for the positive class weight, chosen on validation


@dataclass(frozen=True)
class MortalityConfig:
    """The training settings (one home for each default): model, optimiser, rounds of local work, imbalance."""

    model: str = "logistic"
    hidden: int = 32  # the MLP's hidden units
    learning_rate: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 64
    local_epochs: int = 5  # per federated round; the same number of epochs per round alone
    pos_weight: str = "auto"  # auto: the candidate of POS_WEIGHTS with the best validation AUPRC; or one of them
    fedprox_mu: float = 0.0  # FedProx's proximal weight (0: FedAvg)
    weighting: str = "samples"  # how the server weighs a site: by its training stays, or uniform
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise InputError(f"model must be one of {', '.join(MODELS)}, got '{self.model}'.")
        if self.weighting not in WEIGHTINGS:
            raise InputError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got '{self.weighting}'.")
        if self.pos_weight not in ("auto", *POS_WEIGHTS):
            raise InputError(f"pos_weight must be auto or one of {', '.join(POS_WEIGHTS)}, got '{self.pos_weight}'.")
        if self.learning_rate <= 0 or self.batch_size <= 0 or self.local_epochs <= 0 or self.hidden <= 0:
            raise InputError("learning_rate, batch_size, local_epochs and hidden must be positive.")
        if self.fedprox_mu < 0:
            raise InputError(f"fedprox_mu must not be negative, got {self.fedprox_mu}.")


@dataclass
class SiteStays:
    """One site's stays: raw features (NaN = missing), labels, splits and the APACHE IVa predictions."""

    name: str
    X: np.ndarray
    y: np.ndarray
    split: np.ndarray
    apache: np.ndarray
    features: list[str] = field(default_factory=feature_names)

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.split == split
        return self.X[rows], self.y[rows]


def pooled(sites: list[SiteStays]) -> SiteStays:
    """All sites' stays as one site (the centralized baseline: one model on every site's training stays)."""
    return SiteStays(
        name="pooled",
        X=np.vstack([s.X for s in sites]),
        y=np.concatenate([s.y for s in sites]),
        split=np.concatenate([s.split for s in sites]),
        apache=np.concatenate([s.apache for s in sites]),
    )


def load_site(folder: str | Path) -> SiteStays:
    """A site folder of ``pharmafl prepare eicu``."""
    path = Path(folder) / STAYS_FILE
    if not path.is_file():
        raise InputError(f"'{folder}' has no {STAYS_FILE}; run `pharmafl prepare eicu` first.")
    table = pd.read_csv(path)
    missing = [c for c in (LABEL, SPLIT, APACHE, *feature_names()) if c not in table.columns]
    if missing:
        raise InputError(f"{path} has no column {', '.join(missing)}; prepare the data again.")
    return SiteStays(
        name=Path(folder).name,
        X=table[feature_names()].to_numpy(dtype=np.float64),
        y=table[LABEL].to_numpy(dtype=np.int64),
        split=table[SPLIT].astype(str).to_numpy(),
        apache=table[APACHE].to_numpy(dtype=np.float64),
    )


@dataclass(frozen=True)
class Standardizer:
    """Impute with ``mean``, scale by ``std`` and add one missing indicator per feature."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        """From one site's training stays (a site alone; the federation uses the global statistics)."""
        with warnings.catch_warnings():  # a feature no stay of the site has: mean 0, scale 1
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(X, axis=0)
            std = np.nanstd(X, axis=0)
        return cls(np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 0), std, 1.0))

    @classmethod
    def from_statistics(
        cls, stats: Mapping[str, Mapping[str, float | None]], features: list[str], own: Standardizer | None = None
    ) -> Standardizer:
        """From ``{feature: {"mean": m, "stddev": s}}`` (the federated statistics' global figures). A feature
        without a global figure (no site reported it: FLARE's minimum-count filter) takes ``own``'s (the site's own
        statistics), else mean 0 and scale 1."""
        missing = [f for f in features if f not in stats]
        if missing:
            raise InputError(f"the statistics have no entry for {', '.join(missing[:5])}.")
        own = own or cls(np.zeros(len(features)), np.ones(len(features)))
        mean = np.array([_or(stats[f].get("mean"), own.mean[i]) for i, f in enumerate(features)])
        std = np.array([_or(stats[f].get("stddev"), own.std[i]) for i, f in enumerate(features)])
        return cls(np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 0), std, 1.0))

    def transform(self, X: np.ndarray) -> np.ndarray:
        missing = np.isnan(X)
        scaled = (np.where(missing, self.mean, X) - self.mean) / self.std
        return np.hstack([scaled, missing.astype(np.float64)]).astype(np.float32)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist()}) + "\n")


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None or not np.isfinite(float(value)) else float(value)


class MortalityNet(nn.Module):
    """Logistic regression (``logistic``) or a one-hidden-layer MLP (``mlp``) with one logit out, seeded.

    The server builds the same model as every site (FLARE's persistor, from these constructor arguments)."""

    def __init__(self, n_inputs: int, model: str = "logistic", hidden: int = 32, seed: int = 0):
        super().__init__()
        self.n_inputs, self.model, self.hidden, self.seed = n_inputs, model, hidden, seed  # as given (Job API)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if model == "logistic":
                self.net = nn.Sequential(nn.Linear(n_inputs, 1))
            else:
                self.net = nn.Sequential(nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def n_inputs() -> int:
    """The model's inputs: every feature, scaled, and its missing indicator."""
    return 2 * len(feature_names())


def make_model(n_inputs: int, config: MortalityConfig) -> MortalityNet:
    return MortalityNet(n_inputs, config.model, config.hidden, config.seed)


def positive_weight(choice: str, y: np.ndarray) -> float:
    positives = max(int(y.sum()), 1)
    ratio = max(len(y) - positives, 1) / positives
    return {"1": 1.0, "sqrt": math.sqrt(ratio), "balanced": ratio}[choice]


def train_epochs(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    config: MortalityConfig,
    pos_weight: float,
    epochs: int,
    rng: np.random.Generator,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    private: tuple[GhostClipper, PrivacyBudget] | None = None,
) -> int:
    """``epochs`` epochs of Adam on weighted binary cross-entropy (+ ``extra_loss``, e.g. FedProx); returns steps.

    ``private`` (the clipper and budget of ``model``): DP-SGD, ``budget.steps_per_epoch`` Poisson-sampled steps per
    epoch, stopping when the budget is spent. ``extra_loss`` must then depend on no stay (FedProx's distance to the
    global model does not): its gradient is added to the noised gradient, unclipped, which costs no privacy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    inputs, targets = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32))
    model.train()
    if private is not None:
        return _train_private(model, inputs, targets, optimizer, pos_weight, epochs, rng, private, extra_loss)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32))
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(order), config.batch_size):
            rows = torch.from_numpy(order[start : start + config.batch_size])
            loss = loss_fn(model(inputs[rows]).squeeze(-1), targets[rows])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


def _train_private(model, inputs, targets, optimizer, pos_weight, epochs, rng, private, extra_loss) -> int:
    clipper, budget = private
    weight = torch.tensor(pos_weight, dtype=torch.float32)

    def per_stay_losses(rows: np.ndarray) -> torch.Tensor:
        """Each stay's weighted binary cross-entropy: the loss of one record, the DP privacy unit."""
        if len(rows) == 0:
            return torch.zeros(0)
        rows = torch.from_numpy(rows)
        logits = model(inputs[rows]).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(
            logits, targets[rows], pos_weight=weight, reduction="none"
        )

    if extra_loss is not None:
        optimizer = _WithRecordFreeLoss(optimizer, model, extra_loss)
    steps = 0
    for _ in range(epochs):
        for rows in budget.poisson_batches(np.arange(len(targets)), rng, budget.steps_per_epoch):
            if budget.exhausted:
                return steps
            clipper.step(lambda rows=rows: per_stay_losses(rows), optimizer, budget.expected_batch_size,
                         budget.noise_multiplier)  # fmt: skip
            budget.steps += 1
            steps += 1
    return steps


class _WithRecordFreeLoss:
    """An optimizer that adds the gradient of a loss depending on no record (FedProx's proximal term) to the DP-SGD
    gradient before it steps: post-processing of the noised gradient, so neither clipped nor noised."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]):
        self.optimizer, self.model, self.loss = optimizer, model, loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(self.loss(self.model), parameters, allow_unused=True)
        with torch.no_grad():
            for parameter, grad in zip(parameters, grads, strict=True):
                if grad is not None:
                    parameter.grad.add_(grad)
        self.optimizer.step()


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.sigmoid(model(torch.from_numpy(X)).squeeze(-1)).numpy().astype(np.float64)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean prediction| over equal-width probability bins, weighted by their stays."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        rows = index == b
        if rows.any():
            total += rows.sum() * abs(y[rows].mean() - p[rows].mean())
    return float(total / max(len(y), 1))


SCORE_BINS = 200  # the predicted-risk histogram a site reports per class: ROC, calibration and pooled metrics


def score_histogram(y: np.ndarray, p: np.ndarray, bins: int = SCORE_BINS) -> dict[str, list[int]]:
    """Stays per equal-width predicted-risk bin on [0, 1], deaths and survivors apart. Counts, not the stays'
    scores; on a test split of a few stays they are nearly the scores and outcomes, as the site's metrics are."""
    index = np.clip((np.asarray(p) * bins).astype(int), 0, bins - 1)
    y = np.asarray(y)
    return {
        "deaths": np.bincount(index[y == 1], minlength=bins).tolist(),
        "survivors": np.bincount(index[y == 0], minlength=bins).tolist(),
    }


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC, Brier score, ECE (NaN for the ranking metrics when one class is absent), and the predicted-risk
    histogram per class (``score_histogram``)."""
    both = len(np.unique(y)) == 2
    return {
        "auroc": float(roc_auc_score(y, p)) if both else float("nan"),
        "auprc": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(brier_score_loss(y, p, pos_label=1)) if len(y) else float("nan"),
        "ece": expected_calibration_error(y, p) if len(y) else float("nan"),
        "stays": int(len(y)),
        "deaths": int(y.sum()),
        "histogram": score_histogram(y, p),
    }


class MortalityTrainer:
    """One site's model and data: the positive weight is chosen on its validation split once, then kept.

    With ``dp`` (DP-SGD, one ICU stay the privacy unit) ``pos_weight auto`` is ``balanced``: choosing it on the
    validation split trains three models on the training stays outside the budget. ``budget`` is what was spent.
    """

    def __init__(
        self,
        site: SiteStays,
        config: MortalityConfig,
        standardizer: Standardizer | None = None,
        dp: DPConfig | None = None,
    ):
        self.site, self.config = site, config
        self.dp = dp if dp is not None and dp.enabled else None
        X_train, self.y_train = site.part("train")
        if len(self.y_train) == 0:
            raise InputError(f"site {site.name} has no training stays.")
        self.standardizer = standardizer or Standardizer.fit(X_train)
        self.X = self.standardizer.transform(site.X)
        self.X_train = self.standardizer.transform(X_train)
        self.rng = np.random.default_rng(config.seed)
        self.model = make_model(self.X.shape[1], config)
        self.pos_weight = self._choose_pos_weight()
        self.clipper, self.budget = None, None
        if self.dp:
            self.clipper = GhostClipper(self.model, self.dp)
            self.budget = PrivacyBudget(self.dp, len(self.y_train), config.batch_size)

    def _choose_pos_weight(self) -> float:
        if self.config.pos_weight != "auto":
            return positive_weight(self.config.pos_weight, self.y_train)
        if self.dp:
            return positive_weight("balanced", self.y_train)
        rows = self.site.split == "validation"
        if len(np.unique(self.site.y[rows])) < 2:  # no validation death to choose by: the balanced weight
            return positive_weight("balanced", self.y_train)
        best, best_auprc = "balanced", -1.0
        for choice in POS_WEIGHTS:
            model = make_model(self.X.shape[1], self.config)
            weight = positive_weight(choice, self.y_train)
            rng = np.random.default_rng(self.config.seed)
            train_epochs(model, self.X_train, self.y_train, self.config, weight, self.config.local_epochs, rng)
            auprc = average_precision_score(self.site.y[rows], predict(model, self.X[rows]))
            if auprc > best_auprc:
                best, best_auprc = choice, auprc
        return positive_weight(best, self.y_train)

    def train(self, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> int:
        """``local_epochs`` epochs (DP-SGD: fewer once the budget is spent); returns the steps taken."""
        private = (self.clipper, self.budget) if self.budget is not None else None
        return train_epochs(
            self.model, self.X_train, self.y_train, self.config, self.pos_weight, self.config.local_epochs, self.rng,
            extra_loss, private,
        )  # fmt: skip

    def model_copy(self) -> MortalityNet:
        """A model with this one's current weights (FedProx's global model); a deep copy would also copy the DP
        clipper that hooks into the model, with the last step's graph."""
        copy = make_model(self.X.shape[1], self.config)
        copy.load_state_dict(self.model.state_dict())
        return copy

    def privacy(self) -> dict | None:
        """What DP-SGD has spent (epsilon, delta, noise, steps), or None without DP."""
        if self.budget is None:
            return None
        return {**self.budget.summary(), "privacy_unit": "one ICU stay of this site"}

    def evaluate(self, split: str = "test", site: SiteStays | None = None) -> dict:
        """Scores on ``split`` of this trainer's site (or of ``site``), and APACHE IVa's on the stays of that
        split that have an IVa prediction (``on_apache_stays`` is the model on exactly those stays)."""
        site = site or self.site
        rows = site.split == split
        X = self.X[rows] if site is self.site else self.standardizer.transform(site.X[rows])
        p = predict(self.model, X)
        y = site.y[rows]
        has_iva = ~np.isnan(site.apache[rows])
        return {
            **scores(y, p),
            "on_apache_stays": scores(y[has_iva], p[has_iva]),
            "apache": scores(y[has_iva], site.apache[rows][has_iva]),
        }

    def weight(self) -> float:
        """The site's aggregation weight: its training stays (``samples``) or 1 (``uniform``)."""
        return float(len(self.y_train)) if self.config.weighting == "samples" else 1.0

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        own = self.model.state_dict()
        if set(state) != set(own):
            raise InputError(f"the global model's parameters {sorted(state)} are not this model's {sorted(own)}.")
        for name, value in state.items():
            if tuple(np.shape(value)) != tuple(own[name].shape) or not np.all(np.isfinite(value)):
                raise InputError(f"the global parameter {name} is mis-shaped or not finite.")
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in state.items()})
