import math

import numpy as np
import pytest
import torch
from transformers import EsmConfig, EsmTokenizer

from pharmafl.binding_sites.dataset import load_client
from pharmafl.binding_sites.formats import Chain
from pharmafl.binding_sites.model import LoRASettings, build_esm_lora_from_config, encode_chains
from pharmafl.binding_sites.train import BindingSiteConfig, BindingSiteTrainer, class_weights
from pharmafl.core.errors import InputError
from pharmafl.core.metrics import token_metrics

RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def chains(gpsite_small) -> list[Chain]:
    return load_client(str(gpsite_small / "site-1"), "train")[:16]


@pytest.fixture(scope="module")
def tokenizer(esm_vocab_file) -> EsmTokenizer:
    return EsmTokenizer(vocab_file=str(esm_vocab_file))


def make_trainer(tiny_esm_config, tokenizer, chains, **overrides) -> BindingSiteTrainer:
    geometry = {k: v for k, v in tiny_esm_config.items() if k != "vocab_file"}
    model = build_esm_lora_from_config(EsmConfig(**geometry), LoRASettings(rank=RANK, alpha=ALPHA, dropout=0.0))
    settings = {"learning_rate": 1e-2, "batch_size": 4, "local_steps": 10, "max_length": 64, "seed": 0, **overrides}
    return BindingSiteTrainer(model, tokenizer, chains, BindingSiteConfig(**settings))


def test_training_lowers_the_loss_and_moves_only_trainable_weights(tiny_esm_config, tokenizer, chains):
    # evaluate() reports the plain cross-entropy, so train on that one here
    trainer = make_trainer(tiny_esm_config, tokenizer, chains, class_weight="none")
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before_state = trainer.state()
    loss_before = trainer.evaluate(chains)["loss"]
    assert trainer.train(steps=30) == 30
    loss_after = trainer.evaluate(chains)["loss"]
    assert loss_after < loss_before
    after_state = trainer.state()
    lora_b = [k for k in before_state if k.endswith(".lora_B.weight")]
    assert all(np.abs(before_state[k]).sum() == 0 for k in lora_b)  # PEFT starts B at zero ...
    assert all(np.abs(after_state[k]).sum() > 0 for k in lora_b)  # ... and training moved every one
    for name, parameter in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name


def test_should_stop_ends_training_early(tiny_esm_config, tokenizer, chains):
    trainer = make_trainer(tiny_esm_config, tokenizer, chains)
    assert trainer.train(steps=5, should_stop=lambda: True) == 0
    assert trainer.steps_done == 0


def test_gradient_noise_changes_the_result(tiny_esm_config, tokenizer, chains):
    plain = make_trainer(tiny_esm_config, tokenizer, chains, local_steps=3)
    again = make_trainer(tiny_esm_config, tokenizer, chains, local_steps=3)
    noisy = make_trainer(tiny_esm_config, tokenizer, chains, local_steps=3, grad_noise_std=1e-2)
    for trainer in (plain, again, noisy):
        torch.manual_seed(0)  # the base model's dropout draws from torch's global generator
        trainer.train()
    a, b, c = plain.state(), again.state(), noisy.state()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seed, no noise: reproducible
    assert any(not np.allclose(a[k], c[k]) for k in a)


def test_token_metrics_on_a_hand_made_case():
    y = np.array([1, 1, 0, 0, 0])
    s = np.array([0.9, 0.4, 0.6, 0.2, 0.1])  # at 0.5: TP=1, FN=1, FP=1, TN=2
    m = token_metrics(y, s)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(1 / 2)
    assert m["mcc"] == pytest.approx((1 * 2 - 1 * 1) / math.sqrt(2 * 2 * 3 * 3))
    assert m["auc_roc"] == pytest.approx(5 / 6)  # positives outrank 5 of the 6 (pos, neg) pairs
    one_class = token_metrics(np.zeros(3), np.array([0.1, 0.7, 0.2]))
    assert math.isnan(one_class["auc_roc"])
    assert one_class["precision"] == 0.0 and one_class["f1"] == 0.0


def test_evaluate_counts_only_real_residues(tiny_esm_config, tokenizer):
    trainer = make_trainer(tiny_esm_config, tokenizer, [Chain("x", "MKTAY", np.zeros(5, np.int8), "t")])
    chains = [
        Chain("a", "MKTAYIAK", np.array([0, 1, 1, 0, 0, 1, 0, 1], np.int8), "t"),
        Chain("b", "GSV", np.array([1, 0, 1], np.int8), "t"),
    ]
    metrics = trainer.evaluate(chains, batch_size=2)
    assert metrics["residues"] == 11  # not 2 x 10 tokens: <cls>, <eos> and padding are left out
    # Same numbers as scoring the real residues by hand.
    batch = encode_chains(tokenizer, [c.sequence for c in chains], [c.labels for c in chains], 64)
    with torch.no_grad():
        probabilities = torch.softmax(trainer.model.eval()(**batch).logits, -1)[..., 1]
    real = batch["labels"] != -100
    expected = token_metrics(batch["labels"][real].numpy(), probabilities[real].numpy())
    assert metrics["auc_roc"] == pytest.approx(expected["auc_roc"])
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])


def test_delta_state_is_the_unscaled_product_of_the_factors(tiny_esm_config, tokenizer, chains):
    trainer = make_trainer(tiny_esm_config, tokenizer, chains, local_steps=3)
    trainer.train()
    state, delta = trainer.state(), trainer.delta_state()
    modules = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    assert len(modules) == 6  # query, key, value in 2 layers
    others = {k for k in state if ".lora_" not in k}
    assert set(delta) == {m + ".delta" for m in modules} | others
    for module in modules:
        np.testing.assert_allclose(
            delta[module + ".delta"], state[module + ".lora_B.weight"] @ state[module + ".lora_A.weight"]
        )
    for key in others:
        np.testing.assert_array_equal(delta[key], state[key])
    # The model applies alpha / r on top of B @ A: the LoRA layer's own delta weight is the scaled one.
    layer = trainer.model.base_model.model.esm.encoder.layer[0].attention.self.query
    scaled = layer.get_delta_weight("default").detach().numpy()
    key = next(m for m in modules if m.endswith("layer.0.attention.self.query")) + ".delta"
    np.testing.assert_allclose(scaled, delta[key] * ALPHA / RANK, rtol=1e-5, atol=1e-7)


def test_balanced_class_weights_follow_the_residue_counts():
    chains = [
        Chain("a", "ACDEFGHIKL", np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=np.int8), "x"),
        Chain("b", "ACDEFGHIKL", np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=np.int8), "x"),
    ]
    # 20 residues, 2 binding: 20 / (2 * 18) and 20 / (2 * 2)
    assert class_weights(chains).tolist() == pytest.approx([20 / 36, 5.0])
    negatives_only = [Chain("c", "ACDE", np.zeros(4, dtype=np.int8), "x")]
    assert class_weights(negatives_only).tolist() == [1.0, 1.0]


def test_class_weighting_changes_training_and_unknown_values_are_refused(tiny_esm_config, tokenizer, chains):
    weighted = make_trainer(tiny_esm_config, tokenizer, chains, local_steps=3)
    plain = make_trainer(tiny_esm_config, tokenizer, chains, local_steps=3, class_weight="none")
    weighted.train()
    plain.train()
    assert weighted.loss_weights is not None and weighted.loss_weights[1] > weighted.loss_weights[0]
    assert plain.loss_weights is None
    assert any(not np.allclose(weighted.state()[k], plain.state()[k]) for k in plain.state())
    with pytest.raises(InputError, match="class_weight"):
        BindingSiteConfig(class_weight="inverse")


def test_thresholds_come_from_validation_and_metrics_are_scored_on_test():
    from pharmafl.core.metrics import ranked_metrics, validation_threshold

    # validation: positives score 0.3-0.4, negatives below 0.2 -> the best-F1 threshold is the lowest positive score
    y_val = np.array([0, 0, 0, 1, 1])
    s_val = np.array([0.05, 0.1, 0.2, 0.3, 0.4])
    assert validation_threshold(y_val, s_val) == pytest.approx(0.3)
    assert validation_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5  # no positive: the default
    y_test = np.array([0, 0, 1, 1, 0, 1])
    s_test = np.array([0.1, 0.35, 0.32, 0.9, 0.25, 0.28])
    m = ranked_metrics(y_val, s_val, y_test, s_test)
    predicted = s_test >= 0.3  # 0.35 (a negative), 0.32 and 0.9: two of three positives, one false positive
    assert m["threshold"] == pytest.approx(0.3) and m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["mcc"] == pytest.approx(token_metrics(y_test, predicted.astype(float))["mcc"])
    assert m["auroc"] == pytest.approx(7 / 9) and 0 < m["auprc"] <= 1
