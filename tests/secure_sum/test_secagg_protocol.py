import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2

from pharmafl.secure_sum.encoding import decode_sum, encode_weighted
from pharmafl.secure_sum.keys import agree, participants_digest, upload_signed_bytes
from pharmafl.secure_sum.protocol import (
    MaskedUpload,
    SecureSumClient,
    SecureSumConfig,
    SecureSumError,
)

sys.path.insert(0, str(Path(__file__).parent))
from secagg_kit import (  # noqa: E402
    JOB,
    Federation,
    ca_pem,
    make_ca,
    make_site_kit,
    plaintext_mean,
    random_updates,
)


@pytest.mark.parametrize("neighbours", [None, 0])
def test_secure_weighted_mean_equals_plaintext_within_bound(neighbours):
    rng = np.random.default_rng(7)
    for trial in range(6):
        n = int(rng.integers(3, 9))
        config = SecureSumConfig(threshold=max(2, n // 2 + 1), clip=2.0, max_weight=50.0, neighbours=neighbours)
        fed = Federation(n, config)
        shapes = {"w": (int(rng.integers(1, 40)), int(rng.integers(1, 40))), "b": (int(rng.integers(1, 50)),)}
        for round_number in range(2):
            updates = random_updates(rng, fed.sites, shapes, scale=2.0)
            weights = {s: float(rng.uniform(1, 50)) for s in fed.sites}
            result = fed.run_round(round_number, updates, weights)
            exact = plaintext_mean(updates, weights, fed.sites)
            fixed_point = fed.server.fixed_point
            total = sum(weights.values())
            assert result.total_weight == pytest.approx(total, abs=fixed_point.sum_error_bound(n))
            for name in shapes:
                bound = fixed_point.mean_error_bound(n, total, np.abs(exact[name]).max())
                assert np.abs(result.mean[name] - exact[name]).max() <= bound, (trial, name)
                assert result.mean[name].shape == shapes[name]


def test_dropouts_after_setup_and_after_upload_give_the_survivors_exact_sum():
    rng = np.random.default_rng(3)
    fed = Federation(5, SecureSumConfig(threshold=3, clip=1.0, max_weight=10.0))
    updates = random_updates(rng, fed.sites, {"x": (500,)})
    weights = {s: float(rng.integers(1, 10)) for s in fed.sites}
    # site-2 drops after key setup (no upload); site-4 uploads, then drops before unmasking
    uploaders = ["site-1", "site-3", "site-4", "site-5"]
    result = fed.run_round(0, updates, weights, upload=uploaders, respond=["site-1", "site-3", "site-5"])
    assert result.uploaded == uploaders and result.dropped == ["site-2"]
    assert result.survivors == ["site-1", "site-3", "site-5"]
    exact = plaintext_mean(updates, weights, uploaders)["x"]
    np.testing.assert_allclose(result.mean["x"], exact, atol=1e-9)
    assert result.total_weight == pytest.approx(sum(weights[s] for s in uploaders))
    assert fed.server.revealed == {("site-2", 0)}  # only site-2's round-0 mask key
    live = ["site-1", "site-3", "site-5"]
    result = fed.run_round(1, updates, weights, upload=live)
    np.testing.assert_allclose(result.mean["x"], plaintext_mean(updates, weights, live)["x"], atol=1e-9)
    assert result.dropped == ["site-2", "site-4"]
    # site-2 comes back in round 2: its round-2 key was never revealed, its upload counts like any other
    result = fed.run_round(2, updates, weights)
    np.testing.assert_allclose(result.mean["x"], plaintext_mean(updates, weights, fed.sites)["x"], atol=1e-9)


def test_a_revealed_mask_key_does_not_unmask_other_rounds():
    fed = Federation(3, SecureSumConfig(threshold=2))
    client = fed.clients["site-1"]
    keys = client.keys
    # the round-1 key shared with site-2 differs from the round-0 one, so revealing one leaves the other secret
    peer = fed.clients["site-2"].keys
    assert agree(keys.mask_privates[0], peer.mask_publics[0]) != agree(keys.mask_privates[1], peer.mask_publics[1])
    with pytest.raises(SecureSumError, match="no mask keys for round 4"):
        fed.server.start_round(4)


def test_dropouts_with_the_neighbour_graph():
    rng = np.random.default_rng(4)
    fed = Federation(12, SecureSumConfig(threshold=7, clip=1.0, max_weight=10.0, neighbours=0))
    updates = random_updates(rng, fed.sites, {"x": (300,)})
    weights = {s: 1.0 for s in fed.sites}
    uploaders = fed.sites[2:]
    result = fed.run_round(0, updates, weights, upload=uploaders, respond=uploaders[:7])
    np.testing.assert_allclose(result.mean["x"], plaintext_mean(updates, weights, uploaders)["x"], atol=1e-9)


def test_fewer_than_t_survivors_fails_clearly():
    rng = np.random.default_rng(5)
    fed = Federation(5, SecureSumConfig(threshold=3))
    updates = random_updates(rng, fed.sites, {"x": (10,)})
    weights = {s: 1.0 for s in fed.sites}
    with pytest.raises(SecureSumError, match="cannot be unmasked: 2 sites returned shares .* threshold is 3"):
        fed.run_round(0, updates, weights, respond=["site-1", "site-2"])
    fed.server.start_round(1)
    with pytest.raises(SecureSumError, match="only 2 valid uploads"):
        fed.run_round(1, updates, weights, upload=["site-1", "site-2"])


def test_too_few_sites_for_the_threshold_is_refused_at_setup():
    with pytest.raises(SecureSumError, match="at least 4"):
        Federation(3, SecureSumConfig(threshold=4))


def byte_chi_square(vector: np.ndarray) -> float:
    counts = np.bincount(vector.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_single_masked_upload_looks_uniform_and_the_unmasked_encoding_does_not():
    rng = np.random.default_rng(6)
    fed = Federation(3, SecureSumConfig(threshold=2, clip=1.0, max_weight=10.0))
    updates = {s: {"x": rng.normal(0, 0.01, 50_000)} for s in fed.sites}  # small, very non-uniform values
    _, uploads = fed.masked_uploads(0, updates, {s: 3.0 for s in fed.sites}, fed.sites)
    critical = chi2.ppf(1 - 1e-6, df=255)
    assert byte_chi_square(uploads["site-1"].vector) < critical
    # the same test on the unmasked encoding fails: it is a test that can fail
    plain = encode_weighted(updates["site-1"]["x"], 3.0, fed.server.fixed_point)
    assert byte_chi_square(plain) > critical
    # and the top bits, where a signed small value is all 0s or all 1s, are uniform too
    top = np.bincount((uploads["site-2"].vector >> np.uint64(56)).astype(np.int64), minlength=256)
    assert float(((top - top.mean()) ** 2 / top.mean()).sum()) < critical


def test_replayed_tampered_and_missized_uploads_are_rejected_and_count_as_dropouts():
    rng = np.random.default_rng(8)
    fed = Federation(5, SecureSumConfig(threshold=3, clip=1.0, max_weight=10.0))
    updates = random_updates(rng, fed.sites, {"x": (64,)})
    weights = {s: 2.0 for s in fed.sites}
    _, round0 = fed.masked_uploads(0, updates, weights, fed.sites)
    for masked in round0.values():
        assert fed.server.receive_upload(masked) is None
    uploaded = fed.server.consistency_targets()
    for site in uploaded:
        fed.server.receive_signature(site, fed.clients[site].consistency(0, uploaded))
    requests = fed.server.unmask_requests()
    fed.server.finish({s: fed.clients[s].unmask(requests[s]) for s in fed.sites})

    _, round1 = fed.masked_uploads(1, updates, weights, ["site-1", "site-2", "site-3"])
    participants = fed.server.participants()
    # a replay of site-4's round-0 upload, as is and with the round field rewritten
    assert "replayed or stale" in fed.server.receive_upload(round0["site-4"])
    relabelled = dataclasses.replace(round0["site-4"], round=1)
    assert "does not verify" in fed.server.receive_upload(relabelled)
    # site-5's round-1 upload altered in transit (one value changed, or cut short)
    honest = fed.clients["site-5"].mask(updates["site-5"], 2.0, 1, participants)
    tampered = dataclasses.replace(honest, vector=honest.vector.copy())
    tampered.vector[3] += np.uint64(1)
    assert "does not verify" in fed.server.receive_upload(tampered)
    short = dataclasses.replace(honest, vector=honest.vector[:-1])
    assert "does not verify" in fed.server.receive_upload(short)
    # an upload sent by one site in another's name
    assert "sent by site-1" in fed.server.receive_upload(honest, sender="site-1")
    # a site that signs a mis-sized vector itself (a broken client) is rejected by size
    bad = fed.clients["site-4"].mask({"x": np.zeros(63)}, 2.0, 1, participants)
    assert "different layout" in fed.server.receive_upload(bad)
    bad_dtype = dataclasses.replace(honest, vector=honest.vector.astype(np.uint32))
    signed = upload_signed_bytes(JOB, 1, "site-5", bad_dtype.digest(), participants_digest(participants))
    bad_dtype.signature = fed.clients["site-5"].keys.sign(signed)
    assert "expected uint64" in fed.server.receive_upload(bad_dtype)
    for site in ("site-1", "site-2", "site-3"):
        assert fed.server.receive_upload(round1[site]) is None
    assert "second upload" in fed.server.receive_upload(round1["site-1"])
    uploaded = fed.server.consistency_targets()
    assert uploaded == ["site-1", "site-2", "site-3"]
    for site in uploaded:
        fed.server.receive_signature(site, fed.clients[site].consistency(1, uploaded))
    requests = fed.server.unmask_requests()
    result = fed.server.finish({s: fed.clients[s].unmask(r) for s, r in requests.items()})
    assert result.dropped == ["site-4", "site-5"]
    live = ["site-1", "site-2", "site-3"]
    np.testing.assert_allclose(result.mean["x"], plaintext_mean(updates, weights, live)["x"], atol=1e-9)


def test_missized_upload_against_the_expected_layout():
    fed = Federation(3, SecureSumConfig(threshold=2))
    participants = fed.server.start_round(0, expected_layout=[("x", (8,), "float64")])
    masked = fed.clients["site-1"].mask({"x": np.zeros(9)}, 1.0, 0, participants)
    assert "layout" in fed.server.receive_upload(masked)
    masked = fed.clients["site-2"].mask({"x": np.zeros(8)}, 1.0, 0, participants)
    masked = MaskedUpload.from_dict(masked.to_dict())  # survives the wire format
    assert fed.server.receive_upload(masked) is None


def test_server_blind_mode_hides_the_aggregate_from_the_server():
    rng = np.random.default_rng(10)
    fed = Federation(5, SecureSumConfig(threshold=3, clip=1.0, max_weight=10.0, server_blind=True))
    updates = random_updates(rng, fed.sites, {"x": (2000,)})
    weights = {s: float(rng.integers(1, 10)) for s in fed.sites}
    uploaders = ["site-1", "site-2", "site-4", "site-5"]  # site-1 (who made the group seed) takes part
    result = fed.run_round(0, updates, weights, upload=uploaders, respond=uploaders[1:])
    assert result.mean is None and result.blind_sum is not None
    critical = chi2.ppf(1 - 1e-6, df=255)
    assert byte_chi_square(result.blind_sum) < critical  # the server's view of the sum is uniform
    for site in ("site-3", "site-5"):  # any site, even one that dropped, can unblind
        weight, mean = fed.clients[site].unblind(
            result.blind_sum, 0, result.uploaded, result.layout, fed.server.group_seed_ciphertexts[site]
        )
        assert weight == pytest.approx(sum(weights[s] for s in uploaders), abs=1e-6)
        np.testing.assert_allclose(mean["x"], plaintext_mean(updates, weights, uploaders)["x"], atol=1e-9)
    # without the group masks removed, decoding gives garbage
    with pytest.raises((ValueError, AssertionError)):
        weight, mean = decode_sum(result.blind_sum.copy(), fed.server.fixed_point)
        np.testing.assert_allclose(mean, plaintext_mean(updates, weights, uploaders)["x"], atol=1e-3)


def test_server_blind_is_refused_for_fra_lora():
    with pytest.raises(ValueError, match="only linear aggregation"):
        SecureSumConfig(threshold=2, server_blind=True, aggregation="fra-lora")


def test_signed_advertisements_and_a_key_swap_by_the_server():
    ca = make_ca()
    sites = ["site-1", "site-2", "site-3"]
    kits = {site: make_site_kit(ca, site) for site in sites}
    config = SecureSumConfig(threshold=2, require_signed=True)
    fed = Federation(3, config, kits=kits, root_ca=ca_pem(ca))
    assert all(client.authenticated for client in fed.clients.values())
    # a server that substitutes its own mask key for site-2's is caught by every peer
    clients = {s: SecureSumClient(s, JOB, config, *kits[s], root_ca_pem=ca_pem(ca)) for s in sites}
    adverts = [c.advertise() for c in clients.values()]
    adverts[1] = dataclasses.replace(adverts[1], mask_publics=SecureSumClient("x", JOB, config).keys.mask_publics)
    with pytest.raises(SecureSumError, match="site-2 does not match its signature"):
        clients["site-1"].share_keys(adverts)
    # unsigned advertisements are refused when signatures are required
    with pytest.raises(SecureSumError, match="no root CA"):
        Federation(3, config)
