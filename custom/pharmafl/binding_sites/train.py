"""Local training of ESM-2 + LoRA for per-residue binding-site prediction, shared by executors and baselines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import peft
import torch
from transformers import EsmTokenizer

from pharmafl.binding_sites.formats import Chain
from pharmafl.binding_sites.model import IGNORE_INDEX, LoRASettings, encode_chains, load_lora_state, lora_state
from pharmafl.core.errors import InputError
from pharmafl.core.metrics import token_metrics
from pharmafl.core.progress import StepCallback
from pharmafl.privacy.dp_sgd import DPConfig, GhostClipper, PrivacyBudget

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
DELTA_SUFFIX = ".delta"
CLASS_WEIGHTS = ("balanced", "none")


@dataclass
class BindingSiteConfig:
    """Local training hyper-parameters.

    ``grad_clip`` is the max gradient norm (0 turns clipping off); ``grad_noise_std`` adds N(0, std^2) noise to every
    trainable gradient after clipping (0 = none; noise on the batch's clipped gradient bounds no chain's influence:
    DP-SGD is the ``dp`` settings, and neither applies under it); ``seed`` drives batch sampling and the noise.
    ``class_weight`` ``balanced`` weighs the cross-entropy of each class by n_residues / (2 n_class) over the site's
    training chains (scikit-learn's ``balanced``, as in the public ESM-2 LoRA binding-site recipe): with ~5% binding
    residues an unweighted loss predicts "not binding" everywhere for a long time. ``none`` is the plain
    cross-entropy.
    """

    learning_rate: float = 1e-3
    batch_size: int = 8
    local_steps: int = 20
    max_length: int = 1000
    grad_clip: float = 1.0
    grad_noise_std: float = 0.0
    seed: int = 0
    class_weight: str = "balanced"

    def __post_init__(self) -> None:
        if self.class_weight not in CLASS_WEIGHTS:
            raise InputError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, got '{self.class_weight}'.")
        if self.learning_rate <= 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {self.batch_size}.")
        if self.local_steps < 0:
            raise InputError(f"local_steps must not be negative, got {self.local_steps}.")
        if self.grad_clip < 0:
            raise InputError(f"grad_clip must be 0 (off) or positive, got {self.grad_clip}.")
        if self.grad_noise_std < 0:
            raise InputError(f"grad_noise_std must not be negative, got {self.grad_noise_std}.")


#: the setting groups of an ESM-2 LoRA job's executor (``training: {...}``, ``lora: {...}``, ``dp: {...}``)
SETTINGS = {"training": BindingSiteConfig, "lora": LoRASettings, "dp": DPConfig}


def check_private(config: BindingSiteConfig, dp: DPConfig | None) -> None:
    """Refuse settings that cannot go with DP-SGD."""
    if dp is not None and dp.enabled and config.grad_noise_std > 0:
        raise InputError("training.grad_noise_std cannot be combined with DP-SGD (the dp settings); set it to 0.")


class BindingSiteTrainer:
    """Trains the trainable part (LoRA factors + classifier) of a PEFT ESM-2 token classifier on protein chains.

    The optimiser is created once, so its moments carry over between federated rounds.

    With ``dp`` (DP-SGD, the privacy unit one protein chain) each step is a Poisson sample of the training chains
    (rate ``batch_size`` / chains), each chain's gradient is clipped to ``dp.max_grad_norm`` and Gaussian noise is
    added to every trainable parameter; ``grad_clip`` is then unused. Every trainable parameter must sit in an
    ``nn.Linear`` (the LoRA factors and the token classifier do; LoRA on another kind of layer is refused). A DP
    epoch is one round of ``local_steps`` steps: ``dp.epochs`` counts the rounds the budget is planned over.
    The class weights (``class_weight balanced``) are counted from the training chains outside the guarantee.
    """

    def __init__(
        self,
        model: peft.PeftModel,
        tokenizer: EsmTokenizer,
        train_chains: Sequence[Chain],
        config: BindingSiteConfig | None = None,
        dp: DPConfig | None = None,
    ):
        if not train_chains:
            raise InputError("no training chains: the site's train.jsonl is empty.")
        self.model = model
        self.tokenizer = tokenizer
        self.chains = list(train_chains)
        self.config = config or BindingSiteConfig()
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=self.config.learning_rate)
        self.rng = np.random.default_rng(self.config.seed)
        self.noise = torch.Generator().manual_seed(self.config.seed)
        self.steps_done = 0
        self.last_loss = float("nan")
        self.loss_weights = class_weights(self.chains) if self.config.class_weight == "balanced" else None
        check_private(self.config, dp)
        self.dp = dp if dp is not None and dp.enabled else None
        self.clipper, self.budget = None, None
        if self.dp:
            self.clipper = GhostClipper(model, self.dp)
            self.budget = PrivacyBudget(
                self.dp, len(self.chains), self.config.batch_size, steps_per_epoch=self.config.local_steps or None
            )

    def train(
        self,
        steps: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress: StepCallback | None = None,
    ) -> int:
        """Run ``steps`` (default ``config.local_steps``) optimiser steps on random batches; returns steps taken.

        ``progress(done, total, loss)`` is called after every step."""
        steps = self.config.local_steps if steps is None else steps
        if self.budget is not None:
            return self._train_private(steps, should_stop, progress)
        size = min(self.config.batch_size, len(self.chains))
        self.model.train()
        done = 0
        for _ in range(steps):
            if should_stop():
                break
            picked = [self.chains[i] for i in self.rng.choice(len(self.chains), size=size, replace=False)]
            batch = encode_chains(
                self.tokenizer, [c.sequence for c in picked], [c.labels for c in picked], self.config.max_length
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(batch)
            loss.backward()
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
            if self.config.grad_noise_std > 0:
                for parameter in self.parameters:
                    if parameter.grad is not None:
                        noise = torch.randn(parameter.grad.shape, generator=self.noise, dtype=parameter.grad.dtype)
                        parameter.grad.add_(noise * self.config.grad_noise_std)
            self.optimizer.step()
            self.last_loss = float(loss.detach())
            done += 1
            if progress:
                progress(done, steps, self.last_loss)
        self.steps_done += done
        return done

    def _train_private(self, steps: int, should_stop: Callable[[], bool], progress: StepCallback | None) -> int:
        """DP-SGD: ``steps`` Poisson-sampled batches of chains, each chain's gradient clipped, noise added; stops
        when the privacy budget is spent."""
        self.model.train()
        budget, done = self.budget, 0
        for picked in budget.poisson_batches(np.arange(len(self.chains)), self.rng, steps):
            if should_stop() or budget.exhausted:
                break
            loss = self.clipper.step(
                lambda picked=picked: self.per_chain_losses([self.chains[i] for i in picked]),
                self.optimizer,
                budget.expected_batch_size,
                budget.noise_multiplier,
            )
            budget.steps += 1
            done += 1
            if np.isfinite(loss):  # an empty Poisson batch has no loss: the step was noise alone
                self.last_loss = loss
            if progress:
                progress(done, steps, loss)
        self.steps_done += done
        return done

    def per_chain_losses(self, chains: Sequence[Chain]) -> torch.Tensor:
        """Each chain's cross-entropy, class-weighted as in training, averaged over its residues: the loss of one
        record, the DP privacy unit (an empty list gives an empty tensor)."""
        if not chains:
            return torch.zeros(0)
        batch = encode_chains(
            self.tokenizer, [c.sequence for c in chains], [c.labels for c in chains], self.config.max_length
        )
        labels = batch.pop("labels")
        logits = self.model(**batch).logits.float()
        real = labels != IGNORE_INDEX
        target = torch.where(real, labels, 0)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        weight = real.float() if self.loss_weights is None else self.loss_weights[target] * real
        return (nll * weight).sum(1) / weight.sum(1).clamp(min=torch.finfo(weight.dtype).tiny)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_weights is None:
            return self.model(**batch).loss
        labels = batch["labels"]
        logits = self.model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            weight=self.loss_weights,
            ignore_index=IGNORE_INDEX,
        )

    @torch.no_grad()
    def evaluate(self, chains: Sequence[Chain], batch_size: int = 16) -> dict[str, float]:
        """Token-level metrics over real residues (special tokens and padding excluded) plus ``loss``."""
        if not chains:
            raise InputError("no chains to evaluate on.")
        self.model.eval()
        labels, scores, losses, weights = [], [], [], []
        for start in range(0, len(chains), batch_size):
            part = chains[start : start + batch_size]
            batch = encode_chains(
                self.tokenizer, [c.sequence for c in part], [c.labels for c in part], self.config.max_length
            )
            out = self.model(**batch)
            real = batch["labels"] != IGNORE_INDEX
            probabilities = torch.softmax(out.logits.float(), dim=-1)[..., 1]
            labels.append(batch["labels"][real].numpy())
            scores.append(probabilities[real].numpy())
            losses.append(float(out.loss))
            weights.append(int(real.sum()))
        metrics = token_metrics(np.concatenate(labels), np.concatenate(scores))
        metrics["loss"] = float(np.average(losses, weights=weights))
        metrics["residues"] = float(sum(weights))
        return metrics

    def state(self) -> dict[str, np.ndarray]:
        """The trainable state (LoRA factors + classifier) under ``lora_state`` names."""
        return lora_state(self.model)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        load_lora_state(self.model, state)

    def reset_optimizer(self) -> None:
        """Forget AdamW's moments: they belong to the coordinates of the factors they were built on."""
        self.optimizer = torch.optim.AdamW(self.parameters, lr=self.config.learning_rate)

    def delta_state(self) -> dict[str, np.ndarray]:
        """Per LoRA module the full update ``B @ A`` as ``<module>.delta``; other trainable entries as they are.

        The delta does NOT include PEFT's ``alpha / r`` scaling: it is the product of the stored factors, so that
        ``fra_lora_from_deltas`` refactorises the aggregated delta into ``lora_B``/``lora_A`` with the same
        convention (the model applies ``alpha / r`` on top, as for any loaded factors).
        """
        return delta_from_factors(self.state())


def class_weights(chains: Sequence[Chain]) -> torch.Tensor:
    """scikit-learn's ``balanced`` weights for (not binding, binding) over all residues of ``chains``.

    Chains that show only one class get equal weights: there is nothing to balance.
    """
    residues = sum(len(chain.labels) for chain in chains)
    positives = sum(chain.positives for chain in chains)
    counts = np.array([residues - positives, positives], dtype=float)
    weights = residues / (2 * counts) if counts.min() > 0 else np.ones(2)
    return torch.tensor(weights, dtype=torch.float32)


def delta_from_factors(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``<module>.lora_A.weight`` / ``.lora_B.weight`` pairs become ``<module>.delta = B @ A``; other keys pass."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.endswith(LORA_A_SUFFIX):
            module = key.removesuffix(LORA_A_SUFFIX)
            b_key = module + LORA_B_SUFFIX
            if b_key not in state:
                raise ValueError(f"LoRA state has {key} but no {b_key}")
            out[module + DELTA_SUFFIX] = np.asarray(state[b_key]) @ np.asarray(value)
        elif not key.endswith(LORA_B_SUFFIX):
            out[key] = np.asarray(value)
    return out
