import json

import numpy as np
import pytest
from nvflare.apis.dxo import DataKind, from_shareable

from pharmafl.aggregation.fra_lora import dense_mean_svd, padded_to_rank
from pharmafl.flare.fra_lora_aggregator import ROUNDS_FILE, FRALoRAAggregator

from .test_fedavg_aggregator import contribution, make_context

MODULE = "base_model.model.esm.encoder.layer.0.attention.self.query"
A_KEY, B_KEY, HEAD = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight", "classifier.weight"
RANK, D_IN, D_OUT = 4, 12, 10


def factors(seed, rank=RANK):
    rng = np.random.default_rng(seed)
    return {
        A_KEY: rng.normal(size=(rank, D_IN)).astype(np.float32),
        B_KEY: rng.normal(size=(D_OUT, rank)).astype(np.float32),
        HEAD: rng.normal(size=(2, D_OUT)).astype(np.float32),
    }


def test_global_adapter_is_the_best_rank_r_approximation_of_the_mean_update():
    aggregator = FRALoRAAggregator(rank=RANK)
    fl_ctx = make_context(global_weights=factors(99))
    clients = [factors(seed) for seed in range(3)]
    steps = [10, 20, 30]
    for index, (update, step) in enumerate(zip(clients, steps, strict=True)):
        assert aggregator.accept(contribution(f"site-{index}", update, steps=step, kind=DataKind.WEIGHTS), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    assert result.data_kind == DataKind.WEIGHTS
    U, S, Vt = dense_mean_svd([c[B_KEY] for c in clients], [c[A_KEY] for c in clients], steps, RANK)
    np.testing.assert_allclose(result.data[B_KEY] @ result.data[A_KEY], (U * S) @ Vt, rtol=1e-4, atol=1e-4)
    expected_head = np.average([c[HEAD] for c in clients], axis=0, weights=steps)
    np.testing.assert_allclose(result.data[HEAD], expected_head, rtol=1e-5)
    naive = np.average([c[B_KEY] for c in clients], axis=0, weights=steps) @ np.average(
        [c[A_KEY] for c in clients], axis=0, weights=steps
    )
    assert not np.allclose(naive, (U * S) @ Vt, atol=1e-2)  # what separate averaging would have sent


def test_wrong_rank_shape_or_nan_is_excluded_and_the_round_completes():
    aggregator = FRALoRAAggregator(rank=RANK)
    fl_ctx = make_context(global_weights=factors(99))
    nan = factors(1)
    nan[A_KEY][0, 0] = np.nan
    wrong_shape = factors(2)
    wrong_shape[HEAD] = np.zeros((3, D_OUT), dtype=np.float32)
    for site, update in (("site-1", factors(1, rank=RANK + 2)), ("site-2", nan), ("site-3", wrong_shape)):
        assert not aggregator.accept(contribution(site, update, kind=DataKind.WEIGHTS), fl_ctx)
    good = factors(5)
    assert aggregator.accept(contribution("site-4", good, kind=DataKind.WEIGHTS), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    np.testing.assert_allclose(result.data[B_KEY] @ result.data[A_KEY], good[B_KEY] @ good[A_KEY], atol=1e-4)
    reasons = " ".join(r["reason"] for r in aggregator.rejections)
    assert "rank" in reasons and "NaN" in reasons and "shape" in reasons


def test_delta_uploads_give_the_same_adapter():
    clients = [factors(seed) for seed in range(3)]
    deltas = [{f"{MODULE}.delta": c[B_KEY] @ c[A_KEY], HEAD: c[HEAD]} for c in clients]
    by_factors, by_delta = FRALoRAAggregator(rank=RANK), FRALoRAAggregator(rank=RANK, upload="delta")
    fl_ctx = make_context(global_weights=factors(99))
    for index in range(3):
        assert by_factors.accept(contribution(f"s{index}", clients[index], kind=DataKind.WEIGHTS), fl_ctx)
        assert by_delta.accept(contribution(f"s{index}", deltas[index], kind=DataKind.WEIGHTS), fl_ctx)
    one, two = (from_shareable(a.aggregate(fl_ctx)).data for a in (by_factors, by_delta))
    np.testing.assert_allclose(one[B_KEY] @ one[A_KEY], two[B_KEY] @ two[A_KEY], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"upload": "both"},
        {"residual_policy": "keep"},
        {"max_weight": 0},
        {"max_weight": float("inf")},
        {"max_weight": True},
    ],
)
def test_invalid_configuration(kwargs):
    with pytest.raises(ValueError):
        FRALoRAAggregator(**kwargs)


@pytest.mark.parametrize("client_dtype", [np.float16, np.float64])
def test_factors_and_head_come_back_in_the_global_models_dtype(client_dtype):
    aggregator = FRALoRAAggregator(rank=RANK)
    fl_ctx = make_context(global_weights=factors(99))  # float32
    clients = [{key: value.astype(client_dtype) for key, value in factors(seed).items()} for seed in range(2)]
    for index, update in enumerate(clients):
        assert aggregator.accept(contribution(f"site-{index}", update, kind=DataKind.WEIGHTS), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx)).data
    assert {key: value.dtype for key, value in result.items()} == dict.fromkeys((A_KEY, B_KEY, HEAD), np.float32)
    expected_head = np.mean([c[HEAD].astype(np.float64) for c in clients], axis=0)
    np.testing.assert_allclose(result[HEAD], expected_head, rtol=1e-6)


def test_delta_uploads_come_back_in_the_global_adapters_dtype():
    aggregator = FRALoRAAggregator(rank=RANK, upload="delta")
    fl_ctx = make_context(global_weights=factors(99))  # the float32 adapter the deltas replace
    for index in range(2):
        client = {key: value.astype(np.float64) for key, value in factors(index).items()}
        delta = {f"{MODULE}.delta": client[B_KEY] @ client[A_KEY], HEAD: client[HEAD]}
        assert aggregator.accept(contribution(f"site-{index}", delta, kind=DataKind.WEIGHTS), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx)).data
    assert result[A_KEY].dtype == result[B_KEY].dtype == result[HEAD].dtype == np.float32


@pytest.mark.parametrize(
    "bad", [np.ones((RANK, D_IN), dtype=np.int8), np.ones((RANK, D_IN), dtype=bool), "text", {1: np.ones(2)}]
)
def test_non_float_factors_are_refused_not_a_crash(bad):
    aggregator = FRALoRAAggregator(rank=RANK)
    fl_ctx = make_context(global_weights=factors(99))
    update = {**factors(1), A_KEY: bad} if not isinstance(bad, dict) else bad
    assert not aggregator.accept(contribution("site-1", update, kind=DataKind.WEIGHTS), fl_ctx)
    assert aggregator.rejections and aggregator.rejections[0]["site"] == "site-1"


def test_a_spoofed_sender_is_refused_by_fra_lora_too():
    aggregator = FRALoRAAggregator(rank=RANK)
    fl_ctx = make_context(global_weights=factors(99))
    assert not aggregator.accept(contribution("site-1", factors(1), kind=DataKind.WEIGHTS, claimed="site-2"), fl_ctx)
    assert "FLARE authenticated 'site-1'" in aggregator.rejections[0]["reason"]


def test_each_round_records_the_retained_energy_and_what_naive_averaging_would_have_missed(tmp_path):
    """The per-round record of the ESM experiments: against a dense computation of both quantities."""
    aggregator = FRALoRAAggregator(rank=RANK)
    clients = [factors(seed) for seed in range(3)]
    clients[2] = {**factors(2, rank=2)}  # a site of rank 2: naive averaging pads it to the global rank
    steps = [10, 20, 30]
    for round_number in range(2):
        fl_ctx = make_context(round_number, global_weights=factors(99), run_dir=tmp_path)
        for index, (update, step) in enumerate(zip(clients, steps, strict=True)):
            sent = contribution(f"site-{index}", update, step, round_number, kind=DataKind.WEIGHTS)
            assert aggregator.accept(sent, fl_ctx)
        aggregator.aggregate(fl_ctx)
        aggregator.reset(fl_ctx)  # as ScatterAndGather does between rounds
    records = [json.loads(line) for line in (tmp_path / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and records[0]["clients"] == 3
    weighted = zip(steps, clients, strict=True)
    mean = sum(w * c[B_KEY].astype(float) @ c[A_KEY].astype(float) for w, c in weighted) / sum(steps)
    S = np.linalg.svd(mean, compute_uv=False)
    assert records[0]["retained_energy"]["min"] == pytest.approx(np.sum(S[:RANK] ** 2) / np.sum(S**2), rel=1e-5)
    padded = [padded_to_rank(c, RANK) for c in clients]
    mean_B = sum(w * p[B_KEY].astype(float) for w, p in zip(steps, padded, strict=True)) / sum(steps)
    mean_A = sum(w * p[A_KEY].astype(float) for w, p in zip(steps, padded, strict=True)) / sum(steps)
    naive = mean_B @ mean_A
    expected = np.linalg.norm(naive - mean) / np.linalg.norm(mean)
    assert records[0]["naive_error"] == pytest.approx(expected, rel=1e-6) and expected > 0.1
    # identical clients: averaging the factors is exact
    assert aggregator.naive_error([factors(5)] * 3, [1.0, 2.0, 3.0]) == pytest.approx(0.0, abs=1e-12)


def test_the_naive_error_is_skipped_for_adapters_over_the_size_bound(monkeypatch):
    monkeypatch.setattr("pharmafl.flare.fra_lora_aggregator.NAIVE_ERROR_MAX_ENTRIES", D_OUT * D_IN - 1)
    assert FRALoRAAggregator(rank=RANK).naive_error([factors(0), factors(1)], [1.0, 1.0]) is None
