"""Dropout-robust masked secure sum against an actively malicious server (Bonawitz et al. 2017), as two state machines.

Per job (key setup):
  1. the server announces the job's settings and sites; every site compares them with its own policy (roster,
     threshold floor, signatures, server-blind, neighbour degree) and refuses weaker settings before it makes a key;
     then it ``advertise``s its public keys, signed with its startup-kit key when it has one;
  2. with everyone's advertisement, every site checks each one (roster member, client certificate under the root CA)
     and ``share_keys``: Shamir t-of-n shares of its mask private keys (one X25519 key per round), each encrypted to
     its holder; the server only stores and forwards the ciphertexts.

Per round:
  3. the server names the round's participants P; each site ``mask``s its ``[w, w*x]`` encoding (finite values only)
     with its self mask (fresh seed, Shamir-shared with the upload) and its pairwise masks, signs (job, round, site,
     SHA-256 of the payload, digest of P) with its advertised Ed25519 key, and uploads; a site masks once per round;
  4. the server checks and sums the uploads (a replayed, tampered or mis-sized upload is rejected: a dropout). The
     set U of accepted uploads goes to every site in U (``consistency``): a site signs (job, round, U, digest of P)
     once per round, only if it is in U, U is a subset of P and |U| >= t;
  5. the server forwards the signatures; a site reveals its shares (``unmask``) only with at least t valid signatures
     by members of U over the statement it signed itself: self-seed shares of the members of U, mask-key shares of
     the participants outside U, never both for one peer, once per round, for the round it masked in only;
  6. with shares from at least t sites the server strips the masks; what remains is the exact sum over U.

Why the consistency check is enough: an honest site signs one U per round and reveals only for that U, so to get
both secrets of one site the server needs two statements each signed by t sites; with c colluding sites that takes
n + c >= 2t. Each site's policy sets t high enough (2t > n + c; with c = 0, a majority).

The neighbour-graph option (SecAgg+) draws pairwise masks only along a k-regular graph; shares still go to every
site, so any t of them can unmask. The server-blind option adds a group mask per uploader, from a seed that the
lowest-named site sends encrypted to every peer: the server then sees only a masked aggregate, which the sites
unblind. It is meant for linear aggregation only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pharmafl.secure_sum.config import SecureSumConfig, SitePolicy
from pharmafl.secure_sum.encoding import FixedPoint, decode_sum, encode_weighted
from pharmafl.secure_sum.graph import mask_graph
from pharmafl.secure_sum.keys import (
    Advertisement,
    SiteKeys,
    advertisement_problem,
    agree,
    certificate_sha256,
    consistency_statement,
    group_mask_key,
    pair_mask_key,
    participants_digest,
    seal,
    self_mask_key,
    share_cipher,
    sign_advertisement,
    unseal,
    upload_signed_bytes,
    verify_ed25519,
    x25519_public_bytes_of,
)
from pharmafl.secure_sum.prg import MaskStreamer
from pharmafl.secure_sum.shamir import Share, reconstruct_secret, split_secret

log = logging.getLogger(__name__)

_SETUP_ROUND = -1  # the round number bound into setup-time ciphertexts
KEY_SHARE, SELF_SEED, GROUP_SEED = "mask-key-share", "self-seed-share", "group-seed"
FLOAT_DTYPES = ("float16", "float32", "float64")

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each array, in upload order


class SecureSumError(RuntimeError):
    """The protocol cannot go on (fewer than t sites left, inconsistent shares); the round produces no aggregate."""


class RefusedError(SecureSumError):
    """A site refuses what the server asked: a policy floor, a replay, a request that would reveal too much."""


@dataclass
class MaskedUpload:
    """What a site sends in a round: the masked encoding, its self-seed shares (encrypted), the signature."""

    site: str
    round: int
    layout: Layout
    vector: np.ndarray
    self_seed_shares: dict[str, bytes]  # recipient -> ciphertext
    signature: bytes = b""

    def digest(self) -> bytes:
        h = hashlib.sha256()
        h.update(json.dumps([[n, list(s), d] for n, s, d in self.layout]).encode())
        h.update(str(self.vector.dtype).encode() + self.vector.size.to_bytes(8, "big"))
        h.update(memoryview(np.ascontiguousarray(self.vector)).cast("B"))
        for recipient in sorted(self.self_seed_shares):
            h.update(recipient.encode() + b"\0" + self.self_seed_shares[recipient])
        return h.digest()

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "round": self.round,
            "layout": [[n, list(s), d] for n, s, d in self.layout],
            "vector": self.vector,
            "self_seed_shares": dict(self.self_seed_shares),
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> MaskedUpload:
        try:
            return cls(
                site=str(data["site"]),
                round=int(data["round"]),
                layout=[(str(n), tuple(int(x) for x in s), str(d)) for n, s, d in data["layout"]],
                vector=np.asarray(data["vector"]),
                self_seed_shares={str(k): bytes(v) for k, v in dict(data["self_seed_shares"]).items()},
                signature=bytes(data["signature"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed masked upload: {err}") from err


@dataclass
class UnmaskRequest:
    """The server's question to one site after the consistency check: U, everyone's signatures over it, and the
    ciphertexts of the shares to reveal (self seeds of U's members, mask keys of participants outside U)."""

    round: int
    uploaded: list[str]
    signatures: dict[str, bytes]  # signer -> Ed25519 signature over the consistency statement
    self_seed_ciphertexts: dict[str, bytes]  # owner (in U) -> ciphertext addressed to this site
    key_ciphertexts: dict[str, bytes]  # owner (participant outside U) -> ciphertext addressed to this site

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping) -> UnmaskRequest:
        try:
            return cls(
                round=int(data["round"]),
                uploaded=[str(site) for site in data["uploaded"]],
                signatures={str(k): bytes(v) for k, v in dict(data["signatures"]).items()},
                self_seed_ciphertexts={str(k): bytes(v) for k, v in dict(data["self_seed_ciphertexts"]).items()},
                key_ciphertexts={str(k): bytes(v) for k, v in dict(data["key_ciphertexts"]).items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed unmasking request: {err}") from err


@dataclass
class SecureSumResult:
    """A round's outcome at the server.

    Args:
        uploaded: U, the sites whose uploads are in the sum.
        dropped: participants whose uploads are not (never came or were rejected).
        signers: sites that signed U in the consistency check.
        survivors: sites whose shares unmasked the round.
        total_weight: sum of the uploaders' (clipped) weights; None when server-blind.
        mean: the weighted mean, per array name; None when server-blind.
        blind_sum: the aggregate still under the group masks (server-blind only).
        upload_digests: SHA-256 (hex) of each accepted upload.
        signatures: each signer's signature (hex) over the consistency statement.
        statement_sha256: SHA-256 (hex) of the consistency statement.
    """

    round: int
    uploaded: list[str]
    dropped: list[str]
    signers: list[str]
    survivors: list[str]
    total_weight: float | None = None
    mean: dict[str, np.ndarray] | None = None
    blind_sum: np.ndarray | None = None
    layout: Layout = field(default_factory=list)
    upload_digests: dict[str, str] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)
    statement_sha256: str = ""


def flatten_update(update: Mapping[str, np.ndarray]) -> tuple[Layout, list[np.ndarray]]:
    """The layout (sorted names, shapes, dtypes) and arrays of an update dict."""
    names = sorted(update)
    arrays = [np.asarray(update[name]) for name in names]
    return [(name, tuple(a.shape), str(a.dtype)) for name, a in zip(names, arrays, strict=True)], arrays


def unflatten(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[offset : offset + size].reshape(shape).astype(dtype, copy=False)
        offset += size
    return out


def layout_size(layout: Layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in layout)


def update_values_problem(update: Mapping[str, object]) -> str | None:
    """Why an update cannot be masked: not float16/32/64 arrays, or NaN/Inf (clipping cannot bound them)."""
    if not isinstance(update, Mapping) or not update:
        return "the update is empty or not a dict of arrays"
    for name in sorted(update):
        value = update[name]
        if not isinstance(value, np.ndarray) or value.dtype.name not in FLOAT_DTYPES:
            kind = value.dtype.name if isinstance(value, np.ndarray) else type(value).__name__
            return f"'{name}' is {kind}, not a float16/32/64 array"
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:
            return f"'{name}' holds {bad} NaN or Inf value(s)"
    return None


def _sign_towards(site: str, peer: str) -> int:
    return 1 if site < peer else -1


def _statement(job_id: str, round_number: int, uploaded: Sequence[str], participants: Sequence[str]) -> bytes:
    return consistency_statement(job_id, round_number, sorted(uploaded), participants_digest(participants))


def check_advertisements(
    adverts: Sequence[Advertisement],
    job_id: str,
    config: SecureSumConfig,
    root_ca_pem: bytes,
    require_signed: bool,
    members: Sequence[str] | None = None,
    pins: Mapping[str, str] | None = None,
) -> dict[str, Advertisement]:
    """The advertisements by site, each checked: one per site, this job, one mask key per round, a member of the
    consortium (``members``), signed by a client certificate under the root CA when one is given (required when
    ``require_signed``), carrying the pinned certificate where ``pins`` names one, and at least t of them. Raises
    RefusedError naming the first problem."""
    if require_signed and not root_ca_pem:
        raise RefusedError("signed advertisements are required but no root CA certificate was given")
    by_site: dict[str, Advertisement] = {}
    for advert in adverts:
        if advert.site in by_site:
            raise RefusedError(f"two advertisements for {advert.site}")
        if advert.job_id != job_id:
            raise RefusedError(f"the advertisement of {advert.site} is for job {advert.job_id}, not {job_id}")
        if len(advert.mask_publics) != config.rounds:
            raise RefusedError(
                f"{advert.site} advertised mask keys for {len(advert.mask_publics)} rounds, the job has {config.rounds}"
            )
        if members is not None and advert.site not in members:
            raise RefusedError(f"an advertisement for {advert.site!r}, who is not a member {sorted(members)}")
        if root_ca_pem:
            problem = advertisement_problem(advert, root_ca_pem, roster=members)
            if problem:
                raise RefusedError(problem)
        if pins and advert.site in pins:
            pinned = pins[advert.site]
            actual = certificate_sha256(advert.kit_certificate) if advert.kit_certificate else "none"
            if actual != pinned:
                raise RefusedError(
                    f"the advertisement of {advert.site} carries certificate {actual[:16]}, not the one this site "
                    f"pinned ({pinned[:16]})"
                )
        by_site[advert.site] = advert
    if len(by_site) < config.threshold:
        raise RefusedError(f"{len(by_site)} sites advertised keys; the threshold needs at least {config.threshold}")
    return by_site


@dataclass
class _MaskedRound:
    """What a site did in the round it masked: the participants, its upload, the U it signed, what it revealed."""

    participants: list[str]
    upload_digest: bytes
    uploaded: list[str] | None = None  # the U this site signed
    signature: bytes = b""
    revealed: bool = False


class SecureSumClient:
    """One site's side of the protocol for one job.

    Construction checks the server's ``config`` and the ``announced`` sites against the site's ``policy`` and
    raises RefusedError before any key exists when they fall short of it.

    Args:
        site: this site's name.
        job_id: the job (bound into every key derivation and signature).
        config: the job's settings, as the server sent them.
        kit_private_key_pem, kit_certificate_pem: the site's startup-kit key and certificate, to sign the
            advertisement (empty: unsigned).
        root_ca_pem: the consortium root CA; when given every peer's advertisement must verify against it.
        policy: this site's own floor (default: no roster, a majority threshold, signatures when a kit is given).
        announced: the sites the server names for the job (default: this site only; the roster check then applies
            to the advertisements alone).
    """

    def __init__(
        self,
        site: str,
        job_id: str,
        config: SecureSumConfig,
        kit_private_key_pem: bytes = b"",
        kit_certificate_pem: bytes = b"",
        root_ca_pem: bytes = b"",
        policy: SitePolicy | None = None,
        announced: Sequence[str] | None = None,
    ):
        self.site, self.job_id, self.config = site, job_id, config
        self.policy = policy or SitePolicy()
        self.announced = sorted(set(announced)) if announced is not None else None
        problem = self.policy.config_problem(config, self.announced or [site])
        if problem:
            raise RefusedError(f"{site} refuses the secure-sum settings: {problem}")
        self.require_signed = self.policy.signatures_required(bool(kit_private_key_pem))
        if self.require_signed and not (kit_private_key_pem and kit_certificate_pem and root_ca_pem):
            raise RefusedError(
                f"{site} requires signed advertisements but lacks its startup-kit key, certificate or root CA"
            )
        self.kit_private_key_pem, self.kit_certificate_pem = kit_private_key_pem, kit_certificate_pem
        self.root_ca_pem = root_ca_pem
        self.keys = SiteKeys.generate(config.rounds)
        self.peers: dict[str, Advertisement] = {}
        self._ciphers: dict = {}  # peer -> AES-GCM key of the pair
        self.index: dict[str, int] = {}
        self.authenticated = False
        self._group_seed: bytes | None = None
        self._rounds: dict[int, _MaskedRound] = {}
        self._last_masked = -1
        self._streamer = MaskStreamer()

    @property
    def members(self) -> list[str] | None:
        """The consortium as this site knows it (its roster, else the announced sites); None when neither."""
        if self.policy.roster is not None:
            return list(self.policy.roster)
        return self.announced

    def advertise(self) -> Advertisement:
        advert = Advertisement(
            self.site, self.job_id, self.keys.mask_publics, self.keys.share_public, self.keys.signing_public
        )
        if self.kit_private_key_pem:
            sign_advertisement(advert, self.kit_private_key_pem, self.kit_certificate_pem)
        return advert

    def share_keys(self, adverts: Sequence[Advertisement]) -> dict[str, dict[str, bytes]]:
        """Check every advertisement; returns {recipient: {kind: ciphertext(s)}}: the recipient's shares of this
        site's mask key of each round (a list, by round) and, server-blind, the group seed."""
        members = self.members
        self.peers = check_advertisements(
            adverts,
            self.job_id,
            self.config,
            self.root_ca_pem,
            self.require_signed,
            members,
            self.policy.pinned_certificates,
        )
        if self.announced is not None:
            unannounced = sorted(set(self.peers) - set(self.announced))
            if unannounced:
                raise RefusedError(f"advertisements for sites the server did not announce at setup: {unannounced}")
        own = self.peers.get(self.site)
        if own is None or (list(own.mask_publics), own.share_public, own.signing_public) != (
            self.keys.mask_publics,
            self.keys.share_public,
            self.keys.signing_public,
        ):
            raise RefusedError(f"the advertisement list does not carry {self.site}'s own keys unchanged")
        self.authenticated = bool(self.root_ca_pem)
        if not self.authenticated:
            log.warning("secure sum %s: advertisements are not authenticated (no startup kit / root CA)", self.site)
        try:
            self.fixed_point  # noqa: B018 - the encoding for this many sites: refuse an overflow now, not at a mask
        except ValueError as err:
            raise RefusedError(f"refusing the secure-sum settings before sending any key: {err}") from err
        ordered = sorted(self.peers)
        self.index = {site: i + 1 for i, site in enumerate(ordered)}
        by_round = [split_secret(key, self.config.threshold, len(ordered)) for key in self.keys.mask_privates]
        out: dict[str, dict] = {}
        if self.config.server_blind and self.site == ordered[0]:
            self._group_seed = os.urandom(32)
        for recipient in ordered:
            position = self.index[recipient] - 1
            message = {
                KEY_SHARE: [
                    self._encrypt(shares[position].to_bytes(), recipient, KEY_SHARE, round_number)
                    for round_number, shares in enumerate(by_round)
                ]
            }
            if self._group_seed is not None:
                message[GROUP_SEED] = self._encrypt(self._group_seed, recipient, GROUP_SEED)
            out[recipient] = message
        return out

    def mask(
        self,
        update: Mapping[str, np.ndarray],
        weight: float,
        round_number: int,
        participants: Sequence[str],
        group_seed_ciphertext: bytes = b"",
    ) -> MaskedUpload:
        """The signed masked upload of ``[w, w*update]`` for ``round_number``; at most one per round.

        Args:
            update: float16/32/64 arrays by name, every value finite.
            weight: this site's weight (e.g. local steps).
            round_number: the current round, later than any this site masked in before.
            participants: the sites the server names for this round (this one included).
            group_seed_ciphertext: server-blind only: the group seed addressed to this site.
        """
        if not self.peers:
            raise SecureSumError(f"{self.site} has no key setup to mask with")
        if not isinstance(round_number, int) or isinstance(round_number, bool):
            raise RefusedError(f"refusing to mask: the round number {round_number!r} is not an integer")
        if round_number <= self._last_masked:
            raise RefusedError(
                f"refusing to mask for round {round_number}: {self.site} already masked for round "
                f"{self._last_masked}; it masks at most once per round, rounds only increase"
            )
        participants = sorted(set(participants))
        unknown = sorted(set(participants) - set(self.peers))
        if self.site not in participants or unknown:
            raise RefusedError(f"bad participant list for {self.site}: {participants} (unknown: {unknown})")
        if len(participants) < self.config.threshold:
            raise RefusedError(
                f"only {len(participants)} participants in round {round_number}; the threshold is "
                f"{self.config.threshold}"
            )
        if not 0 <= round_number < self.config.rounds:
            raise RefusedError(f"no mask key for round {round_number}: key setup made {self.config.rounds} rounds")
        problem = update_values_problem(update)
        if problem:
            raise RefusedError(f"refusing to mask the update of round {round_number}: {problem}")
        if isinstance(weight, bool) or not (np.isfinite(weight) and weight > 0):
            raise RefusedError(f"refusing to mask the update of round {round_number}: weight {weight!r}")
        layout, arrays = flatten_update(update)
        vector = encode_weighted(arrays, weight, self.fixed_point)
        seed = os.urandom(32)
        masks = [(self_mask_key(seed, self.job_id, round_number, self.site), 1)]
        graph = mask_graph(participants, self.job_id, round_number, self.config.graph_degree(len(participants)))
        for peer in sorted(graph[self.site]):
            shared = agree(self.keys.mask_privates[round_number], self.peers[peer].mask_publics[round_number])
            masks.append(
                (pair_mask_key(shared, self.job_id, round_number, self.site, peer), _sign_towards(self.site, peer))
            )
        if self.config.server_blind:
            masks.append(
                (group_mask_key(self._group_seed_from(group_seed_ciphertext), self.job_id, round_number, self.site), 1)
            )
        self._streamer.apply(vector, masks)
        shares = split_secret(seed, self.config.threshold, len(self.index))
        encrypted = {
            recipient: self._encrypt(shares[self.index[recipient] - 1].to_bytes(), recipient, SELF_SEED, round_number)
            for recipient in participants
        }
        upload = MaskedUpload(self.site, round_number, layout, vector, encrypted)
        digest = upload.digest()  # one SHA-256 pass over the vector: the largest cost after masking
        upload.signature = self.keys.sign(
            upload_signed_bytes(self.job_id, round_number, self.site, digest, participants_digest(participants))
        )
        self._rounds[round_number] = _MaskedRound(participants, digest)
        self._last_masked = round_number
        return upload

    def masked_round(self, round_number: int) -> _MaskedRound | None:
        return self._rounds.get(round_number)

    def consistency(self, round_number: int, uploaded: Sequence[str]) -> bytes:
        """Sign U for the round this site masked in (Bonawitz's round 4); at most one U per round."""
        state = self._current(round_number, "sign U")
        uploaded = sorted(uploaded)
        problem = self._uploaded_problem(state, uploaded)
        if problem:
            raise RefusedError(f"{self.site} refuses to sign U for round {round_number}: {problem}")
        if state.uploaded is not None:
            if state.uploaded != uploaded:
                raise RefusedError(
                    f"{self.site} refuses to sign U for round {round_number}: it already signed {state.uploaded}, "
                    f"now asked for {uploaded}"
                )
            return state.signature
        state.uploaded = uploaded
        state.signature = self.keys.sign(_statement(self.job_id, round_number, uploaded, state.participants))
        return state.signature

    def unmask(self, request: UnmaskRequest) -> dict[str, dict[str, bytes]]:
        """This site's shares for the server: self-seed shares of U's members, mask-key shares of participants
        outside U; only with t valid signatures over the U this site signed, once per round."""
        state = self._current(request.round, "reveal shares")
        refuse = f"{self.site} refuses to reveal its shares for round {request.round}"
        uploaded = sorted(request.uploaded)
        if state.uploaded is None:
            raise RefusedError(f"{refuse}: it has not signed U for this round")
        if uploaded != state.uploaded:
            raise RefusedError(f"{refuse}: the request's U {uploaded} is not the U {state.uploaded} it signed")
        if state.revealed:
            raise RefusedError(f"{refuse}: it already revealed its shares for this round")
        statement = _statement(self.job_id, request.round, uploaded, state.participants)
        valid = sorted(
            signer
            for signer, signature in request.signatures.items()
            if signer in uploaded
            and signer in self.peers
            and verify_ed25519(self.peers[signer].signing_public, signature, statement)
        )
        if len(valid) < self.config.threshold:
            raise RefusedError(
                f"{refuse}: only {len(valid)} valid signatures over U by its members ({valid}), the threshold is "
                f"{self.config.threshold}"
            )
        outside = set(state.participants) - set(uploaded)
        wrong_seed = sorted(set(request.self_seed_ciphertexts) - set(uploaded))
        wrong_key = sorted(set(request.key_ciphertexts) - outside)
        if wrong_seed or wrong_key:
            raise RefusedError(
                f"{refuse}: it reveals self-seed shares only for U and mask-key shares only for participants "
                f"outside U (asked self seeds of {wrong_seed}, mask keys of {wrong_key})"
            )
        answer: dict[str, dict[str, bytes]] = {SELF_SEED: {}, KEY_SHARE: {}}
        for owner, ciphertext in request.self_seed_ciphertexts.items():
            answer[SELF_SEED][owner] = self._decrypt(ciphertext, owner, SELF_SEED, request.round)
        for owner, ciphertext in request.key_ciphertexts.items():
            answer[KEY_SHARE][owner] = self._decrypt(ciphertext, owner, KEY_SHARE, request.round)
        state.revealed = True
        return answer

    def unblind(
        self,
        blind_sum: np.ndarray,
        round_number: int,
        uploaded: Sequence[str],
        layout: Layout,
        group_seed_ciphertext: bytes = b"",
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Server-blind: (total weight, weighted mean) from the aggregate, removing the uploaders' group masks."""
        if not self.config.server_blind:
            raise SecureSumError("unblind is for the server-blind mode only")
        unknown = sorted(set(uploaded) - set(self.peers))
        if unknown:
            raise SecureSumError(f"the aggregate of round {round_number} names uploaders who have no keys: {unknown}")
        if any(dtype not in FLOAT_DTYPES for _, _, dtype in layout):
            raise SecureSumError(f"the aggregate of round {round_number} has a non-float layout")
        seed = self._group_seed_from(group_seed_ciphertext)
        total = np.array(blind_sum, dtype=self.fixed_point.dtype, copy=True)
        self._streamer.apply(total, [(group_mask_key(seed, self.job_id, round_number, site), -1) for site in uploaded])
        weight, flat = decode_sum(total, self.fixed_point)
        return weight, unflatten(flat, layout)

    @property
    def fixed_point(self) -> FixedPoint:
        return self.config.fixed_point(max(len(self.peers), 1))

    def _current(self, round_number: int, what: str) -> _MaskedRound:
        if round_number != self._last_masked or round_number not in self._rounds:
            raise RefusedError(
                f"{self.site} refuses to {what} for round {round_number}: the round it masked in last is "
                f"{self._last_masked}"
            )
        return self._rounds[round_number]

    def _uploaded_problem(self, state: _MaskedRound, uploaded: list[str]) -> str | None:
        if len(set(uploaded)) != len(uploaded):
            return "U names a site twice"
        if self.site not in uploaded:
            return f"{self.site} is not in U {uploaded}, though it uploaded"
        strangers = sorted(set(uploaded) - set(state.participants))
        if strangers:
            return f"U names sites that are not participants of the round: {strangers}"
        if len(uploaded) < self.config.threshold:
            return f"|U| = {len(uploaded)} is below the threshold {self.config.threshold}"
        return None

    def _group_seed_from(self, ciphertext: bytes) -> bytes:
        if self._group_seed is None:
            if not ciphertext:
                raise SecureSumError(f"server-blind mode, but {self.site} has not received the group seed")
            lowest = min(self.peers)
            self._group_seed = self._decrypt(ciphertext, lowest, GROUP_SEED, _SETUP_ROUND)
        return self._group_seed

    def _cipher(self, peer: str):
        if peer not in self._ciphers:
            self._ciphers[peer] = share_cipher(self.keys.share_private, self.peers[peer].share_public, self.job_id)
        return self._ciphers[peer]

    def _encrypt(self, plaintext: bytes, recipient: str, purpose: str, round_number: int = _SETUP_ROUND) -> bytes:
        return seal(self._cipher(recipient), plaintext, self.site, recipient, self.job_id, round_number, purpose)

    def _decrypt(self, ciphertext: bytes, sender: str, purpose: str, round_number: int) -> bytes:
        if sender not in self.peers:
            raise SecureSumError(f"a share from {sender}, who advertised no keys")
        try:
            return unseal(self._cipher(sender), ciphertext, sender, self.site, self.job_id, round_number, purpose)
        except ValueError as err:
            raise RefusedError(str(err)) from err


class SecureSumServer:
    """The server's side: routes ciphertexts, checks and sums uploads, runs the consistency check, unmasks the sum.

    Args:
        job_id: the job.
        config: the job's settings (the same as the sites').
        root_ca_pem: when given, advertisements must verify against it (the sites check them too).
    """

    def __init__(self, job_id: str, config: SecureSumConfig, root_ca_pem: bytes = b""):
        self.job_id, self.config, self.root_ca_pem = job_id, config, root_ca_pem
        self.adverts: dict[str, Advertisement] = {}
        self._key_ciphertexts: dict[tuple[str, str], list[bytes]] = {}  # (owner, holder) -> mask-key share by round
        self.group_seed_ciphertexts: dict[str, bytes] = {}
        self.key_holders: set[str] = set()
        self.revealed: set[tuple[str, int]] = set()  # (site, round) mask keys the server reconstructed
        self._streamer = MaskStreamer()
        self._layout: Layout | None = None
        self._start_round(None)

    # -- setup
    def register_advertisements(self, adverts: Sequence[Advertisement]) -> list[Advertisement]:
        """Check the advertisements (unique, right job, signed when a root CA is set); returns them for broadcast."""
        self.adverts = check_advertisements(
            adverts, self.job_id, self.config, self.root_ca_pem, self.config.require_signed
        )
        return [self.adverts[s] for s in sorted(self.adverts)]

    def register_key_shares(self, owner: str, messages: Mapping[str, Mapping[str, bytes]]) -> None:
        """Keep a site's encrypted shares (and the group seed, server-blind) until a round needs them."""
        if owner not in self.adverts:
            raise SecureSumError(f"key shares from {owner}, who advertised no keys")
        if set(messages) != set(self.adverts):
            raise SecureSumError(f"{owner} sent key shares for {sorted(messages)}, not for every advertised site")
        for holder, message in messages.items():
            shares = [bytes(ciphertext) for ciphertext in message[KEY_SHARE]]
            if len(shares) != self.config.rounds:
                raise SecureSumError(
                    f"{owner} sent {holder} key shares for {len(shares)} rounds, not {self.config.rounds}"
                )
            self._key_ciphertexts[(owner, holder)] = shares
            if GROUP_SEED in message and owner == min(self.adverts):
                self.group_seed_ciphertexts[holder] = bytes(message[GROUP_SEED])
        self.key_holders.add(owner)

    @property
    def fixed_point(self) -> FixedPoint:
        return self.config.fixed_point(max(len(self.adverts), 1))

    # -- rounds
    def participants(self) -> list[str]:
        """Sites that may take part in a round: those that shared their mask keys at setup."""
        return sorted(self.key_holders)

    def start_round(self, round_number: int, expected_layout: Layout | None = None) -> list[str]:
        """Begin a round; returns its participants. Raises SecureSumError when fewer than t are left."""
        participants = self.participants()
        if not 0 <= round_number < self.config.rounds:
            raise SecureSumError(f"no mask keys for round {round_number}: key setup made {self.config.rounds} rounds")
        if len(participants) < self.config.threshold:
            raise SecureSumError(
                f"only {len(participants)} sites can take part in round {round_number} ({participants}); "
                f"the secure sum needs at least {self.config.threshold}"
            )
        self._start_round(round_number, participants, expected_layout)
        return participants

    def _start_round(self, round_number: int | None, participants: Sequence[str] = (), layout: Layout | None = None):
        self.round = round_number
        self.round_participants = list(participants)
        self.expected_layout = [(n, tuple(s), d) for n, s, d in layout] if layout else None
        self.accumulator: np.ndarray | None = None
        self.uploads: dict[str, dict[str, bytes]] = {}  # uploader -> its self-seed share ciphertexts
        self.upload_digests: dict[str, str] = {}
        self.signatures: dict[str, bytes] = {}

    def receive_upload(self, upload: MaskedUpload, sender: str | None = None) -> str | None:
        """Add an upload to the sum; returns why it was rejected (then it counts as a dropout), None if accepted.

        Args:
            upload: the masked upload.
            sender: the sender's authenticated identity (FLARE's); the upload must be its own.
        """
        if self.round is None:
            return "no round in progress"
        if sender is not None and upload.site != sender:
            return f"an upload claiming to be from {upload.site}, sent by {sender}"
        if upload.site not in self.round_participants:
            return f"{upload.site} is not a participant of round {self.round}"
        if upload.site in self.uploads:
            return f"second upload from {upload.site} in round {self.round}"
        if upload.round != self.round:
            return f"upload for round {upload.round}, the current round is {self.round} (replayed or stale)"
        digest = upload.digest()  # computed once: it hashes the whole vector
        signed = upload_signed_bytes(
            self.job_id, upload.round, upload.site, digest, participants_digest(self.round_participants)
        )
        if not verify_ed25519(self.adverts[upload.site].signing_public, upload.signature, signed):
            return f"the signature of {upload.site}'s upload does not verify (tampered, replayed or forged)"
        if any(dtype not in FLOAT_DTYPES for _, _, dtype in upload.layout):
            return f"{upload.site}'s upload declares non-float arrays"
        layout = self.expected_layout or self._layout  # else the layout of the first upload ever accepted
        if layout is not None and [(n, tuple(s)) for n, s, _ in upload.layout] != [(n, tuple(s)) for n, s, _ in layout]:
            return f"{upload.site}'s upload has a different layout (array names or shapes) from the round's"
        fixed_point = self.fixed_point
        expected = 1 + layout_size(upload.layout)
        if upload.vector.dtype != fixed_point.dtype or upload.vector.ndim != 1 or upload.vector.size != expected:
            return (
                f"{upload.site}'s masked vector is {upload.vector.dtype} x {upload.vector.size}, expected "
                f"{np.dtype(fixed_point.dtype)} x {expected}"
            )
        if set(upload.self_seed_shares) != set(self.round_participants):
            return f"{upload.site}'s upload does not carry a self-mask share for every participant"
        if self.accumulator is None:
            self.accumulator = np.array(upload.vector, copy=True)
            self._layout = upload.layout
        else:
            np.add(self.accumulator, upload.vector, out=self.accumulator)
        self.uploads[upload.site] = dict(upload.self_seed_shares)
        self.upload_digests[upload.site] = digest.hex()
        return None

    @property
    def uploaded(self) -> list[str]:
        return sorted(self.uploads)

    def statement(self) -> bytes:
        return _statement(self.job_id, self.round, self.uploaded, self.round_participants)

    def consistency_targets(self) -> list[str]:
        """U, the sites asked to sign it; raises SecureSumError with fewer than t uploads."""
        if len(self.uploads) < self.config.threshold:
            raise SecureSumError(
                f"only {len(self.uploads)} valid uploads in round {self.round} ({self.uploaded}); unmasking needs "
                f"{self.config.threshold} sites"
            )
        return self.uploaded

    def receive_signature(self, site: str, signature: bytes) -> str | None:
        """Keep a site's consistency signature; returns why it is refused (None if kept)."""
        if site not in self.uploads:
            return f"a consistency signature from {site}, who is not in U"
        if not verify_ed25519(self.adverts[site].signing_public, bytes(signature), self.statement()):
            return f"{site}'s consistency signature does not verify over U"
        self.signatures[site] = bytes(signature)
        return None

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """One request per signer of U: everyone's signatures and the ciphertexts of the shares it must reveal."""
        signers = sorted(self.signatures)
        if len(signers) < self.config.threshold:
            raise SecureSumError(
                f"only {len(signers)} sites signed U in round {self.round} ({signers}); unmasking needs "
                f"{self.config.threshold}"
            )
        uploaded = self.uploaded
        dropped = sorted(set(self.round_participants) - set(uploaded))
        return {
            holder: UnmaskRequest(
                self.round,
                uploaded,
                dict(self.signatures),
                {owner: self.uploads[owner][holder] for owner in uploaded},
                {owner: self._key_ciphertexts[(owner, holder)][self.round] for owner in dropped},
            )
            for holder in signers
        }

    def finish(
        self, responses: Mapping[str, Mapping[str, Mapping[str, bytes]]], decode: bool = True
    ) -> SecureSumResult:
        """Strip the masks with the survivors' shares; the weighted mean (or the blind sum) of the uploads.

        Raises SecureSumError when fewer than t sites answered or the shares are inconsistent.

        Args:
            responses: each surviving site's answer to its ``unmask_requests`` entry.
            decode: decode the unmasked sum into the weighted mean (False: leave it in ``blind_sum``, as the
                server-blind mode always does).
        """
        uploaded = self.uploaded
        dropped = sorted(set(self.round_participants) - set(uploaded))
        survivors = sorted(site for site in responses if site in self.signatures)
        t = self.config.threshold
        if len(survivors) < t:
            raise SecureSumError(
                f"round {self.round} cannot be unmasked: {len(survivors)} sites returned shares ({survivors}), "
                f"the threshold is {t}"
            )
        index = {site: i + 1 for i, site in enumerate(sorted(self.adverts))}
        x_of = {i: s for s, i in index.items()}

        def shares_for(kind: str, owner: str) -> list[Share]:
            out = []
            for holder in survivors:
                raw = responses[holder].get(kind, {}).get(owner)
                if raw is not None:
                    share = Share.from_bytes(bytes(raw))
                    if x_of.get(share.x) != holder:
                        raise SecureSumError(f"{holder} returned a share with the wrong index for {owner}")
                    out.append(share)
            return out

        masks: list[tuple[bytes, int]] = []
        for owner in uploaded:
            try:
                seed = reconstruct_secret(shares_for(SELF_SEED, owner), t)
            except ValueError as err:
                raise SecureSumError(f"cannot recover {owner}'s self mask in round {self.round}: {err}") from err
            masks.append((self_mask_key(seed, self.job_id, self.round, owner), -1))
        graph = mask_graph(
            self.round_participants, self.job_id, self.round, self.config.graph_degree(len(self.round_participants))
        )
        for owner in dropped:
            try:
                private = reconstruct_secret(shares_for(KEY_SHARE, owner), t)
            except ValueError as err:
                raise SecureSumError(f"cannot recover {owner}'s mask key in round {self.round}: {err}") from err
            if x25519_public_bytes_of(private) != self.adverts[owner].mask_publics[self.round]:
                raise SecureSumError(f"the shares of {owner}'s mask key are inconsistent with its advertised key")
            self.revealed.add((owner, self.round))
            for peer in sorted(graph[owner] & set(uploaded)):
                shared = agree(private, self.adverts[peer].mask_publics[self.round])
                masks.append((pair_mask_key(shared, self.job_id, self.round, peer, owner), -_sign_towards(peer, owner)))
        assert self.accumulator is not None
        self._streamer.apply(self.accumulator, masks)
        result = SecureSumResult(
            self.round,
            uploaded,
            dropped,
            sorted(self.signatures),
            survivors,
            layout=self._layout,
            upload_digests=dict(self.upload_digests),
            signatures={site: signature.hex() for site, signature in self.signatures.items()},
            statement_sha256=hashlib.sha256(self.statement()).hexdigest(),
        )
        if self.config.server_blind or not decode:
            result.blind_sum = self.accumulator
        else:
            weight, flat = decode_sum(self.accumulator, self.fixed_point)
            result.total_weight, result.mean = weight, unflatten(flat, self._layout)
        self._start_round(None)
        return result

    def abandon_round(self) -> dict:
        """End a round that cannot be unmasked; returns what the ledger keeps of it (participants, accepted
        uploads, signatures received)."""
        evidence = {
            "participants": list(self.round_participants),
            "accepted": dict(self.upload_digests),
            "dropped": sorted(set(self.round_participants) - set(self.uploads)),
            "signatures": {site: signature.hex() for site, signature in self.signatures.items()},
            "statement_sha256": hashlib.sha256(self.statement()).hexdigest() if self.round is not None else "",
        }
        self._start_round(None)
        return evidence
