"""An actively malicious server against the real site code: every attack is refused and reveals no share.

The attacker is the server: it chooses what each site sees (U, the participants, the signatures it forwards, the
ciphertexts it asks to open, the settings and the advertisements). ``recover`` is what it does with the shares it
gets: strip one site's masks and decode its update. The positive control shows that ``recover`` works whenever a
site hands out both of a peer's secrets (a policy that lets 2t <= n), so a refusal below is what stops it.
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from pharmafl.secure_sum.config import SecureSumConfig, SitePolicy
from pharmafl.secure_sum.encoding import decode_sum
from pharmafl.secure_sum.keys import (
    Advertisement,
    SiteKeys,
    agree,
    pair_mask_key,
    self_mask_key,
)
from pharmafl.secure_sum.prg import MaskStreamer
from pharmafl.secure_sum.protocol import (
    KEY_SHARE,
    SELF_SEED,
    RefusedError,
    SecureSumClient,
    UnmaskRequest,
    _statement,
)
from pharmafl.secure_sum.shamir import Share, reconstruct_secret

sys.path.insert(0, str(Path(__file__).parent))
from secagg_kit import JOB, Federation, ca_pem, make_ca, make_site_kit, random_updates, site_names  # noqa: E402

X = "site-1"  # the site whose update the server is after


class NoFloorPolicy(SitePolicy):
    """A site whose admin switched the threshold floor off (the positive control only)."""

    def threshold_floor(self, announced):
        return 2


def start(fed, round_number=0, shape=(40,)):
    """Every participant uploads in ``round_number``; the server accepts them all. Returns updates and uploads."""
    rng = np.random.default_rng(round_number)
    updates = random_updates(rng, fed.sites, {"x": shape}, scale=0.9)
    weights = {site: 3.0 for site in fed.sites}
    participants, uploads = fed.masked_uploads(round_number, updates, weights, fed.sites)
    for upload in uploads.values():
        assert fed.server.receive_upload(upload, sender=upload.site) is None
    return participants, updates, uploads


def attack(fed, views, round_number=0):
    """Each site gets its own U (``views``); every signature is forwarded to everyone; each site is asked for X's
    self-seed share when X is in its U and for X's mask-key share when it is not. Returns the shares of X the
    server got and every refusal."""
    participants = fed.server.round_participants
    signed, refusals = {}, []
    for site, uploaded in views.items():
        try:
            signed[site] = (sorted(uploaded), fed.clients[site].consistency(round_number, uploaded))
        except RefusedError as err:
            refusals.append(str(err))
    signatures = {site: signature for site, (_, signature) in signed.items()}
    seed_shares, key_shares = [], []
    for site, (uploaded, _) in signed.items():
        outside = sorted(set(participants) - set(uploaded))
        request = UnmaskRequest(
            round_number,
            uploaded,
            signatures,
            {owner: fed.server.uploads[owner][site] for owner in uploaded},
            {owner: fed.server._key_ciphertexts[(owner, site)][round_number] for owner in outside},
        )
        try:
            answer = fed.clients[site].unmask(request)
        except RefusedError as err:
            refusals.append(str(err))
            continue
        if X in answer[SELF_SEED]:
            seed_shares.append(Share.from_bytes(answer[SELF_SEED][X]))
        if X in answer[KEY_SHARE]:
            key_shares.append(Share.from_bytes(answer[KEY_SHARE][X]))
    return seed_shares, key_shares, refusals


def recover(fed, upload, seed_shares, key_shares, round_number=0):
    """The server's last step: X's self seed and mask key from the shares, X's masks stripped, X's update decoded."""
    t = fed.config.threshold
    seed = reconstruct_secret(seed_shares, t)
    private = reconstruct_secret(key_shares, t)
    vector = np.array(upload.vector, copy=True)
    masks = [(self_mask_key(seed, JOB, round_number, X), -1)]
    for peer in fed.server.round_participants:
        if peer != X:
            shared = agree(private, fed.server.adverts[peer].mask_publics[round_number])
            masks.append((pair_mask_key(shared, JOB, round_number, X, peer), -1 if X < peer else 1))
    MaskStreamer().apply(vector, masks)
    weight, flat = decode_sum(vector, fed.server.fixed_point)
    return weight, flat


def test_recover_works_when_a_policy_lets_2t_le_n_the_positive_control():
    # 4 sites, t = 2, the floor switched off: two groups each sign their own U of size t
    fed = Federation(4, SecureSumConfig(threshold=2, clip=1.0, max_weight=10.0), policy=NoFloorPolicy(roster=None))
    _, updates, uploads = start(fed)
    views = {
        "site-1": [X, "site-2"],
        "site-2": [X, "site-2"],
        "site-3": ["site-3", "site-4"],
        "site-4": ["site-3", "site-4"],
    }
    seed_shares, key_shares, refusals = attack(fed, views)
    assert refusals == [] and len(seed_shares) == 2 and len(key_shares) == 2
    weight, flat = recover(fed, uploads[X], seed_shares, key_shares)
    assert weight == pytest.approx(3.0, abs=1e-6)
    np.testing.assert_allclose(flat, updates[X]["x"], atol=1e-6)  # X's exact update: the attack is real


def test_the_same_split_is_refused_by_the_sites_floor_before_any_key():
    with pytest.raises(RefusedError, match="threshold 2, below this site's floor 3"):
        Federation(4, SecureSumConfig(threshold=2))


def test_only_x_and_you_uploaded_is_refused_at_the_consistency_check():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed)
    views = {site: [X, site] for site in fed.sites if site != X} | {X: [X, "site-2"]}
    seed_shares, key_shares, refusals = attack(fed, views)
    assert seed_shares == [] and key_shares == []
    assert len(refusals) == 5 and all("|U| = 2 is below the threshold 3" in r for r in refusals)


def test_inconsistent_u_of_size_t_per_site_reveals_nothing():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed)
    others = [site for site in fed.sites if site != X]
    views = {site: [X, site, others[(i + 1) % 4]] for i, site in enumerate(others)} | {X: [X, "site-2", "site-3"]}
    seed_shares, key_shares, refusals = attack(fed, views)
    assert seed_shares == [] and key_shares == []
    assert len(refusals) == 5 and all("valid signatures over U" in r for r in refusals)


def test_the_split_with_2t_gt_n_cannot_get_both_secrets_of_x():
    fed = Federation(5, SecureSumConfig(threshold=3))
    _, _, uploads = start(fed)
    group_one, group_two = ["site-1", "site-2", "site-3"], ["site-4", "site-5"]
    views = {site: group_one for site in group_one} | {site: ["site-4", "site-5", "site-2"] for site in group_two}
    seed_shares, key_shares, refusals = attack(fed, views)
    # group one is a consistent round (the server may learn the sum over U); group two lacks a third signer
    assert len(seed_shares) == 3 and key_shares == []
    assert len(refusals) == 2 and all("only 2 valid signatures" in r for r in refusals)
    with pytest.raises(ValueError, match="need 3 shares"):
        recover(fed, uploads[X], seed_shares, key_shares)


def test_a_site_left_out_of_its_own_u_refuses():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed)
    with pytest.raises(RefusedError, match="site-1 is not in U"):
        fed.clients[X].consistency(0, ["site-2", "site-3", "site-4"])


def test_u_with_a_non_participant_or_a_duplicate_is_refused():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed)
    with pytest.raises(RefusedError, match="not participants"):
        fed.clients[X].consistency(0, [X, "site-2", "site-9"])
    with pytest.raises(RefusedError, match="twice"):
        fed.clients[X].consistency(0, [X, "site-2", "site-2"])


def test_requests_for_another_round_are_refused():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed, round_number=0)
    with pytest.raises(RefusedError, match="round it masked in last is 0"):
        fed.clients[X].consistency(1, fed.sites)
    signature = fed.clients[X].consistency(0, fed.sites)
    stale = UnmaskRequest(1, fed.sites, {X: signature}, {}, {})
    with pytest.raises(RefusedError, match="refuses to reveal shares for round 1"):
        fed.clients[X].unmask(stale)


def test_a_site_signs_one_u_per_round_and_reveals_once():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed)
    uploaded = fed.server.consistency_targets()
    for site in uploaded:
        fed.server.receive_signature(site, fed.clients[site].consistency(0, uploaded))
    with pytest.raises(RefusedError, match="already signed"):
        fed.clients[X].consistency(0, [X, "site-2", "site-3"])
    request = fed.server.unmask_requests()[X]
    assert fed.clients[X].unmask(request)[SELF_SEED]
    with pytest.raises(RefusedError, match="already revealed"):
        fed.clients[X].unmask(request)


def test_a_second_mask_in_one_round_or_an_earlier_round_is_refused():
    fed = Federation(3, SecureSumConfig(threshold=2))
    participants = fed.server.start_round(1)
    update = {"x": np.zeros(4)}
    fed.clients[X].mask(update, 1.0, 1, participants)
    with pytest.raises(RefusedError, match="already masked for round 1"):
        fed.clients[X].mask(update, 1.0, 1, participants)
    with pytest.raises(RefusedError, match="already masked for round 1"):
        fed.clients[X].mask(update, 1.0, 0, participants)


def test_signatures_forged_by_the_server_do_not_count():
    fed = Federation(5, SecureSumConfig(threshold=3))
    start(fed)
    uploaded = fed.sites
    own = fed.clients[X].consistency(0, uploaded)
    statement = _statement(JOB, 0, uploaded, fed.server.round_participants)
    forger = SiteKeys.generate()
    forged = {site: forger.sign(statement) for site in uploaded if site != X}
    request = UnmaskRequest(0, uploaded, {X: own, **forged}, {o: fed.server.uploads[o][X] for o in uploaded}, {})
    with pytest.raises(RefusedError, match="only 1 valid signatures"):
        fed.clients[X].unmask(request)


def test_both_shares_of_one_peer_are_never_revealed():
    fed = Federation(4, SecureSumConfig(threshold=3))
    participants, _, _ = start(fed)
    uploaded = ["site-1", "site-2", "site-3"]  # site-4's upload "rejected"
    signatures = {site: fed.clients[site].consistency(0, uploaded) for site in uploaded}
    seeds = {o: fed.server.uploads[o]["site-1"] for o in uploaded}
    greedy_key = {"site-2": fed.server._key_ciphertexts[("site-2", "site-1")][0]}  # site-2 is in U
    with pytest.raises(RefusedError, match=r"mask keys of \['site-2'\]"):
        fed.clients[X].unmask(UnmaskRequest(0, uploaded, signatures, seeds, greedy_key))
    extra_seed = {**seeds, "site-4": fed.server.uploads["site-4"]["site-1"]}  # site-4 is outside U
    with pytest.raises(RefusedError, match=r"self seeds of \['site-4'\]"):
        fed.clients[X].unmask(UnmaskRequest(0, uploaded, signatures, extra_seed, {}))
    # the honest request still works afterwards: nothing was revealed by the refused ones
    honest = {"site-4": fed.server._key_ciphertexts[("site-4", "site-1")][0]}
    answer = fed.clients[X].unmask(UnmaskRequest(0, uploaded, signatures, seeds, honest))
    assert set(answer[SELF_SEED]) == set(uploaded) and set(answer[KEY_SHARE]) == {"site-4"}
    assert participants == fed.sites


# -- setup: the server chooses the settings and the participants


@pytest.mark.parametrize(
    "config, policy, message",
    [
        (SecureSumConfig(threshold=2), SitePolicy(roster=tuple(site_names(5))), "below this site's floor 3"),
        (
            SecureSumConfig(threshold=3),
            SitePolicy(roster=tuple(site_names(5)), colluding_sites=2),
            "below this site's floor 4",
        ),
        (
            SecureSumConfig(threshold=3, server_blind=False),
            SitePolicy(roster=tuple(site_names(5)), require_server_blind=True),
            "requires the server-blind mode",
        ),
        (
            SecureSumConfig(threshold=3, neighbours=1),
            SitePolicy(roster=tuple(site_names(5))),
            "1 masking neighbours per site, below this site's floor 6",
        ),
        (SecureSumConfig(threshold=3), SitePolicy(roster=tuple(site_names(5)), min_threshold=4), "floor 4"),
    ],
)
def test_a_server_config_below_the_sites_floor_is_refused_before_any_key(config, policy, message):
    with pytest.raises(RefusedError, match=message):
        SecureSumClient(X, JOB, config, policy=policy, announced=site_names(5))


def test_the_complete_graph_passes_the_neighbour_floor_and_a_large_k_too():
    roster = tuple(site_names(20))
    SecureSumClient(X, JOB, SecureSumConfig(threshold=11, neighbours=10), policy=SitePolicy(roster), announced=roster)
    with pytest.raises(RefusedError, match="4 masking neighbours per site, below this site's floor 10"):
        SecureSumClient(
            X, JOB, SecureSumConfig(threshold=11, neighbours=4), policy=SitePolicy(roster), announced=roster
        )
    small = tuple(site_names(5))
    SecureSumClient(X, JOB, SecureSumConfig(threshold=3, neighbours=4), policy=SitePolicy(small), announced=small)


def test_announcing_a_site_outside_the_roster_is_refused():
    with pytest.raises(RefusedError, match=r"outside this site's roster: \['mallory'\]"):
        SecureSumClient(
            X,
            JOB,
            SecureSumConfig(threshold=3),
            policy=SitePolicy(tuple(site_names(4))),
            announced=[*site_names(4), "mallory"],
        )


def test_signatures_required_without_a_kit_are_refused():
    policy = SitePolicy(roster=tuple(site_names(3)), require_signed=True)
    with pytest.raises(RefusedError, match="requires signed advertisements but lacks"):
        SecureSumClient(X, JOB, SecureSumConfig(threshold=2), policy=policy, announced=site_names(3))


@pytest.fixture(scope="module")
def consortium():
    """A CA, signed kits for site-1..site-4 and the CA's other certificates an attacker could misuse."""
    ca = make_ca()
    sites = site_names(4)
    kits = {site: make_site_kit(ca, site) for site in sites}
    return ca, sites, kits


def signed_clients(consortium, config):
    ca, sites, kits = consortium
    policy = SitePolicy(roster=tuple(sites))
    return {
        site: SecureSumClient(site, JOB, config, *kits[site], root_ca_pem=ca_pem(ca), policy=policy, announced=sites)
        for site in sites
    }


def fake_advert(ca, name, config, **kit_args):
    keys = SiteKeys.generate(config.rounds)
    advert = Advertisement(name, JOB, keys.mask_publics, keys.share_public, keys.signing_public)
    from pharmafl.secure_sum.keys import sign_advertisement

    key_pem, cert_pem = kit_args.pop("kit", None) or make_site_kit(ca, name, **kit_args)
    return sign_advertisement(advert, key_pem, cert_pem)


def server_as_site(ca, config):
    """The server's certificate and key signing an advertisement in site-4's name."""
    advert = fake_advert(ca, "server", config, server_hosts=["localhost"])
    return dataclasses.replace(advert, site="site-4")


@pytest.mark.parametrize(
    "make, message",
    [
        # the server's own certificate (`nvflare provision`: no role, its host name in the SAN), as itself or
        # claiming a site's name; a server certificate of `nvflare cert` (role "server") with a site's name
        (lambda ca, c: fake_advert(ca, "server", c, server_hosts=["localhost"]), "not a member"),
        (lambda ca, c: server_as_site(ca, c), r"the certificate names \['server'\], not site-4"),
        (lambda ca, c: fake_advert(ca, "site-4", c, role="server"), "server certificate"),
        # an admin's certificate (its role in UNSTRUCTURED_NAME), as itself or claiming a site's name
        (lambda ca, c: fake_advert(ca, "lead@pharma-a.com", c, role="lead"), "not a member"),
        (lambda ca, c: fake_advert(ca, "site-4", c, role="lead"), r"lead \(admin\) certificate"),
        # a valid client certificate for a name outside the roster
        (lambda ca, c: fake_advert(ca, "site-9", c), "not a member"),
        # a certificate from a foreign CA, and the root CA's own certificate
        (lambda ca, c: fake_advert(make_ca("rogue"), "site-4", c), "not issued by the consortium root CA"),
        (lambda ca, c: fake_advert(ca, "site-4", c, kit=(None, None)), None),
    ],
)
def test_extra_participants_are_refused_and_no_share_is_sent(consortium, make, message):
    ca, sites, kits = consortium
    config = SecureSumConfig(threshold=3, rounds=2)
    clients = signed_clients(consortium, config)
    honest = [clients[site].advertise() for site in sites[:3]]
    if message is None:  # the CA certificate itself, signing with the CA key
        from secagg_kit import ca_key_pem

        fake = fake_advert(ca, "site-4", config, kit=(ca_key_pem(ca), ca_pem(ca)))
        message = "CA certificate"
    else:
        fake = make(ca, config)
    adverts = [*honest, fake]
    for site in sites[:3]:
        with pytest.raises(RefusedError, match=message):
            clients[site].share_keys(adverts)
        assert clients[site].peers == {} or clients[site].index == {}  # no shares were made


def test_advertisements_for_unannounced_sites_are_refused(consortium):
    ca, sites, _ = consortium
    config = SecureSumConfig(threshold=3, rounds=2)
    policy = SitePolicy(roster=tuple(sites))
    kits = consortium[2]
    clients = {
        s: SecureSumClient(s, JOB, config, *kits[s], root_ca_pem=ca_pem(ca), policy=policy, announced=sites[:3])
        for s in sites[:3]
    }
    late = SecureSumClient("site-4", JOB, config, *kits["site-4"], root_ca_pem=ca_pem(ca), policy=policy)
    adverts = [c.advertise() for c in clients.values()] + [late.advertise()]
    with pytest.raises(RefusedError, match=r"did not announce at setup: \['site-4'\]"):
        clients["site-1"].share_keys(adverts)


def test_unsigned_advertisements_are_refused_when_a_site_has_a_kit(consortium):
    ca, sites, _ = consortium
    config = SecureSumConfig(threshold=3, rounds=2)
    clients = signed_clients(consortium, config)
    unsigned = dataclasses.replace(clients["site-4"].advertise(), kit_signature=b"", kit_certificate=b"")
    adverts = [clients[site].advertise() for site in sites[:3]] + [unsigned]
    with pytest.raises(RefusedError, match="site-4 is not signed"):
        clients["site-1"].share_keys(adverts)


def test_nan_and_inf_are_refused_at_the_site_before_masking():
    fed = Federation(3, SecureSumConfig(threshold=2))
    participants = fed.server.start_round(0)
    for bad in (np.nan, np.inf, -np.inf):
        update = {"x": np.array([0.1, bad, 0.2], dtype=np.float32)}
        with pytest.raises(RefusedError, match="'x' holds 1 NaN or Inf"):
            fed.clients[X].mask(update, 1.0, 0, participants)
    for bad in ({"x": np.array([1, 2], dtype=np.int8)}, {"x": np.array([1j])}, {"x": [0.1, 0.2]}):
        with pytest.raises(RefusedError, match="not a float16/32/64 array"):
            fed.clients[X].mask(bad, 1.0, 0, participants)
    # refused attempts do not count as this round's mask: the site can still upload a good update
    assert fed.clients[X].mask({"x": np.zeros(3, np.float32)}, 1.0, 0, participants).round == 0


def test_a_stand_in_certificate_minted_by_the_ca_holder_is_refused_where_peers_are_pinned(consortium):
    from pharmafl.secure_sum.keys import certificate_sha256

    ca, sites, kits = consortium
    config = SecureSumConfig(threshold=3, rounds=2)
    minted = fake_advert(ca, "site-4", config)  # a valid client certificate for a roster name, a new key
    pins = {site: certificate_sha256(kits[site][1]) for site in sites}
    pinned = SitePolicy(roster=tuple(sites), pinned_certificates=pins)
    unpinned = SitePolicy(roster=tuple(sites))
    for policy, refused in ((pinned, True), (unpinned, False)):
        clients = {
            s: SecureSumClient(s, JOB, config, *kits[s], root_ca_pem=ca_pem(ca), policy=policy, announced=sites)
            for s in sites[:3]
        }
        adverts = [clients[s].advertise() for s in sites[:3]] + [minted]
        if refused:
            with pytest.raises(RefusedError, match="site-4 carries certificate .* not the one this site pinned"):
                clients["site-1"].share_keys(adverts)
        else:  # without pins, only the CA vouches for site-4: whoever holds its key can stand in
            assert "site-4" in clients["site-1"].share_keys(adverts)
