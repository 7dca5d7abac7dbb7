"""Key material of the secure sum: X25519, HKDF, AES-GCM shares, Ed25519 and startup-kit signatures.

Per job every site makes two X25519 key pairs (one to agree pairwise masks, one to encrypt Shamir shares to its
peers) and one Ed25519 key pair that signs its masked uploads. The three public keys form its advertisement,
which a provisioned site signs with its startup-kit private key (``client.key``, RSA or EC) so that every peer can
check it against the consortium root CA (``rootCA.pem``) and the server cannot substitute keys.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

_ADVERT_DOMAIN = b"pharmafl-secagg-advertisement-v1"
_UPLOAD_DOMAIN = b"pharmafl-secagg-upload-v2"
_CONSISTENCY_DOMAIN = b"pharmafl-secagg-consistency-v1"
_PARTICIPANTS_DOMAIN = b"pharmafl-secagg-participants-v1"
# FLARE 2.9 marks a certificate's role in the subject's UNSTRUCTURED_NAME: `nvflare provision` sets it for admins only
# (their role: project_admin, org_admin, lead, member), `nvflare cert` sets the kit type for every certificate
# ("client", "server", or an admin role). A client site's certificate carries no role or "client".
CLIENT_ROLES = ("", "client")
_NONCE_BYTES = 12


def _frame(*parts: bytes | str | int) -> bytes:
    """Unambiguous concatenation: each part length-prefixed (ints as 8-byte big-endian)."""
    out = bytearray()
    for part in parts:
        if isinstance(part, int):
            part = part.to_bytes(8, "big", signed=True)
        elif isinstance(part, str):
            part = part.encode()
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def _raw_public(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def x25519_public_bytes_of(raw_private: bytes) -> bytes:
    return _raw_public(x25519.X25519PrivateKey.from_private_bytes(raw_private).public_key())


def agree(private_raw: bytes, peer_public_raw: bytes) -> bytes:
    """The X25519 shared secret of a private key and a peer's public key (both raw 32 bytes)."""
    return x25519.X25519PrivateKey.from_private_bytes(private_raw).exchange(
        x25519.X25519PublicKey.from_public_bytes(peer_public_raw)
    )


def pair_mask_key(shared: bytes, job_id: str, round_number: int, site_a: str, site_b: str) -> bytes:
    """AES-256 key of the pairwise mask of two sites in one round: HKDF(shared secret, job, round, the pair)."""
    low, high = sorted((site_a, site_b))
    return hkdf(shared, _frame(b"pairwise-mask", job_id, round_number, low, high))


def self_mask_key(seed: bytes, job_id: str, round_number: int, site: str) -> bytes:
    return hkdf(seed, _frame(b"self-mask", job_id, round_number, site))


def group_mask_key(group_seed: bytes, job_id: str, round_number: int, site: str) -> bytes:
    return hkdf(group_seed, _frame(b"group-mask", job_id, round_number, site))


def share_cipher(own_private: bytes, peer_public: bytes, job_id: str) -> AESGCM:
    """The AES-GCM key two sites share for one job: HKDF over their X25519 share-encryption secret."""
    return AESGCM(hkdf(agree(own_private, peer_public), _frame(b"share-encryption", job_id)))


def _share_aad(sender: str, recipient: str, job_id: str, round_number: int, purpose: str) -> bytes:
    return _frame(b"share", sender, recipient, job_id, round_number, purpose)


def seal(
    cipher: AESGCM, plaintext: bytes, sender: str, recipient: str, job_id: str, round_number: int, purpose: str
) -> bytes:
    """AES-GCM encryption; the sender, recipient, job, round and purpose are authenticated as associated data."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, plaintext, _share_aad(sender, recipient, job_id, round_number, purpose))


def unseal(
    cipher: AESGCM, ciphertext: bytes, sender: str, recipient: str, job_id: str, round_number: int, purpose: str
) -> bytes:
    """Inverse of ``seal``; raises ValueError when the ciphertext or its context was altered."""
    aad = _share_aad(sender, recipient, job_id, round_number, purpose)
    try:
        return cipher.decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], aad)
    except Exception as err:
        raise ValueError(f"the share from {sender} to {recipient} does not decrypt: altered or misaddressed") from err


def encrypt_for_peer(
    plaintext: bytes,
    own_private: bytes,
    peer_public: bytes,
    sender: str,
    recipient: str,
    job_id: str,
    round_number: int,
    purpose: str,
) -> bytes:
    """``seal`` under the key of ``share_cipher(own_private, peer_public, job_id)``."""
    cipher = share_cipher(own_private, peer_public, job_id)
    return seal(cipher, plaintext, sender, recipient, job_id, round_number, purpose)


def decrypt_from_peer(
    ciphertext: bytes,
    own_private: bytes,
    peer_public: bytes,
    sender: str,
    recipient: str,
    job_id: str,
    round_number: int,
    purpose: str,
) -> bytes:
    """Inverse of ``encrypt_for_peer``; raises ValueError when the ciphertext or its context was altered."""
    cipher = share_cipher(own_private, peer_public, job_id)
    return unseal(cipher, ciphertext, sender, recipient, job_id, round_number, purpose)


@dataclass
class SiteKeys:
    """A site's per-job keys, raw bytes: one mask-agreement key per round, share encryption, upload signing.

    Mask keys are per round so that revealing a dropped site's key for one round (to strip its masks from that
    round's sum) reveals nothing about its uploads in other rounds.
    """

    mask_privates: list[bytes]
    share_private: bytes
    signing_private: bytes

    @classmethod
    def generate(cls, rounds: int = 1) -> SiteKeys:
        if rounds < 1:
            raise ValueError(f"need mask keys for at least one round, got {rounds}")
        return cls(
            [_raw_private(x25519.X25519PrivateKey.generate()) for _ in range(rounds)],
            _raw_private(x25519.X25519PrivateKey.generate()),
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            ),
        )

    @property
    def mask_publics(self) -> list[bytes]:
        return [x25519_public_bytes_of(private) for private in self.mask_privates]

    @property
    def share_public(self) -> bytes:
        return x25519_public_bytes_of(self.share_private)

    @property
    def signing_public(self) -> bytes:
        return _raw_public(ed25519.Ed25519PrivateKey.from_private_bytes(self.signing_private).public_key())

    def sign(self, message: bytes) -> bytes:
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.signing_private).sign(message)


def verify_ed25519(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class Advertisement:
    """A site's public keys for one job, optionally signed with its startup-kit key (certificate attached)."""

    site: str
    job_id: str
    mask_publics: list[bytes]  # one per round
    share_public: bytes
    signing_public: bytes
    kit_signature: bytes = b""
    kit_certificate: bytes = b""  # PEM

    def signed_bytes(self) -> bytes:
        return _frame(
            _ADVERT_DOMAIN,
            self.site,
            self.job_id,
            len(self.mask_publics),
            *self.mask_publics,
            self.share_public,
            self.signing_public,
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__, mask_publics=list(self.mask_publics))

    @classmethod
    def from_dict(cls, data: dict) -> Advertisement:
        try:
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            fields["mask_publics"] = [bytes(key) for key in fields["mask_publics"]]
            return cls(**fields)
        except (TypeError, KeyError) as err:
            raise ValueError(f"malformed advertisement: {err}") from err


def sign_advertisement(advert: Advertisement, kit_private_key_pem: bytes, kit_certificate_pem: bytes) -> Advertisement:
    """Sign with a startup-kit private key (RSA: PKCS#1 v1.5 SHA-256; EC: ECDSA SHA-256) and attach the cert."""
    key = serialization.load_pem_private_key(kit_private_key_pem, password=None)
    message = advert.signed_bytes()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:
        raise ValueError(f"unsupported startup-kit key type {type(key).__name__}; expected RSA, EC or Ed25519")
    advert.kit_signature = signature
    advert.kit_certificate = kit_certificate_pem
    return advert


def advertisement_problem(
    advert: Advertisement,
    root_ca_pem: bytes,
    now: datetime.datetime | None = None,
    roster: Sequence[str] | None = None,
) -> str | None:
    """Why a signed advertisement cannot be trusted (None if it can).

    The certificate must be issued by the root CA, be valid now, be a client site's certificate (not the CA's, not
    the server's, not an admin's: see ``CLIENT_ROLES``), name the advertising site as its common name, and its key must
    have signed the advertised public keys. With a ``roster`` the site must be on it.
    """
    if roster is not None and advert.site not in roster:
        return f"{advert.site!r} is not a member of this site's consortium roster {sorted(roster)}"
    if not advert.kit_signature or not advert.kit_certificate:
        return f"the advertisement of {advert.site} is not signed"
    try:
        ca = x509.load_pem_x509_certificate(root_ca_pem)
        cert = x509.load_pem_x509_certificate(advert.kit_certificate)
    except ValueError as err:
        return f"unreadable certificate in the advertisement of {advert.site} ({err})"
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return f"the certificate of {advert.site} is not issued by the consortium root CA"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return f"the certificate of {advert.site} is not valid now"
    kind = certificate_kind(cert)
    if kind != "client":
        return f"the advertisement of {advert.site} carries a {kind} certificate, not a client site's"
    names = [attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if advert.site not in names:
        return f"the certificate names {names}, not {advert.site}"
    public = cert.public_key()
    message = advert.signed_bytes()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(advert.kit_signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(advert.kit_signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(advert.kit_signature, message)
        else:
            return f"unsupported certificate key type {type(public).__name__} for {advert.site}"
    except InvalidSignature:
        return f"the advertisement of {advert.site} does not match its signature (keys swapped or altered)"
    return None


def certificate_kind(cert: x509.Certificate) -> str:
    """``client``, ``server``, ``CA`` or the admin role a FLARE 2.9 certificate was issued for.

    A CA certificate says so in BasicConstraints; the role is the subject's UNSTRUCTURED_NAME (``CLIENT_ROLES``).
    ``nvflare provision`` marks only admins, so its server certificate reads as ``client`` here: its common name
    (the server's host name) is what keeps it out, being on no site's roster.
    """
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "CA"
    except x509.ExtensionNotFound:
        pass
    roles = [str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME)]
    role = roles[0] if roles else ""
    if role == "server":
        return "server"
    return "client" if role in CLIENT_ROLES else f"{role} (admin)"


def certificate_sha256(certificate_pem: bytes) -> str:
    """SHA-256 (hex) of a PEM certificate's DER bytes: what a site policy pins."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def participants_digest(participants: Sequence[str]) -> bytes:
    """SHA-256 of a round's participant list (sorted), bound into every upload and consistency signature."""
    return hashlib.sha256(_frame(_PARTICIPANTS_DOMAIN, len(participants), *sorted(participants))).digest()


def consistency_statement(job_id: str, round_number: int, uploaded: Sequence[str], participants: bytes) -> bytes:
    """What a site signs in the consistency check: the job, the round, the set U of accepted uploads and the digest
    of the round's participant list (Bonawitz et al. 2017, round 4)."""
    return _frame(_CONSISTENCY_DOMAIN, job_id, round_number, len(uploaded), *sorted(uploaded), participants)


def upload_signed_bytes(
    job_id: str, round_number: int, site: str, payload_digest: bytes, participants: bytes = b""
) -> bytes:
    """What an upload's Ed25519 signature covers: the job, round, site, SHA-256 of the payload and the digest of the
    participant list the site masked for."""
    return _frame(_UPLOAD_DOMAIN, job_id, round_number, site, payload_digest, participants)
