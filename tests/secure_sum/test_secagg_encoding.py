import numpy as np
import pytest

from pharmafl.secure_sum.encoding import FixedPoint, choose_fixed_point, decode_sum, encode_weighted


def modular_sum(vectors):
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        np.add(total, vector, out=total)
    return total


@pytest.mark.parametrize("modulus_bits", [32, 64])
def test_weighted_mean_within_the_stated_bound(modulus_bits):
    rng = np.random.default_rng(1)
    for trial in range(40):
        clients = int(rng.integers(1, 12))
        size = int(rng.integers(1, 3000))
        clip = float(rng.choice([0.5, 1.0, 8.0]))
        max_weight = 100.0 if modulus_bits == 64 else 10.0
        fixed_point = choose_fixed_point(clip, max_weight, clients, modulus_bits=modulus_bits)
        values = [rng.uniform(-clip, clip, size) for _ in range(clients)]
        weights = rng.uniform(0.5, max_weight, clients)
        total = modular_sum([encode_weighted(v, w, fixed_point, rng) for v, w in zip(values, weights, strict=True)])
        weight, mean = decode_sum(total, fixed_point)
        exact = np.average(np.stack(values), axis=0, weights=weights)
        bound = fixed_point.mean_error_bound(clients, weights.sum(), np.abs(exact).max())
        assert abs(weight - weights.sum()) <= fixed_point.sum_error_bound(clients), trial
        assert np.abs(mean - exact).max() <= bound, (trial, np.abs(mean - exact).max(), bound)


def test_stochastic_rounding_is_unbiased():
    fixed_point = FixedPoint(clip=1.0, max_weight=1.0, fraction_bits=2, modulus_bits=32, max_clients=1)
    value = np.full(200_000, 0.1)  # 0.1 * 4 = 0.4 units: rounds to 0 or 1 unit
    encoded = encode_weighted(value, 1.0, fixed_point, np.random.default_rng(0)).view(np.int32)[1:]
    assert set(np.unique(encoded)) == {0, 1}
    assert abs(encoded.mean() / 4 - 0.1) < 0.002


def test_values_are_clipped():
    fixed_point = choose_fixed_point(1.0, 1.0, 1)
    _, mean = decode_sum(encode_weighted(np.array([5.0, -7.0, 0.25]), 1.0, fixed_point), fixed_point)
    np.testing.assert_allclose(mean, [1.0, -1.0, 0.25], atol=1e-9)


def test_overflowing_configuration_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"could overflow: 64 clients .* 2\^31"):
        FixedPoint(clip=8.0, max_weight=1000.0, fraction_bits=16, modulus_bits=32, max_clients=64)
    with pytest.raises(ValueError, match="overflow"):
        choose_fixed_point(clip=1e6, max_weight=1e6, max_clients=10**6, fraction_bits=10, modulus_bits=64)
    # the same numbers fit in 64 bits
    assert choose_fixed_point(8.0, 1000.0, 64, fraction_bits=16).modulus_bits == 64


def test_chosen_configuration_never_overflows_at_the_extremes():
    fixed_point = choose_fixed_point(clip=4.0, max_weight=50.0, max_clients=7, modulus_bits=32)
    extreme = [encode_weighted(np.array([4.0, -4.0]), 50.0, fixed_point) for _ in range(7)]
    weight, mean = decode_sum(modular_sum(extreme), fixed_point)
    assert weight == pytest.approx(350.0, abs=fixed_point.sum_error_bound(7))
    np.testing.assert_allclose(mean, [4.0, -4.0], atol=1e-3)


def test_bad_weight_is_refused():
    fixed_point = choose_fixed_point(1.0, 1.0, 1)
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            encode_weighted(np.zeros(3), weight, fixed_point)


def test_fraction_bits_beyond_float64_rounding_are_refused():
    with pytest.raises(ValueError, match="below 2\\^52"):
        FixedPoint(clip=8.0, max_weight=1e4, fraction_bits=40, modulus_bits=64, max_clients=2)
    assert choose_fixed_point(8.0, 1e4, 2).entry_bound < 2**52
