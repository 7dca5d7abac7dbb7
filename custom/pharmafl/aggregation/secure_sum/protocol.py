"""Dropout-robust masked secure sum (Bonawitz et al. 2017, semi-honest server), as two state machines.

Per job (key setup):
  1. every site ``advertise``s its public keys (signed with its startup-kit key when it has one);
  2. with everyone's advertisement, every site ``share_keys``: Shamir t-of-n shares of its mask private keys (one
     X25519 key per round), each encrypted to its holder; the server only stores and forwards the ciphertexts.

Per round:
  3. the server names the round's participants (sites whose mask key is still secret); each ``mask``s its
     ``[w, w*x]`` encoding with its self mask (fresh seed, Shamir-shared with the upload) and its pairwise masks
     (added towards higher-named peers, subtracted towards lower), signs (job, round, site, SHA-256 of the payload)
     with its advertised Ed25519 key, and uploads;
  4. the server checks and sums the uploads (a replayed, tampered or mis-sized upload is rejected: a dropout), then
     asks the sites that uploaded for the shares it needs: self-seed shares of sites that uploaded, mask-key shares
     of sites that did not. A site never reveals both for the same peer in a round;
  5. with shares from at least t sites the server strips the self masks of the uploaders and the pairwise masks
     between uploaders and dropped sites; what remains is the exact sum of the uploads. Only the dropped site's
     mask key of that round is revealed, so it can rejoin later rounds, and its uploads of other rounds stay hidden.

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

from pharmafl.aggregation.secure_sum.encoding import FixedPoint, choose_fixed_point, decode_sum, encode_weighted
from pharmafl.aggregation.secure_sum.graph import default_neighbours, mask_graph
from pharmafl.aggregation.secure_sum.keys import (
    Advertisement,
    SiteKeys,
    advertisement_problem,
    agree,
    group_mask_key,
    pair_mask_key,
    seal,
    self_mask_key,
    share_cipher,
    sign_advertisement,
    unseal,
    upload_signed_bytes,
    verify_ed25519,
    x25519_public_bytes_of,
)
from pharmafl.aggregation.secure_sum.prg import MaskStreamer
from pharmafl.aggregation.secure_sum.shamir import Share, reconstruct_secret, split_secret

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "fra-lora")
_SETUP_ROUND = -1  # the round number bound into setup-time ciphertexts
KEY_SHARE, SELF_SEED, GROUP_SEED = "mask-key-share", "self-seed-share", "group-seed"

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each array, in upload order


class SecureSumError(RuntimeError):
    """The protocol cannot go on (fewer than t sites left, inconsistent shares); the round produces no aggregate."""


@dataclass(frozen=True)
class SecureSumConfig:
    """Settings every party of a job must share.

    Args:
        threshold: t, the sites needed to unmask a round (Shamir threshold); at least 2 and more than half of the
            sites is the usual choice.
        clip: update values are clipped to ``[-clip, clip]``.
        max_weight: client weights (local steps) are clipped to this.
        fraction_bits: quantization ``2^-fraction_bits``; None: as many as the modulus allows (at most 40).
        modulus_bits: 32 or 64; None: chosen (64 unless fraction_bits fits in 32).
        neighbours: None for pairwise masks between all sites, 0 for the SecAgg+ default k = 2 ceil(log2 n), or k.
        server_blind: add a group mask known to the sites only; the server sees just a masked aggregate.
        aggregation: ``mean`` (linear) or ``fra-lora`` (the server factorises the mean: not server-blind).
        require_signed: every advertisement must be signed by a startup-kit key under the root CA.
        rounds: rounds the key setup makes mask keys for (rounds 0 .. rounds - 1).
    """

    threshold: int
    clip: float = 8.0
    max_weight: float = 1e4
    fraction_bits: int | None = None
    modulus_bits: int | None = None
    neighbours: int | None = None
    server_blind: bool = False
    aggregation: str = "mean"
    require_signed: bool = False
    rounds: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or self.threshold < 1:
            raise ValueError(f"threshold must be a positive integer, got {self.threshold!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.server_blind and self.aggregation != "mean":
            raise ValueError(
                f"server-blind secure sum supports only linear aggregation (the mean), not {self.aggregation}: "
                "the server must see the mean update to factorise it"
            )
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.neighbours is not None and self.neighbours < 0:
            raise ValueError(f"neighbours must be None, 0 (automatic) or positive, got {self.neighbours}")

    def fixed_point(self, max_clients: int) -> FixedPoint:
        return choose_fixed_point(self.clip, self.max_weight, max_clients, self.fraction_bits, self.modulus_bits)

    def graph_degree(self, sites: int) -> int | None:
        if self.neighbours is None:
            return None
        return self.neighbours or default_neighbours(sites)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
    """The server's question to one site after gathering: which shares to reveal, as the ciphertexts it holds."""

    round: int
    uploaded: list[str]
    dropped: list[str]
    self_seed_ciphertexts: dict[str, bytes]  # owner (uploaded) -> ciphertext addressed to this site
    key_ciphertexts: dict[str, bytes]  # owner (dropped) -> ciphertext addressed to this site

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping) -> UnmaskRequest:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass
class SecureSumResult:
    """A round's outcome at the server.

    Args:
        uploaded: sites whose uploads are in the sum.
        dropped: participants whose uploads are not (never came or were rejected).
        survivors: sites whose shares unmasked the round.
        total_weight: sum of the uploaders' (clipped) weights; None when server-blind.
        mean: the weighted mean, per array name; None when server-blind.
        blind_sum: the aggregate still under the group masks (server-blind only).
    """

    round: int
    uploaded: list[str]
    dropped: list[str]
    survivors: list[str]
    total_weight: float | None = None
    mean: dict[str, np.ndarray] | None = None
    blind_sum: np.ndarray | None = None
    layout: Layout = field(default_factory=list)


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


def _sign_towards(site: str, peer: str) -> int:
    return 1 if site < peer else -1


def _check_advertisements(
    adverts: Sequence[Advertisement], job_id: str, config: SecureSumConfig, root_ca_pem: bytes
) -> dict[str, Advertisement]:
    by_site: dict[str, Advertisement] = {}
    for advert in adverts:
        if advert.site in by_site:
            raise SecureSumError(f"two advertisements for {advert.site}")
        if advert.job_id != job_id:
            raise SecureSumError(f"the advertisement of {advert.site} is for job {advert.job_id}, not {job_id}")
        if len(advert.mask_publics) != config.rounds:
            raise SecureSumError(
                f"{advert.site} advertised mask keys for {len(advert.mask_publics)} rounds, the job has {config.rounds}"
            )
        if root_ca_pem:
            problem = advertisement_problem(advert, root_ca_pem)
            if problem:
                raise SecureSumError(problem)
        elif config.require_signed:
            raise SecureSumError("signed advertisements are required but no root CA certificate was given")
        by_site[advert.site] = advert
    if len(by_site) < config.threshold:
        raise SecureSumError(f"{len(by_site)} sites advertised keys; the threshold needs at least {config.threshold}")
    return by_site


class SecureSumClient:
    """One site's side of the protocol for one job.

    Args:
        site: this site's name.
        job_id: the job (bound into every key derivation and signature).
        config: the job's settings.
        kit_private_key_pem, kit_certificate_pem: the site's startup-kit key and certificate, to sign the
            advertisement (empty: unsigned).
        root_ca_pem: the consortium root CA; when given every peer's advertisement must verify against it.
    """

    def __init__(
        self,
        site: str,
        job_id: str,
        config: SecureSumConfig,
        kit_private_key_pem: bytes = b"",
        kit_certificate_pem: bytes = b"",
        root_ca_pem: bytes = b"",
    ):
        self.site, self.job_id, self.config = site, job_id, config
        self.kit_private_key_pem, self.kit_certificate_pem = kit_private_key_pem, kit_certificate_pem
        self.root_ca_pem = root_ca_pem
        self.keys = SiteKeys.generate(config.rounds)
        self.peers: dict[str, Advertisement] = {}
        self._ciphers: dict = {}  # peer -> AES-GCM key of the pair
        self.index: dict[str, int] = {}
        self.authenticated = False
        self._group_seed: bytes | None = None
        self._revealed: dict[int, dict[str, str]] = {}  # round -> owner -> what was revealed
        self._streamer = MaskStreamer()

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
        self.peers = _check_advertisements(adverts, self.job_id, self.config, self.root_ca_pem)
        own = self.peers.get(self.site)
        if own is None or (list(own.mask_publics), own.share_public, own.signing_public) != (
            self.keys.mask_publics,
            self.keys.share_public,
            self.keys.signing_public,
        ):
            raise SecureSumError(f"the advertisement list does not carry {self.site}'s own keys unchanged")
        self.authenticated = bool(self.root_ca_pem)
        if not self.authenticated:
            log.warning("secure sum %s: advertisements are not authenticated (no startup kit / root CA)", self.site)
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
        """The signed masked upload of ``[w, w*update]`` for ``round_number``.

        Args:
            update: arrays by name (any float dtype and shapes).
            weight: this site's weight (e.g. local steps).
            round_number: the current round.
            participants: the sites the server names for this round (this one included).
            group_seed_ciphertext: server-blind only: the group seed addressed to this site.
        """
        participants = sorted(set(participants))
        unknown = sorted(set(participants) - set(self.peers))
        if self.site not in participants or unknown:
            raise SecureSumError(f"bad participant list for {self.site}: {participants} (unknown: {unknown})")
        if len(participants) < self.config.threshold:
            raise SecureSumError(
                f"only {len(participants)} participants in round {round_number}; the threshold is "
                f"{self.config.threshold}"
            )
        if not 0 <= round_number < self.config.rounds:
            raise SecureSumError(f"no mask key for round {round_number}: key setup made {self.config.rounds} rounds")
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
        upload.signature = self.keys.sign(upload_signed_bytes(self.job_id, round_number, self.site, upload.digest()))
        return upload

    def unmask(self, request: UnmaskRequest) -> dict[str, dict[str, bytes]]:
        """This site's shares for the server: self-seed shares of uploaders, mask-key shares of dropped sites."""
        uploaded, dropped = set(request.uploaded), set(request.dropped)
        if uploaded & dropped:
            raise SecureSumError(
                f"refusing to unmask round {request.round}: {sorted(uploaded & dropped)} listed as both "
                "uploaded and dropped"
            )
        if self.site in dropped:
            raise SecureSumError(f"refusing to unmask round {request.round}: {self.site} is listed as dropped")
        revealed = self._revealed.setdefault(request.round, {})
        answer: dict[str, dict[str, bytes]] = {SELF_SEED: {}, KEY_SHARE: {}}
        for owner, ciphertext in request.self_seed_ciphertexts.items():
            if owner not in uploaded or revealed.get(owner, SELF_SEED) != SELF_SEED:
                raise SecureSumError(f"refusing to reveal {owner}'s self-mask share in round {request.round}")
            answer[SELF_SEED][owner] = self._decrypt(ciphertext, owner, SELF_SEED, request.round)
            revealed[owner] = SELF_SEED
        for owner, ciphertext in request.key_ciphertexts.items():
            if owner not in dropped or revealed.get(owner, KEY_SHARE) != KEY_SHARE:
                raise SecureSumError(f"refusing to reveal {owner}'s mask-key share in round {request.round}")
            answer[KEY_SHARE][owner] = self._decrypt(ciphertext, owner, KEY_SHARE, request.round)
            revealed[owner] = KEY_SHARE
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
        seed = self._group_seed_from(group_seed_ciphertext)
        total = np.array(blind_sum, dtype=self.fixed_point.dtype, copy=True)
        self._streamer.apply(total, [(group_mask_key(seed, self.job_id, round_number, site), -1) for site in uploaded])
        weight, flat = decode_sum(total, self.fixed_point)
        return weight, unflatten(flat, layout)

    @property
    def fixed_point(self) -> FixedPoint:
        return self.config.fixed_point(max(len(self.peers), 1))

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
        return unseal(self._cipher(sender), ciphertext, sender, self.site, self.job_id, round_number, purpose)


class SecureSumServer:
    """The server's side: routes ciphertexts, checks and sums uploads, unmasks the sum. It never sees one update.

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
        self.adverts = _check_advertisements(adverts, self.job_id, self.config, self.root_ca_pem)
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

    def receive_upload(self, upload: MaskedUpload) -> str | None:
        """Add an upload to the sum; returns why it was rejected (then it counts as a dropout), None if accepted."""
        if self.round is None:
            return "no round in progress"
        if upload.site not in self.round_participants:
            return f"{upload.site} is not a participant of round {self.round}"
        if upload.site in self.uploads:
            return f"second upload from {upload.site} in round {self.round}"
        if upload.round != self.round:
            return f"upload for round {upload.round}, the current round is {self.round} (replayed or stale)"
        signed = upload_signed_bytes(self.job_id, upload.round, upload.site, upload.digest())
        if not verify_ed25519(self.adverts[upload.site].signing_public, upload.signature, signed):
            return f"the signature of {upload.site}'s upload does not verify (tampered, replayed or forged)"
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
        return None

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """One request per site that uploaded: the ciphertexts of the shares it must reveal."""
        uploaded = sorted(self.uploads)
        dropped = sorted(set(self.round_participants) - set(uploaded))
        if len(uploaded) < self.config.threshold:
            raise SecureSumError(
                f"only {len(uploaded)} valid uploads in round {self.round} ({uploaded}); unmasking needs "
                f"{self.config.threshold} sites"
            )
        return {
            holder: UnmaskRequest(
                self.round,
                uploaded,
                dropped,
                {owner: self.uploads[owner][holder] for owner in uploaded},
                {owner: self._key_ciphertexts[(owner, holder)][self.round] for owner in dropped},
            )
            for holder in uploaded
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
        uploaded = sorted(self.uploads)
        dropped = sorted(set(self.round_participants) - set(uploaded))
        survivors = sorted(site for site in responses if site in self.uploads)
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
        result = SecureSumResult(self.round, uploaded, dropped, survivors, layout=self._layout)
        if self.config.server_blind or not decode:
            result.blind_sum = self.accumulator
        else:
            weight, flat = decode_sum(self.accumulator, self.fixed_point)
            result.total_weight, result.mean = weight, unflatten(flat, self._layout)
        self._start_round(None)
        return result
