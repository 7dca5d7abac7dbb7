"""DP-SGD at a site: Poisson-sampled batches, per-record clipping, Gaussian noise and an (epsilon, delta) budget.

One implementation for every trainer (multi-task trunk, ESM-2 LoRA, eICU). Per-record gradient norms come from
the layers' inputs and output gradients ("ghost clipping", Li et al. 2022, as Opacus's fast gradient clipping),
never from materialised per-record gradients: for the multi-task trunk's sparse 32,000 x 400 input layer a
record's gradient is its output gradient copied into the rows of its on-bits, so its squared norm is
(number of on-bits) x |output gradient|^2. A second backward pass of the loss weighted by each record's clipping
factor gives the sum of clipped gradients; Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added to
every trainable parameter (dense: noise only where the batch's bits are would tell which bits it held), and the
sum is divided by the expected batch size, as Opacus does.

Supported trainable layers: ``nn.Linear`` (inputs of shape (B, d) or (B, T, d)), ``nn.EmbeddingBag`` in sum mode,
and a bias added right after an EmbeddingBag (``tied_biases``). Any other trainable parameter is refused when the
clipper is built, so a model with a layer this code cannot clip never trains without a guarantee.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pharmafl.core.errors import InputError
from pharmafl.privacy import accounting


@dataclass
class DPConfig:
    """DP-SGD settings: an executor's ``dp`` group, a baseline's ``--set dp.NAME=VALUE``.

    DP is on when ``target_epsilon`` or ``noise_multiplier`` is set. With ``target_epsilon`` alone the noise is
    calibrated so that ``epochs`` epochs (the job's rounds x local epochs; the job builder fills it in) spend
    exactly the budget; with both, the given noise is used and training stops when the budget is spent. With
    ``noise_multiplier`` alone training never stops and epsilon is only reported. ``delta`` defaults to 1/N for
    a site of N training records.
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    epochs: int | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise InputError(f"dp.target_epsilon must be a positive number, got {self.target_epsilon}.")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise InputError(f"dp.noise_multiplier must be a positive number, got {self.noise_multiplier}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise InputError(f"dp.max_grad_norm must be a positive number, got {self.max_grad_norm}.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise InputError(f"dp.delta must be in (0, 1), got {self.delta}.")
        if self.accountant not in accounting.ACCOUNTANTS:
            raise InputError(
                f"dp.accountant must be one of {', '.join(accounting.ACCOUNTANTS)}, got {self.accountant}."
            )
        if self.epochs is not None and self.epochs <= 0:
            raise InputError(f"dp.epochs must be positive, got {self.epochs}.")
        if self.target_epsilon is not None and self.noise_multiplier is None and self.epochs is None:
            raise InputError("dp.target_epsilon without dp.noise_multiplier needs dp.epochs to calibrate the noise.")

    @property
    def enabled(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None


class PrivacyBudget:
    """One site's DP-SGD mechanism and what it has spent: sample rate, noise, delta, steps taken."""

    def __init__(self, config: DPConfig, n_records: int, batch_size: int, steps_per_epoch: int | None = None):
        if not config.enabled:
            raise ValueError("PrivacyBudget needs a DPConfig with target_epsilon or noise_multiplier")
        if n_records <= 0:
            raise InputError("DP-SGD needs at least one training record.")
        self.config = config
        self.n_records = n_records
        self.sample_rate = min(1.0, batch_size / n_records)
        self.expected_batch_size = self.sample_rate * n_records
        self.steps_per_epoch = steps_per_epoch or max(1, round(1 / self.sample_rate))
        self.delta = config.delta if config.delta is not None else 1.0 / n_records
        if config.noise_multiplier is not None:
            self.noise_multiplier = config.noise_multiplier
        else:
            self.noise_multiplier = accounting.noise_for_epsilon(
                config.target_epsilon,
                self.delta,
                self.sample_rate,
                config.epochs * self.steps_per_epoch,
                config.accountant,
            )
        self.max_steps = (
            accounting.steps_within(
                config.target_epsilon, self.noise_multiplier, self.sample_rate, self.delta, config.accountant
            )
            if config.target_epsilon is not None
            else None
        )
        self.steps = 0

    @property
    def exhausted(self) -> bool:
        """No further step fits in the budget."""
        return self.max_steps is not None and self.steps >= self.max_steps

    @property
    def epsilon(self) -> float:
        return accounting.epsilon(
            self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.config.accountant
        )

    def summary(self) -> dict:
        """What a report, the model's metadata and TensorBoard show: the guarantee and what was spent."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.config.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "max_steps": self.max_steps,
            "exhausted": self.exhausted,
            "accountant": self.config.accountant,
            "privacy_unit": "one training record of this site",
            "sampling": "Poisson",
        }

    def state(self) -> dict:
        return {"steps": self.steps, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}

    def load_state(self, state: Mapping) -> None:
        """Resume a site's spending (a restarted run must not forget what it spent)."""
        if not math.isclose(state["noise_multiplier"], self.noise_multiplier) or not math.isclose(
            state["sample_rate"], self.sample_rate
        ):
            raise InputError("the saved privacy state was spent with another noise or sample rate; start a new run.")
        self.steps = int(state["steps"])

    def poisson_batches(self, rows: np.ndarray, rng: np.random.Generator, steps: int):
        """``steps`` batches, each row in each independently with probability ``sample_rate`` (may be empty)."""
        for _ in range(steps):
            yield rows[rng.random(len(rows)) < self.sample_rate]


class _Record:
    """Forward inputs and output gradients of one layer during the norm pass."""

    __slots__ = ("inputs", "output", "grad")

    def __init__(self):
        self.inputs, self.output, self.grad = None, None, None


class GhostClipper:
    """Per-record gradient norms of a model's trainable parameters, from layer hooks, and DP-SGD steps.

    Args:
        model: the model; every trainable parameter must belong to a supported layer (see the module docstring).
        config: the DP settings (max_grad_norm).
        tied_biases: a bias parameter added to an EmbeddingBag's output, by that EmbeddingBag.
    """

    def __init__(self, model: nn.Module, config: DPConfig, tied_biases: Mapping[nn.Module, nn.Parameter] = ()):
        self.model = model
        self.config = config
        self.tied_biases = dict(tied_biases)
        covered: set[int] = {id(p) for p in self.tied_biases.values()}
        self.layers: list[nn.Module] = []
        for module in model.modules():
            if not isinstance(module, nn.Linear | nn.EmbeddingBag):
                continue
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(module, nn.EmbeddingBag) and module.mode != "sum":
                raise InputError(f"DP-SGD clips EmbeddingBag layers in sum mode only, got mode {module.mode!r}.")
            self.layers.append(module)
            covered.update(id(p) for p in own)
        uncovered = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if uncovered:
            raise InputError(f"DP-SGD cannot clip these trainable parameters per record: {', '.join(uncovered)}.")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.records = {module: _Record() for module in self.layers}
        self.recording = False
        # seeded from the OS's entropy, never from the job's (public) seed: whoever knows the seed could subtract the
        # noise. torch's CPU generator is no CSPRNG (as Opacus without secure_mode); see docs/SECURITY.md.
        self.noise = torch.Generator().manual_seed(secrets.randbits(63))
        for module in self.layers:
            module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, inputs, output) -> None:
        if not (self.recording and torch.is_grad_enabled()):
            return
        record = self.records[module]
        record.inputs = tuple(x.detach() if torch.is_tensor(x) else x for x in inputs)
        record.output = output

    def per_record_norms(self, losses: torch.Tensor) -> torch.Tensor:
        """The L2 norm of each record's gradient of ``losses`` (one loss per record), over all trainable parameters.

        ``losses`` must come from a forward pass run inside ``recording()``; its graph is kept for the second pass.
        """
        batch = losses.shape[0]
        squared = torch.zeros(batch, dtype=torch.float64)
        # the gradients of the layers' outputs only: no parameter gradient is computed in this pass
        used = [r for r in self.records.values() if r.output is not None and r.output.requires_grad]
        grads = torch.autograd.grad(losses.sum(), [r.output for r in used], retain_graph=True, allow_unused=True)
        for record, grad in zip(used, grads, strict=True):
            record.grad = grad
        for module, record in self.records.items():
            if record.grad is None:  # the layer took no part in this loss
                continue
            squared += self._layer_norms(module, record, batch)
        return squared.sqrt()

    def _layer_norms(self, module: nn.Module, record: _Record, batch: int) -> torch.Tensor:
        grad = record.grad.double()
        if isinstance(module, nn.EmbeddingBag):
            indices, offsets = record.inputs[0], record.inputs[1]
            if len(record.inputs) > 2 and record.inputs[2] is not None:
                raise InputError("DP-SGD does not clip EmbeddingBag layers with per-sample weights.")
            bag = torch.bucketize(torch.arange(len(indices)), offsets[1:], right=True)
            # each row of a bag's distinct indices gets count x the bag's output gradient
            keys, counts = torch.unique(bag * module.num_embeddings + indices, return_counts=True)
            owner = keys // module.num_embeddings
            count_sq = torch.zeros(batch, dtype=torch.float64).index_add_(0, owner, counts.double() ** 2)
            out_sq = grad.pow(2).sum(1)
            norms = count_sq * out_sq if module.weight.requires_grad else torch.zeros(batch, dtype=torch.float64)
            if module in self.tied_biases:
                norms = norms + out_sq
            return norms
        activations = record.inputs[0].double()
        norms = torch.zeros(batch, dtype=torch.float64)
        if grad.dim() == 2:
            if module.weight.requires_grad:
                norms += grad.pow(2).sum(1) * activations.pow(2).sum(1)
            if module.bias is not None and module.bias.requires_grad:
                norms += grad.pow(2).sum(1)
            return norms
        grad, activations = grad.flatten(1, -2), activations.flatten(1, -2)  # (B, T, .) for any sequence shape
        if module.weight.requires_grad:
            steps, d_in, d_out = activations.shape[1], activations.shape[2], grad.shape[2]
            if d_in * d_out <= steps * steps:  # the per-record gradient itself is the smaller object
                norms += torch.einsum("bte,btd->bed", grad, activations).pow(2).sum((1, 2))
            else:
                norms += (
                    torch.bmm(activations, activations.transpose(1, 2)) * torch.bmm(grad, grad.transpose(1, 2))
                ).sum((1, 2))
        if module.bias is not None and module.bias.requires_grad:
            norms += grad.sum(1).pow(2).sum(1)
        return norms

    def recording_pass(self):
        """Context manager: record the layers' inputs and output gradients for the next forward pass."""
        clipper = self

        class _Recording:
            def __enter__(self):
                for record in clipper.records.values():
                    record.inputs, record.output, record.grad = None, None, None
                clipper.recording = True

            def __exit__(self, *exc):
                clipper.recording = False

        return _Recording()

    def step(
        self,
        per_record_losses: Callable[[], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        expected_batch_size: float,
        noise_multiplier: float,
    ) -> float:
        """One DP-SGD step: clip each record's gradient to max_grad_norm, sum, add noise, average, step.

        ``per_record_losses()`` runs the forward pass and returns one loss per record (an empty batch may return an
        empty tensor: the step is then noise alone, as the accountant assumes). Returns the batch's mean loss.
        """
        clip = self.config.max_grad_norm
        optimizer.zero_grad(set_to_none=True)
        with self.recording_pass():
            losses = per_record_losses()
        if losses.numel():
            norms = self.per_record_norms(losses)
            factors = (clip / (norms + 1e-6)).clamp(max=1.0).to(losses.dtype)
            for p in self.parameters:
                p.grad = None
            torch.autograd.backward((losses * factors.detach()).sum(), inputs=self.parameters)
        with torch.no_grad():
            for p in self.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
                noise = torch.normal(0.0, noise_multiplier * clip, size=p.shape, generator=self.noise)
                p.grad.add_(noise.to(p.dtype)).div_(expected_batch_size)
        for record in self.records.values():  # the step's graph and activations go with it
            record.inputs, record.output, record.grad = None, None, None
        optimizer.step()
        return float(losses.detach().mean()) if losses.numel() else float("nan")
