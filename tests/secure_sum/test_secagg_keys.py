import dataclasses
import os
import sys
from pathlib import Path

import pytest

from pharmafl.secure_sum.keys import (
    Advertisement,
    SiteKeys,
    advertisement_problem,
    agree,
    decrypt_from_peer,
    encrypt_for_peer,
    pair_mask_key,
    sign_advertisement,
    upload_signed_bytes,
    verify_ed25519,
)

sys.path.insert(0, str(Path(__file__).parent))
from secagg_kit import ca_pem, make_ca, make_site_kit  # noqa: E402


@pytest.fixture(scope="module")
def ca():
    return make_ca()


def advert_for(site: str, keys: SiteKeys) -> Advertisement:
    return Advertisement(site, "job-1", keys.mask_publics, keys.share_public, keys.signing_public)


def test_pairwise_agreement_is_symmetric_and_bound_to_round_and_job():
    a, b, c = SiteKeys.generate(), SiteKeys.generate(), SiteKeys.generate()
    ab = agree(a.mask_privates[0], b.mask_publics[0])
    assert ab == agree(b.mask_privates[0], a.mask_publics[0])
    assert ab != agree(a.mask_privates[0], c.mask_publics[0])
    key = pair_mask_key(ab, "job-1", 0, "site-1", "site-2")
    assert key == pair_mask_key(ab, "job-1", 0, "site-2", "site-1")
    assert key != pair_mask_key(ab, "job-1", 1, "site-1", "site-2")
    assert key != pair_mask_key(ab, "job-2", 0, "site-1", "site-2")


def test_mask_keys_are_fresh_per_round():
    keys = SiteKeys.generate(rounds=3)
    assert len(set(keys.mask_privates)) == 3 and len(set(keys.mask_publics)) == 3
    advert = advert_for("site-1", keys)
    assert Advertisement.from_dict(advert.to_dict()) == advert


def test_share_encryption_binds_sender_recipient_job_round():
    a, b = SiteKeys.generate(), SiteKeys.generate()
    context = ("site-a", "site-b", "job-1", 3, "self-seed-share")
    ciphertext = encrypt_for_peer(b"secret share", a.share_private, b.share_public, *context)
    assert decrypt_from_peer(ciphertext, b.share_private, a.share_public, *context) == b"secret share"
    assert b"secret share" not in ciphertext
    for changed in [
        ("site-c", "site-b", "job-1", 3, "self-seed-share"),
        ("site-a", "site-c", "job-1", 3, "self-seed-share"),
        ("site-a", "site-b", "job-2", 3, "self-seed-share"),
        ("site-a", "site-b", "job-1", 4, "self-seed-share"),
        ("site-a", "site-b", "job-1", 3, "mask-key-share"),
    ]:
        with pytest.raises(ValueError, match="does not decrypt"):
            decrypt_from_peer(ciphertext, b.share_private, a.share_public, *changed)
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(ValueError):
        decrypt_from_peer(tampered, b.share_private, a.share_public, *context)


def test_upload_signature_covers_job_round_site_and_payload():
    keys = SiteKeys.generate()
    digest = os.urandom(32)
    signature = keys.sign(upload_signed_bytes("job-1", 2, "site-1", digest))
    assert verify_ed25519(keys.signing_public, signature, upload_signed_bytes("job-1", 2, "site-1", digest))
    assert not verify_ed25519(keys.signing_public, signature, upload_signed_bytes("job-1", 1, "site-1", digest))
    assert not verify_ed25519(keys.signing_public, signature, upload_signed_bytes("job-1", 2, "site-2", digest))
    assert not verify_ed25519(keys.signing_public, signature, upload_signed_bytes("job-1", 2, "site-1", os.urandom(32)))
    assert not verify_ed25519(
        SiteKeys.generate().signing_public, signature, upload_signed_bytes("job-1", 2, "site-1", digest)
    )


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signed_advertisement_verifies_and_swapped_key_is_rejected(ca, kind):
    key_pem, cert_pem = make_site_kit(ca, "site-1", kind)
    advert = sign_advertisement(advert_for("site-1", SiteKeys.generate()), key_pem, cert_pem)
    assert advertisement_problem(advert, ca_pem(ca)) is None
    # the server swaps the mask key for one it controls
    swapped = dataclasses.replace(advert, mask_publics=SiteKeys.generate().mask_publics)
    assert "does not match its signature" in advertisement_problem(swapped, ca_pem(ca))
    # the same signed keys claimed by another site
    assert "not site-2" in advertisement_problem(dataclasses.replace(advert, site="site-2"), ca_pem(ca))


def test_advertisement_from_a_foreign_ca_or_unsigned_is_rejected(ca):
    other_ca = make_ca("rogue")
    key_pem, cert_pem = make_site_kit(other_ca, "site-1")
    advert = sign_advertisement(advert_for("site-1", SiteKeys.generate()), key_pem, cert_pem)
    assert "not issued by the consortium root CA" in advertisement_problem(advert, ca_pem(ca))
    assert "not signed" in advertisement_problem(advert_for("site-1", SiteKeys.generate()), ca_pem(ca))
