"""SparseChem-like multi-task network: a shared trunk over sparse fingerprints and a per-partner head.

Parameter names start with ``trunk.`` (shared, aggregated) or ``head.`` / ``regression_head.`` (private to
its partner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

TRUNK_PREFIX = "trunk."


class Trunk(nn.Module):
    """Sparse input layer (n_features -> hidden) + ReLU + dropout, then optional dense layers."""

    def __init__(self, n_features: int = 32000, hidden_sizes: Sequence[int] = (400,), dropout: float = 0.2):
        super().__init__()
        if n_features <= 0 or not hidden_sizes or any(h <= 0 for h in hidden_sizes):
            raise ValueError(f"invalid trunk geometry: n_features={n_features}, hidden_sizes={hidden_sizes}")
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

    def __init__(
        self, n_features: int = 32000, hidden_sizes: Sequence[int] = (400,), dropout: float = 0.2, seed: int | None = 0
    ):
        """``seed`` fixes the initial trunk (None: torch's global generator), so that a job's run repeats exactly:
        the server builds this model once per run, and an unseeded start made two runs of a job differ."""
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.trunk = Trunk(n_features, hidden_sizes, dropout)


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
        hidden_sizes: Sequence[int] = (400,),
        dropout: float = 0.2,
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


def trunk_geometry(weights: Mapping[str, np.ndarray]) -> tuple[int, list[int]]:
    """(n_features, hidden_sizes) of a trunk state dict, so a client builds the model the server holds."""
    try:
        n_features, first = np.shape(weights["trunk.input.weight"])
    except KeyError as err:
        raise ValueError("trunk weights lack 'trunk.input.weight'") from err
    hidden = [int(first)]
    index = 2  # layers: ReLU, Dropout, Linear, ReLU, Dropout, Linear, ...
    while f"trunk.layers.{index}.weight" in weights:
        hidden.append(int(np.shape(weights[f"trunk.layers.{index}.weight"])[0]))
        index += 3
    return int(n_features), hidden
