"""SparseChem-like multi-task network: a shared trunk over sparse fingerprints and a per-partner head.

Parameter names start with ``trunk.`` (shared, aggregated) or ``head.`` / ``regression_head.`` (private to
its partner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pharmafl.core.errors import InputError

TRUNK_PREFIX = "trunk."


@dataclass(frozen=True)
class TrunkConfig:
    """The shared trunk's geometry, which the server's model and every site's model must agree on.

    ``n_features`` is the fingerprint width (``pharmafl prepare chem --bits``); ``hidden_sizes`` the trunk's
    layers, the first one the sparse input layer.
    """

    n_features: int = 32000
    hidden_sizes: tuple[int, ...] = (400,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        if self.n_features <= 0 or not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise InputError(f"invalid trunk geometry: n_features={self.n_features}, hidden_sizes={self.hidden_sizes}")


class Trunk(nn.Module):
    """Sparse input layer (n_features -> hidden) + ReLU + dropout, then optional dense layers."""

    def __init__(self, n_features: int, hidden_sizes: Sequence[int], dropout: float):
        super().__init__()
        TrunkConfig(n_features, tuple(hidden_sizes))  # checks the geometry
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        # EmbeddingBag(mode="sum") over the on-bit indices is a sparse-times-dense product without
        # materialising the 32k-wide input; its sparse gradient touches only the rows of bits present.
        self.input = nn.EmbeddingBag(n_features, hidden_sizes[0], mode="sum", sparse=True)
        self.input_bias = nn.Parameter(torch.zeros(hidden_sizes[0]))
        bound = 1.0 / np.sqrt(64.0)  # ECFP6 sets roughly 30-90 bits per compound
        nn.init.uniform_(self.input.weight, -bound, bound)
        layers: list[nn.Module] = []
        for size_in, size_out in zip(hidden_sizes[:-1], hidden_sizes[1:], strict=True):
            layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(size_in, size_out)]
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.layers = nn.Sequential(*layers)
        self.output_size = hidden_sizes[-1]
        self.hidden_sizes = [int(h) for h in hidden_sizes]

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.layers(self.input(indices, offsets) + self.input_bias)


class TrunkModel(nn.Module):
    """The shared part alone, with the same parameter names as in ``MultiTaskNet``: what the server holds."""

    def __init__(self, n_features: int, hidden_sizes: Sequence[int], seed: int | None = 0):
        """A ``TrunkConfig``'s trunk (the job passes its fields). ``seed`` fixes the initial trunk (None: torch's
        global generator), so that a job's run repeats exactly: the server builds this model once per run, and an
        unseeded start made two runs of a job differ. Dropout has no weights: the server's trunk has none."""
        super().__init__()
        # kept as given: FLARE's Job API exports a component's constructor arguments from its attributes
        self.n_features, self.hidden_sizes, self.seed = n_features, list(hidden_sizes), seed
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.trunk = Trunk(n_features, hidden_sizes, 0.0)


class RegressionHead(nn.Module):
    """One output per regression task, in the task's own units: a linear layer on standardised targets,
    with each task's training mean and standard deviation kept as buffers (saved with the model)."""

    def __init__(self, in_features: int, n_tasks: int):
        super().__init__()
        self.linear = nn.Linear(in_features, n_tasks)
        self.register_buffer("mean", torch.zeros(n_tasks))
        self.register_buffer("std", torch.ones(n_tasks))

    def standardised(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden) * self.std + self.mean


class MultiTaskNet(nn.Module):
    """Trunk + classification head (one logit per task of this partner) + optional regression head.

    Everything but the trunk is the partner's own (``head.``, ``regression_head.``): it never leaves the site.
    """

    def __init__(
        self,
        n_features: int,
        n_tasks: int,
        hidden_sizes: Sequence[int],
        dropout: float,
        n_regression_tasks: int = 0,
    ):
        super().__init__()
        self.trunk = Trunk(n_features, hidden_sizes, dropout)
        self.head = nn.Linear(self.trunk.output_size, n_tasks)
        self.regression_head = (
            RegressionHead(self.trunk.output_size, n_regression_tasks) if n_regression_tasks else None
        )

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(indices, offsets))

    def trunk_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items() if k.startswith(TRUNK_PREFIX)}

    def head_state(self) -> dict[str, torch.Tensor]:
        """The partner's private parameters: the classification and (when present) the regression head."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(TRUNK_PREFIX)}

    def load_trunk(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy global trunk weights in place (optimizer state keeps pointing at the same tensors)."""
        own = {k: v for k, v in self.state_dict().items() if k.startswith(TRUNK_PREFIX)}
        if set(weights) != set(own):
            missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
            raise ValueError(f"trunk weights do not match the model: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, value in weights.items():
                if tuple(np.shape(value)) != tuple(own[name].shape):
                    raise ValueError(
                        f"trunk weight {name} has shape {tuple(np.shape(value))}, "
                        f"model expects {tuple(own[name].shape)}"
                    )
                own[name].copy_(torch.as_tensor(np.asarray(value), dtype=own[name].dtype))
