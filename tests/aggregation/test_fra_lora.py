import numpy as np
import pytest

import pharmafl.aggregation.fra_lora as fra
from pharmafl.aggregation.bench import esm2_param_estimate, lora_trainable_params
from pharmafl.aggregation.fra_lora import (
    check_lora_update,
    dense_mean_svd,
    factored_mean_svd,
    find_lora_pairs,
    fra_lora_aggregate,
    fra_lora_from_deltas,
    leading_components,
    module_name,
    naive_factor_average,
    padded_to_rank,
    product_error,
    split_factors,
)


def random_factors(rng, d_out, d_in, ranks, dtype=np.float64):
    Bs = [rng.standard_normal((d_out, r)).astype(dtype) for r in ranks]
    As = [rng.standard_normal((r, d_in)).astype(dtype) for r in ranks]
    return Bs, As


def product(U, S, Vt):
    return (U * S) @ Vt


def true_mean(Bs, As, weights):
    total = float(np.sum(weights))
    return sum(
        w / total * (np.asarray(B, np.float64) @ np.asarray(A, np.float64))
        for w, B, A in zip(weights, Bs, As, strict=True)
    )


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def peft_clients(rng, n, modules=(("q", 24, 20), ("v", 30, 20)), r=4, head=True, dtype=np.float64):
    clients = []
    for _ in range(n):
        factors = {}
        for name, d_out, d_in in modules:
            factors[f"layer.{name}.lora_A.weight"] = rng.standard_normal((r, d_in)).astype(dtype)
            factors[f"layer.{name}.lora_B.weight"] = rng.standard_normal((d_out, r)).astype(dtype)
        if head:
            factors["classifier.weight"] = rng.standard_normal((2, 20)).astype(dtype)
            factors["classifier.bias"] = rng.standard_normal(2).astype(dtype)
        clients.append(factors)
    return clients


# ---- one module: factored vs dense


@pytest.mark.parametrize(
    "d_out, d_in, ranks, rank",
    [
        (60, 50, [4, 4, 4], 4),
        (50, 80, [8] * 5, 8),
        (120, 90, [2, 4, 8, 3], 6),  # clients with different ranks
        (40, 40, [8] * 8, 16),  # n*r > d: the core is capped at d
        (30, 70, [4, 4], 12),  # rank > n*r: zero-padded
    ],
)
@pytest.mark.parametrize("method", ["auto", "qr"])
def test_factored_matches_dense_reconstruction(d_out, d_in, ranks, rank, method):
    rng = np.random.default_rng(d_out + d_in)
    Bs, As = random_factors(rng, d_out, d_in, ranks)
    weights = rng.uniform(0.5, 3.0, len(ranks))
    U, S, Vt = factored_mean_svd(Bs, As, weights, rank, method=method)
    reference = dense_mean_svd(Bs, As, weights, rank)
    assert U.shape == (d_out, rank) and S.shape == (rank,) and Vt.shape == (rank, d_in)
    assert rel(product(U, S, Vt), product(*reference)) < 1e-6
    np.testing.assert_allclose(S, reference[1], rtol=1e-8, atol=1e-10 * reference[1][0])


def test_result_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(1)
    Bs, As = random_factors(rng, 70, 60, [6] * 4)
    weights = [1.0, 2.0, 3.0, 4.0]
    mean = true_mean(Bs, As, weights)
    S_all = np.linalg.svd(mean, compute_uv=False)
    U, S, Vt = factored_mean_svd(Bs, As, weights, 5)
    # Eckart-Young: nothing of rank 5 gets closer than the discarded singular values.
    assert np.linalg.norm(mean - product(U, S, Vt)) ** 2 == pytest.approx(np.sum(S_all[5:] ** 2), rel=1e-9)
    np.testing.assert_allclose(U.T @ U, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(5), atol=1e-10)


@pytest.mark.parametrize(
    "case", ["identical", "zero_client", "zero_A_only", "all_zero", "rank_below_nr", "rectangular"]
)
def test_rank_deficient_stacks(case):
    rng = np.random.default_rng(2)
    d_out, d_in, r = 40, 55, 4
    Bs, As = random_factors(rng, d_out, d_in, [r] * 3)
    rank = 8
    if case == "identical":
        Bs, As = [Bs[0]] * 3, [As[0]] * 3  # mean has rank 4 < 8
    elif case == "zero_client":
        Bs[1], As[1] = np.zeros_like(Bs[1]), np.zeros_like(As[1])
    elif case == "zero_A_only":
        As[2] = np.zeros_like(As[2])
    elif case == "all_zero":
        Bs, As = [np.zeros_like(B) for B in Bs], [np.zeros_like(A) for A in As]
    elif case == "rank_below_nr":
        rank = 3
    elif case == "rectangular":
        Bs, As = random_factors(rng, 90, 17, [r] * 3)
    weights = [1.0, 2.0, 1.5]
    for method in ("auto", "qr"):
        U, S, Vt = factored_mean_svd(Bs, As, weights, rank, method=method)
        assert np.all(np.isfinite(U)) and np.all(np.isfinite(S)) and np.all(np.isfinite(Vt))
        reference = product(*dense_mean_svd(Bs, As, weights, rank))
        if case == "all_zero":
            assert np.all(S == 0) and np.all(product(U, S, Vt) == 0)
        else:
            assert rel(product(U, S, Vt), reference) < 1e-6
    if case == "identical":
        assert np.allclose(S[4:], 0, atol=1e-10 * S[0])


def test_one_client_is_reproduced_exactly():
    rng = np.random.default_rng(3)
    Bs, As = random_factors(rng, 50, 30, [6])
    for rank in (6, 10):
        U, S, Vt = factored_mean_svd(Bs, As, [3.0], rank)
        np.testing.assert_allclose(product(U, S, Vt), Bs[0] @ As[0], atol=1e-10)
        B, A = split_factors(U, S, Vt)
        np.testing.assert_allclose(B @ A, Bs[0] @ As[0], atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.linalg.norm(A, axis=1))  # sqrt(S) on both sides


def test_float32_clients_take_the_fast_path_within_1e5():
    rng = np.random.default_rng(4)
    Bs, As = random_factors(rng, 300, 260, [8] * 6, dtype=np.float32)
    weights = rng.uniform(1, 3, 6)
    stacks = fra._stack(Bs, As, weights)
    result = fra._factored_truncation(stacks, 8, keep_rest=False)
    assert result.path.startswith("gram-float32")
    assert rel(product(result.U, result.S, result.Vt), product(*dense_mean_svd(Bs, As, weights, 8))) < 1e-5


def test_nearly_equal_singular_values_at_the_cut_are_refined_in_float64():
    # sigma_4 and sigma_5 of the mean differ by 1e-4 of sigma_1: which one float32 rounding keeps decides the answer.
    rng = np.random.default_rng(16)
    U, _ = np.linalg.qr(rng.standard_normal((120, 8)))
    V, _ = np.linalg.qr(rng.standard_normal((90, 8)))
    root = np.sqrt(np.array([10.0, 8.0, 6.0, 5.0, 4.999, 3.0, 2.0, 1.0]))
    Bs = [(U[:, half] * root[half]).astype(np.float32) for half in (slice(0, 4), slice(4, 8))]
    As = [(root[half, None] * V[:, half].T).astype(np.float32) for half in (slice(0, 4), slice(4, 8))]
    result = fra._factored_truncation(fra._stack(Bs, As, [1.0, 1.0]), 4, keep_rest=False)
    assert result.path == "gram-float32-refined"
    assert rel(product(result.U, result.S, result.Vt), product(*dense_mean_svd(Bs, As, [1, 1], 4))) < 1e-5


def test_cancelling_clients_fall_back_to_an_accurate_path():
    # Nearly opposite updates: the mean is 1e-3 of the factors' scale, too small for float32 Gram matrices.
    rng = np.random.default_rng(5)
    B, A = rng.standard_normal((200, 8)), rng.standard_normal((8, 150))
    Bs = [B.astype(np.float32), (-B + 1e-3 * rng.standard_normal(B.shape)).astype(np.float32)]
    As = [A.astype(np.float32), (A + 1e-3 * rng.standard_normal(A.shape)).astype(np.float32)]
    result = fra._factored_truncation(fra._stack(Bs, As, [1.0, 1.0]), 8, keep_rest=False)
    assert result.path != "gram-float32"
    assert rel(product(result.U, result.S, result.Vt), product(*dense_mean_svd(Bs, As, [1, 1], 8))) < 1e-6


def test_invalid_rank_method_and_weights():
    rng = np.random.default_rng(6)
    Bs, As = random_factors(rng, 10, 10, [2, 2])
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            factored_mean_svd(Bs, As, [1, 1], rank)
    with pytest.raises(ValueError, match="method"):
        factored_mean_svd(Bs, As, [1, 1], 2, method="svd")
    with pytest.raises(ValueError, match="weight"):
        factored_mean_svd(Bs, As, [1], 2)
    with pytest.raises(ValueError, match="weights"):
        factored_mean_svd(Bs, As, [0, 0], 2)
    with pytest.raises(ValueError, match="factor pair 1"):
        factored_mean_svd([Bs[0], Bs[1][:5]], As, [1, 1], 2)


# ---- named factors: a model


def test_aggregate_matches_per_module_math_and_averages_other_keys():
    rng = np.random.default_rng(7)
    clients = peft_clients(rng, 3)
    weights = [1.0, 3.0, 2.0]
    result = fra_lora_aggregate(clients, weights, rank=4)
    assert list(result.factors) == list(clients[0])  # same keys, same order
    for name in ("q", "v"):
        a_key, b_key = f"layer.{name}.lora_A.weight", f"layer.{name}.lora_B.weight"
        Bs, As = [c[b_key] for c in clients], [c[a_key] for c in clients]
        expected = product(*dense_mean_svd(Bs, As, weights, 4))
        assert result.factors[a_key].shape == (4, 20) and result.factors[b_key].shape[1] == 4
        assert rel(result.factors[b_key] @ result.factors[a_key], expected) < 1e-6
        assert 0.0 <= result.retained_energy[f"layer.{name}"] <= 1.0
    for key in ("classifier.weight", "classifier.bias"):
        expected = np.average([c[key] for c in clients], axis=0, weights=weights)
        np.testing.assert_allclose(result.factors[key], expected, rtol=1e-12)
    assert result.residual is None
    assert set(result.paths) == {"layer.q", "layer.v"}


def test_output_keeps_the_clients_dtype_and_parallel_equals_serial():
    rng = np.random.default_rng(8)
    clients = peft_clients(rng, 4, dtype=np.float32)
    serial = fra_lora_aggregate(clients, [1, 2, 3, 4], rank=4, workers=1)
    parallel = fra_lora_aggregate(clients, [1, 2, 3, 4], rank=4, workers=2)
    for key, value in serial.factors.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, parallel.factors[key], rtol=1e-5, atol=1e-6)


def test_dtypes_name_the_output_dtype_and_the_math_stays_in_float64():
    rng = np.random.default_rng(15)
    clients = peft_clients(rng, 3, dtype=np.float16)
    keys = list(clients[0])
    wanted = {key: np.dtype(np.float32) for key in keys}
    result = fra_lora_aggregate(clients, [1, 2, 3], rank=4, dtypes=wanted, residual_policy="carry")
    assert {key: value.dtype for key, value in result.factors.items()} == wanted
    assert all(value.dtype == np.float32 for value in result.residual.values())
    a_key, b_key = "layer.q.lora_A.weight", "layer.q.lora_B.weight"
    U, S, Vt = dense_mean_svd([c[b_key] for c in clients], [c[a_key] for c in clients], [1, 2, 3], 4)
    # float32 output of a float64 truncation: far closer than a float16 round trip (~1e-3) would allow.
    assert rel(result.factors[b_key].astype(np.float64) @ result.factors[a_key], product(U, S, Vt)) < 1e-5
    unnamed = fra_lora_aggregate(clients, [1, 2, 3], rank=4, dtypes={"classifier.bias": np.dtype(np.float64)})
    assert unnamed.factors["classifier.bias"].dtype == np.float64 and unnamed.factors[a_key].dtype == np.float16


def test_from_deltas_returns_the_factors_in_the_named_dtype():
    rng = np.random.default_rng(16)
    deltas = [{"layer.q.delta": rng.standard_normal((12, 10)), "classifier.bias": rng.standard_normal(2)} for _ in "ab"]
    wanted = {"layer.q.lora_A.weight": np.float32, "layer.q.lora_B.weight": np.float32, "classifier.bias": np.float16}
    result = fra_lora_from_deltas(deltas, [1, 1], rank=3, dtypes=wanted)
    assert {key: value.dtype for key, value in result.factors.items()} == {k: np.dtype(v) for k, v in wanted.items()}
    assert fra_lora_from_deltas(deltas, [1, 1], rank=3).factors["layer.q.lora_A.weight"].dtype == np.float64


def test_retained_energy_is_one_when_nothing_is_truncated():
    rng = np.random.default_rng(9)
    clients = peft_clients(rng, 2, r=3, head=False)
    assert all(e == pytest.approx(1.0) for e in fra_lora_aggregate(clients, [1, 1], rank=6).retained_energy.values())
    partial = fra_lora_aggregate(clients, [1, 1], rank=2).retained_energy
    assert all(0.0 < e < 1.0 for e in partial.values())
    zero = [{k: np.zeros_like(v) for k, v in c.items()} for c in clients]
    result = fra_lora_aggregate(zero, [1, 1], rank=2)
    assert all(e == 1.0 for e in result.retained_energy.values())
    assert all(np.all(v == 0) for v in result.factors.values())


def test_carried_residual_loses_nothing_and_drop_does():
    rng = np.random.default_rng(10)
    shapes = (("q", 60, 50), ("v", 40, 50))
    rounds = [peft_clients(rng, 3, modules=shapes, r=4, head=False) for _ in range(2)]
    weights = [1.0, 2.0, 1.0]
    a_key, b_key = "layer.q.lora_A.weight", "layer.q.lora_B.weight"
    means = [true_mean([c[b_key] for c in clients], [c[a_key] for c in clients], weights) for clients in rounds]

    residual, sent = None, []
    for clients in rounds:
        result = fra_lora_aggregate(clients, weights, rank=3, residual=residual, residual_policy="carry")
        sent.append(result.factors[b_key] @ result.factors[a_key])
        residual = result.residual
    left = residual["layer.q.residual_B"] @ residual["layer.q.residual_A"]
    np.testing.assert_allclose(sent[0] + sent[1] + left, means[0] + means[1], atol=1e-10)
    assert residual["layer.q.residual_B"].shape[1] <= 2 * 12 - 2 * 3  # discarded triplets only
    assert set(residual) == {f"layer.{m}.residual_{p}" for m in "qv" for p in "AB"}

    dropped = [fra_lora_aggregate(clients, weights, rank=3).factors for clients in rounds]
    lost = means[0] + means[1] - sum(f[b_key] @ f[a_key] for f in dropped)
    assert np.linalg.norm(lost) > 0.1 * np.linalg.norm(means[0])


def test_carried_residual_turns_dense_when_factors_stop_saving_memory():
    rng = np.random.default_rng(11)
    clients = peft_clients(rng, 6, modules=(("q", 10, 8),), r=4, head=False)
    a_key, b_key = "layer.q.lora_A.weight", "layer.q.lora_B.weight"
    mean = true_mean([c[b_key] for c in clients], [c[a_key] for c in clients], [1] * 6)
    first = fra_lora_aggregate(clients, [1] * 6, rank=2, residual_policy="carry")
    assert set(first.residual) == {"layer.q.residual"}  # rank 6 x (10 + 8) >= 10 x 8
    sent = first.factors[b_key] @ first.factors[a_key]
    np.testing.assert_allclose(sent + first.residual["layer.q.residual"], mean, atol=1e-10)
    second = fra_lora_aggregate(clients, [1] * 6, rank=2, residual=first.residual, residual_policy="carry")
    total = sum(r.factors[b_key] @ r.factors[a_key] for r in (first, second)) + second.residual["layer.q.residual"]
    np.testing.assert_allclose(total, 2 * mean, atol=1e-10)
    assert second.paths["layer.q"] == "dense"


def test_invalid_policy_rank_and_residual():
    clients = peft_clients(np.random.default_rng(12), 2)
    with pytest.raises(ValueError, match="residual_policy"):
        fra_lora_aggregate(clients, [1, 1], rank=2, residual_policy="keep")
    with pytest.raises(ValueError, match="rank"):
        fra_lora_aggregate(clients, [1, 1], rank=0)
    with pytest.raises(ValueError, match="residual"):
        fra_lora_aggregate(clients, [1, 1], rank=2, residual={"other.residual": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="client 1"):
        fra_lora_aggregate([clients[0], {"x": np.ones(1)}], [1, 1], rank=2)


def test_pairs_found_by_name():
    keys = [
        "m.q.lora_A.weight",
        "m.q.lora_B.weight",
        "m.k.lora_A.default.weight",
        "m.k.lora_B.default.weight",
        "emb.lora_embedding_A",
        "emb.lora_embedding_B",
        "head.weight",
    ]
    pairs = find_lora_pairs(keys)
    assert pairs == [(keys[0], keys[1]), (keys[2], keys[3]), (keys[4], keys[5])]
    assert [module_name(a) for a, _ in pairs] == ["m.q", "m.k.default", "emb"]
    with pytest.raises(ValueError, match="no matching"):
        find_lora_pairs(["m.q.lora_A.weight"])
    with pytest.raises(ValueError, match="without a lora_A"):
        find_lora_pairs(["m.q.lora_B.weight"])


def test_explicit_pairs():
    rng = np.random.default_rng(13)
    clients = [{"down": rng.standard_normal((3, 12)), "up": rng.standard_normal((9, 3))} for _ in range(2)]
    result = fra_lora_aggregate(clients, [1, 1], rank=3, lora_pairs=[("down", "up")])
    expected = product(*dense_mean_svd([c["up"] for c in clients], [c["down"] for c in clients], [1, 1], 3))
    assert rel(result.factors["up"] @ result.factors["down"], expected) < 1e-8
    assert set(result.retained_energy) == {"down"}


# ---- full updates


def test_from_deltas_matches_factored_and_partial_svd_matches_full(monkeypatch):
    rng = np.random.default_rng(14)
    clients = peft_clients(rng, 3, head=True)
    weights = [2.0, 1.0, 1.0]
    deltas = [
        {
            "layer.q.delta": c["layer.q.lora_B.weight"] @ c["layer.q.lora_A.weight"],
            "classifier.bias": c["classifier.bias"],
        }
        for c in clients
    ]
    factored = fra_lora_aggregate(clients, weights, rank=4)
    full = fra_lora_from_deltas(deltas, weights, rank=4)

    def q(factors):
        return factors["layer.q.lora_B.weight"] @ factors["layer.q.lora_A.weight"]

    assert rel(q(full.factors), q(factored.factors)) < 1e-8
    np.testing.assert_allclose(full.factors["classifier.bias"], factored.factors["classifier.bias"])
    assert full.retained_energy["layer.q"] == pytest.approx(factored.retained_energy["layer.q"])

    monkeypatch.setattr(fra, "PARTIAL_SVD_ABOVE", 5)  # force the Gram-eigenvector route
    partial = fra_lora_from_deltas(deltas, weights, rank=4)
    assert rel(q(partial.factors), q(full.factors)) < 1e-10

    carried = fra_lora_from_deltas(deltas, weights, rank=4, residual_policy="carry")
    mean = true_mean([d["layer.q.delta"] for d in deltas], [np.eye(20)] * 3, weights)
    np.testing.assert_allclose(q(carried.factors) + carried.residual["layer.q.residual"], mean, atol=1e-10)


# ---- checks and the naive baseline


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda u: u.update({"m.lora_A.weight": np.ones((5, 6)), "m.lora_B.weight": np.ones((5, 5))}), "rank 5"),
        (lambda u: u.update({"m.lora_A.weight": np.ones((2, 7)), "m.lora_B.weight": np.ones((5, 2))}), "shape (2, 7)"),
        (lambda u: u.update({"m.lora_B.weight": np.ones((5, 3))}), "has rank 4 but"),
        (lambda u: u.update({"m.lora_A.weight": np.ones((4, 7))}), "shape (4, 7)"),
        (lambda u: u.update({"m.lora_A.weight": np.full((4, 6), np.nan)}), "NaN"),
        (lambda u: u.pop("head"), "missing ['head']"),
        (lambda u: u.pop("m.lora_B.weight"), "no matching"),
        (lambda u: u.update({"m.lora_A.weight": np.ones(24)}), "2-D"),
    ],
)
def test_check_lora_update_names_the_defect(change, fragment):
    good = {"m.lora_A.weight": np.ones((4, 6)), "m.lora_B.weight": np.ones((5, 4)), "head": np.ones(2)}
    expected = {key: value.shape for key, value in good.items()}
    assert check_lora_update(good, expected, rank=4) is None
    update = dict(good)
    change(update)
    problem = check_lora_update(update, expected, rank=4)
    assert problem is not None and fragment in problem
    assert check_lora_update({}, expected, rank=4) is not None
    # a site of a lower rank than the global adapter's: its own rank sets the factors' rank dimension
    lower = {**good, "m.lora_A.weight": np.ones((2, 6)), "m.lora_B.weight": np.ones((5, 2))}
    assert check_lora_update(lower, expected, rank=4) is None


def test_naive_factor_average_has_a_systematic_error():
    rng = np.random.default_rng(15)
    clients = peft_clients(rng, 3, head=False)
    weights = [1.0, 1.0, 2.0]
    naive = naive_factor_average(clients, weights)
    assert product_error(naive, clients, weights) > 0.1
    fra_factors = fra_lora_aggregate(clients, weights, rank=12).factors  # n*r = 12: FRA is exact
    assert product_error(fra_factors, clients, weights) < 1e-10
    same = [clients[0]] * 3
    assert product_error(naive_factor_average(same, weights), same, weights) < 1e-12


# ---- sites of different ranks

MODULES = (("q", 48, 40), ("v", 56, 40))


def site_factors(rng, rank, dtype, modules=MODULES):
    factors = {}
    for name, d_out, d_in in modules:
        factors[f"layer.{name}.lora_A.weight"] = rng.standard_normal((rank, d_in)).astype(dtype)
        factors[f"layer.{name}.lora_B.weight"] = rng.standard_normal((d_out, rank)).astype(dtype)
    factors["classifier.bias"] = rng.standard_normal(2).astype(dtype)
    return factors


def mixed_rank_case(case, dtype):
    """(clients, weights, the global rank): sites of ranks 4/8/16 (or 2/3/4), random or rank-deficient."""
    rng = np.random.default_rng(["random", "identical", "zero site", "below the global rank"].index(case))
    ranks, weights = [4, 8, 16], [3.0, 1.0, 2.0]
    if case == "below the global rank":  # sum of the ranks (9) < 16: the mean has fewer components than the adapter
        ranks = [2, 3, 4]
    clients = [site_factors(rng, r, dtype) for r in ranks]
    if case == "identical":  # the same update from every site, padded with zeros by the larger ranks
        clients = [padded_to_rank(clients[0], r) for r in ranks]
    if case == "zero site":  # a site whose update is zero (B = 0, as LoRA starts)
        clients[1] = {k: np.zeros_like(v) if "lora_B" in k else v for k, v in clients[1].items()}
    return clients, weights, 16


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["random", "identical", "zero site", "below the global rank"])
def test_each_site_gets_the_dense_means_truncation_at_its_own_rank(case, dtype):
    """FRA-LoRA with sites of ranks r_u: the leading r_u components of its global factors are, per module, the best
    rank-r_u approximation of the dense weighted mean of B_u A_u (to 1e-5), rank-deficient means included."""
    clients, weights, rank = mixed_rank_case(case, dtype)
    result = fra_lora_aggregate(clients, weights, rank=rank)
    for a_key, b_key in find_lora_pairs(clients[0]):
        Bs, As = [c[b_key] for c in clients], [c[a_key] for c in clients]
        assert result.factors[a_key].shape[0] == rank and result.factors[b_key].dtype == dtype
        for site_rank in sorted({c[a_key].shape[0] for c in clients}):
            share = leading_components(result.factors, site_rank)
            assert share[a_key].shape[0] == min(site_rank, rank)
            got = share[b_key].astype(np.float64) @ share[a_key].astype(np.float64)
            reference = product(*dense_mean_svd(Bs, As, weights, site_rank))
            assert rel(got, reference) < 1e-5, (case, site_rank)
    biases = [c["classifier.bias"].astype(np.float64) for c in clients]
    np.testing.assert_allclose(result.factors["classifier.bias"], np.average(biases, axis=0, weights=weights), 1e-6)


def test_padding_keeps_the_product_and_makes_factor_averaging_possible():
    rng = np.random.default_rng(5)
    clients = [site_factors(rng, r, np.float32) for r in (4, 8, 16)]
    padded = [padded_to_rank(c, 16) for c in clients]
    for client, pad in zip(clients, padded, strict=True):
        for a_key, b_key in find_lora_pairs(client):
            assert pad[a_key].shape == (16, client[a_key].shape[1]) and pad[b_key].dtype == np.float32
            np.testing.assert_allclose(pad[b_key] @ pad[a_key], client[b_key] @ client[a_key], rtol=1e-5, atol=1e-5)
    naive = naive_factor_average(padded, [1.0, 1.0, 1.0])  # HetLoRA's zero-padding baseline: shapes now agree
    assert product_error(naive, padded, [1.0, 1.0, 1.0]) > 0.1
    # a site takes the leading components of the global factors; its own rank or less passes through
    assert leading_components(naive, 4)["layer.q.lora_B.weight"].shape == (48, 4)
    assert leading_components(clients[0], 8) == clients[0]
    with pytest.raises(ValueError, match="more than the 8"):
        padded_to_rank(clients[2], 8)


# ---- the benchmark's model arithmetic


def test_lora_parameter_count_matches_the_apheris_esm2_35m_setup():
    assert lora_trainable_params(layers=12, hidden=480, rank=16) == 553_922
    # 34,316,885 total with the PEFT wrapper = base model + LoRA + classifier, the frozen classifier copy (962)
    # and the 12 x 20 -> 1 contact head (241) that the estimate leaves out.
    assert esm2_param_estimate(12, 480) + 553_922 + 962 + 241 == 34_316_885


def test_the_bench_reports_accuracy_stage_times_and_mixed_rank_traffic():
    from pharmafl.aggregation.bench import bench_fra_lora

    result = bench_fra_lora(["8M"], [2], repeats=1, breakdown=True)
    (row,) = result["results"]
    assert row["rel_error"] is not None and row["rel_error"] <= 1e-5 and result["targets"]["rel_error_le_1e-5"]
    stages = row["breakdown"]["seconds"]
    assert all(stages[name] > 0 for name in ("stack", "gram_B", "gram_A", "module")) and row["gram_floor_s"] > 0
    per_rank = 2 * 320 * 4 * row["modules"]  # float32 B and A of one rank, every module
    traffic = row["bytes_mixed_ranks"]
    assert traffic["4"] == {"upload_fra": 4 * per_rank, "upload_padded": 16 * per_rank, "download": 16 * per_rank}
    assert traffic["16"]["upload_fra"] == row["bytes_factors"]
