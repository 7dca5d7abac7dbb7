"""Properties over the settings: no configuration the encoding accepts can overflow (the weight entry included, for
clip < 1 too), and the secure weighted mean equals the plaintext one within the stated bound."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pharmafl.secure_sum.config import SecureSumConfig
from pharmafl.secure_sum.encoding import choose_fixed_point, decode_sum, encode_weighted
from pharmafl.secure_sum.protocol import RefusedError

sys.path.insert(0, str(Path(__file__).parent))
from secagg_kit import Federation, plaintext_mean  # noqa: E402

clips = st.sampled_from([1e-3, 0.01, 0.25, 0.5, 0.999, 1.0, 1.5, 8.0, 100.0, 1e3])
max_weights = st.sampled_from([0.01, 0.5, 1.0, 7.0, 100.0, 1e3, 1e4, 1e6])
moduli = st.sampled_from([32, 64])
fractions = st.one_of(st.none(), st.integers(min_value=0, max_value=40))


def fixed_point_or_skip(clip, max_weight, clients, fraction_bits, modulus_bits):
    try:
        return choose_fixed_point(clip, max_weight, clients, fraction_bits, modulus_bits)
    except ValueError as err:  # refused with the numbers: nothing to encode
        assert "overflow" in str(err) or "2^52" in str(err)
        assume(False)


@settings(max_examples=300, deadline=None)
@given(clip=clips, max_weight=max_weights, clients=st.integers(1, 64), fraction_bits=fractions, modulus_bits=moduli)
def test_no_accepted_configuration_overflows_at_the_extremes(clip, max_weight, clients, fraction_bits, modulus_bits):
    fixed_point = fixed_point_or_skip(clip, max_weight, clients, fraction_bits, modulus_bits)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        # every entry at its largest magnitude: the weight at max_weight, every value at +-clip (and beyond it)
        one = encode_weighted(np.array([sign * clip, sign * 10 * clip]), 2 * max_weight, fixed_point, rng)
        total = np.zeros_like(one)
        for _ in range(clients):
            np.add(
                total,
                encode_weighted(np.array([sign * clip, sign * 10 * clip]), max_weight, fixed_point, rng),
                out=total,
            )
        signed = total.view(np.int32 if modulus_bits == 32 else np.int64).astype(np.float64) / fixed_point.scale
        error = fixed_point.sum_error_bound(clients)
        assert abs(signed[0] - clients * max_weight) <= error + 1e-9 * clients * max_weight
        np.testing.assert_allclose(signed[1:], sign * clients * max_weight * clip, atol=error, rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    clip=clips,
    max_weight=max_weights,
    clients=st.integers(1, 16),
    fraction_bits=fractions,
    modulus_bits=moduli,
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_mean_is_within_the_stated_bound(clip, max_weight, clients, fraction_bits, modulus_bits, seed):
    fixed_point = fixed_point_or_skip(clip, max_weight, clients, fraction_bits, modulus_bits)
    rng = np.random.default_rng(seed)
    values = rng.uniform(-clip, clip, (clients, 17))
    weights = rng.uniform(0.01, 1.0, clients) * max_weight
    total = np.zeros(18, dtype=fixed_point.dtype)
    for row, weight in zip(values, weights, strict=True):
        np.add(total, encode_weighted(row, weight, fixed_point, rng), out=total)
    exact = np.average(values, axis=0, weights=weights)
    bound = fixed_point.mean_error_bound(clients, float(weights.sum()), float(np.abs(exact).max()))
    assume(np.isfinite(bound))  # the weights may be below the quantization step
    weight, mean = decode_sum(total, fixed_point)
    assert abs(weight - weights.sum()) <= fixed_point.sum_error_bound(clients) + 1e-9 * weights.sum()
    assert np.abs(mean - exact).max() <= bound * (1 + 1e-9) + 1e-12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 7),
    clip=st.sampled_from([0.25, 0.5, 1.0, 4.0]),
    max_weight=st.sampled_from([1.0, 10.0, 1000.0]),
    fraction_bits=st.one_of(st.none(), st.integers(8, 24)),
    modulus_bits=moduli,
    neighbours=st.sampled_from([None, 0]),
    seed=st.integers(0, 2**32 - 1),
)
# found by hypothesis: overflowing settings were accepted at key setup and refused only at the first mask
@example(n=3, clip=0.25, max_weight=1000.0, fraction_bits=20, modulus_bits=32, neighbours=None, seed=0)
def test_secure_weighted_mean_equals_plaintext_within_the_bound(
    n, clip, max_weight, fraction_bits, modulus_bits, neighbours, seed
):
    config = SecureSumConfig(
        threshold=n // 2 + 1,
        clip=clip,
        max_weight=max_weight,
        fraction_bits=fraction_bits,
        modulus_bits=modulus_bits,
        neighbours=neighbours,
    )
    try:
        fed = Federation(n, config)
    except (ValueError, RefusedError) as err:  # an overflowing configuration is refused with the numbers
        assert "overflow" in str(err) or "2^52" in str(err)
        assume(False)
    rng = np.random.default_rng(seed)
    updates = {s: {"w": rng.uniform(-clip, clip, (3, 5)).astype(np.float32)} for s in fed.sites}
    weights = {s: float(rng.uniform(0.2, 1.0) * max_weight) for s in fed.sites}
    uploaders = fed.sites[1:] if n > 3 else fed.sites  # one dropout when the threshold allows it
    result = fed.run_round(0, updates, weights, upload=uploaders)
    exact = plaintext_mean(updates, weights, uploaders)["w"]
    total = sum(weights[s] for s in uploaders)
    fixed_point = fed.server.fixed_point
    bound = fixed_point.mean_error_bound(len(uploaders), total, float(np.abs(exact).max()))
    bound += np.finfo(np.float32).eps * float(np.abs(exact).max())  # the mean comes back in the upload's float32
    assert result.total_weight == pytest.approx(total, abs=fixed_point.sum_error_bound(len(uploaders)))
    assert np.abs(result.mean["w"] - exact).max() <= bound


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    size=st.integers(1, 50),
    data=st.data(),
)
def test_any_nan_or_inf_is_refused_at_the_site(dtype, bad, size, data):
    fed = _small_federation()
    position = data.draw(st.integers(0, size - 1))
    update = np.zeros(size, dtype=dtype)
    update[position] = bad
    round_number = data.draw(st.integers(0, 3))
    with pytest.raises(RefusedError, match="NaN or Inf"):
        fed.clients["site-1"].mask({"x": update}, 1.0, round_number, fed.sites)


_FEDERATION = []


def _small_federation():
    if not _FEDERATION:
        _FEDERATION.append(Federation(3, SecureSumConfig(threshold=2)))
    return _FEDERATION[0]
