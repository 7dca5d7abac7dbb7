"""DP-SGD: per-record norms and clipped sums against brute force, the accountant against dp-accounting, budgets."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pharmafl.core.errors import InputError
from pharmafl.multitask.model import MultiTaskNet
from pharmafl.privacy import accounting
from pharmafl.privacy.dp_sgd import DPConfig, GhostClipper, PrivacyBudget


def _bags(rng, batch, n_features, max_bits=6, repeats=False):
    indices, offsets = [], []
    for _ in range(batch):
        offsets.append(sum(len(i) for i in indices))
        k = int(rng.integers(1, max_bits))
        indices.append(rng.integers(0, n_features, k) if repeats else rng.choice(n_features, k, replace=False))
    return torch.from_numpy(np.concatenate(indices)).long(), torch.tensor(offsets)


def _brute_force_grads(model, per_record_loss, batch):
    """Each record's gradient over the trainable parameters, one backward per record, flattened."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(batch):
        grads = torch.autograd.grad(per_record_loss(i), params, allow_unused=True)
        flat = [
            (g.to_dense() if g is not None and g.is_sparse else g) if g is not None else torch.zeros_like(p)
            for g, p in zip(grads, params, strict=True)
        ]
        out.append(torch.cat([f.reshape(-1) for f in flat]))
    return torch.stack(out)


@pytest.mark.parametrize("repeats", [False, True])
def test_multitask_norms_equal_brute_force(repeats):
    """The trunk's sparse input layer (with its tied bias), a dense layer and the head: exact per-record norms."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = MultiTaskNet(50, 4, [8, 6], dropout=0.0)
    model.train()
    indices, offsets = _bags(rng, 7, 50, repeats=repeats)
    y = torch.from_numpy(rng.integers(0, 2, (7, 4))).float()
    clipper = GhostClipper(model, DPConfig(noise_multiplier=1.0), {model.trunk.input: model.trunk.input_bias})

    def losses():
        logits = model(indices, offsets)
        return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)

    with clipper.recording_pass():
        per_record = losses()
    norms = clipper.per_record_norms(per_record)
    reference = _brute_force_grads(model, lambda i: losses()[i], 7).norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), reference.double().numpy(), rtol=1e-5)


def test_sequence_linear_norms_equal_brute_force():
    """Linear layers over (B, T, d) inputs, as LoRA factors and a token head see them; both norm formulas."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 20, bias=False), nn.Tanh(), nn.Linear(20, 2))  # 3x20 > T^2: Gram path
    for p in model[0].parameters():
        p.requires_grad_(True)
    x = torch.randn(5, 4, 3)
    target = torch.randint(0, 2, (5, 4))
    clipper = GhostClipper(model, DPConfig(noise_multiplier=1.0))

    def losses():
        logits = model(x)
        return nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)

    with clipper.recording_pass():
        per_record = losses()
    norms = clipper.per_record_norms(per_record)
    reference = _brute_force_grads(model, lambda i: losses()[i], 5).norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), reference.double().numpy(), rtol=1e-5)


def test_step_adds_clipped_sum_and_noise():
    """With tiny noise the step's gradient is the sum of clipped per-record gradients over the batch size."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    x, y = torch.randn(6, 4) * 5, torch.randn(6, 1) * 5
    config = DPConfig(noise_multiplier=1e-9, max_grad_norm=0.5)
    clipper = GhostClipper(model, config)

    def losses():
        return (model(x) - y).pow(2).sum(1)

    per_record = _brute_force_grads(model, lambda i: losses()[i], 6)
    assert (per_record.norm(dim=1) > 0.5).any()  # clipping binds
    clipped = per_record * (0.5 / per_record.norm(dim=1, keepdim=True)).clamp(max=1)
    expected = clipped.sum(0) / 6
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper.step(losses, optimizer, expected_batch_size=6, noise_multiplier=1e-9)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)


def test_noise_reaches_every_parameter_even_for_an_empty_batch():
    """Noise everywhere: an empty Poisson batch still moves every weight, so the update hides which rows trained."""
    model = MultiTaskNet(30, 2, [5], dropout=0.0)
    clipper = GhostClipper(model, DPConfig(noise_multiplier=1.0), {model.trunk.input: model.trunk.input_bias})
    before = model.trunk.input.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper.step(lambda: torch.zeros(0), optimizer, expected_batch_size=4, noise_multiplier=1.0)
    assert (model.trunk.input.weight.detach() != before).all()


def test_unsupported_layer_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(InputError, match="cannot clip these trainable parameters per record: 1.weight, 1.bias"):
        GhostClipper(model, DPConfig(noise_multiplier=1.0))


@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 1000), (0.8, 0.05, 300), (2.0, 0.002, 20000)])
def test_rdp_epsilon_matches_dp_accounting(sigma, q, steps):
    """Opacus's RDP accountant against Google's dp-accounting, an independent implementation of the same bound."""
    import dp_accounting

    delta = 1e-5
    ours = accounting.epsilon(sigma, q, steps, delta, "rdp")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    rdp = dp_accounting.rdp.RdpAccountant()  # other RDP orders and conversion to (epsilon, delta): close, not equal
    rdp.compose(event)
    assert ours == pytest.approx(rdp.get_epsilon(delta), rel=0.02)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    prv = accounting.epsilon(sigma, q, steps, delta, "prv")
    assert prv == pytest.approx(pld.get_epsilon(delta), rel=0.06)  # both near-exact, on their own grids
    assert prv < ours  # RDP is an upper bound


def test_budget_stops_at_target_and_calibrates_noise():
    config = DPConfig(target_epsilon=3.0, epochs=4)
    budget = PrivacyBudget(config, n_records=2000, batch_size=100)
    assert budget.delta == pytest.approx(1 / 2000)
    assert budget.max_steps >= 4 * budget.steps_per_epoch  # the calibrated noise covers the planned epochs
    budget.steps = budget.max_steps
    assert budget.exhausted and budget.epsilon <= 3.0
    budget.steps += 1
    assert budget.epsilon > 3.0


def test_poisson_batches_sample_each_row_with_the_rate():
    budget = PrivacyBudget(DPConfig(noise_multiplier=1.0), n_records=10000, batch_size=500)
    rng = np.random.default_rng(0)
    sizes = [len(b) for b in budget.poisson_batches(np.arange(10000), rng, 200)]
    assert np.mean(sizes) == pytest.approx(500, rel=0.02)
    assert np.std(sizes) == pytest.approx(math.sqrt(10000 * 0.05 * 0.95), rel=0.2)  # binomial, not fixed


def test_unclipped_noise_guarantees_nothing():
    """The Apheris-style grad_noise_std without clipping: no finite epsilon."""
    out = accounting.noise_guarantee(1e-4, steps=600, sample_rate=0.01, delta=1e-5)
    assert math.isinf(out["epsilon"])
    clipped = accounting.noise_guarantee(1e-4, steps=600, sample_rate=0.01, delta=1e-5, max_grad_norm=1.0)
    assert clipped["noise_multiplier"] == pytest.approx(1e-4)
    assert clipped["epsilon"] > 1e3


@pytest.mark.parametrize(
    "values,match",
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier must be a positive"),
        ({"target_epsilon": 2.0}, "needs dp.epochs"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "delta must be in"),
        ({"noise_multiplier": 1.0, "accountant": "gdp2"}, "accountant must be one of"),
    ],
)
def test_bad_settings_are_one_sentence(values, match):
    with pytest.raises(InputError, match=match):
        DPConfig(**values)
