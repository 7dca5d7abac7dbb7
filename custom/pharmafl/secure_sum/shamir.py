"""Shamir t-of-n secret sharing of short secrets (32-byte keys and seeds) over the prime field GF(2^521 - 1).

A secret s becomes the constant term of a random polynomial f of degree t - 1; share i is (i, f(i)) for
i = 1..n. Any t shares give s back by Lagrange interpolation at 0; t - 1 shares are consistent with every secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 64-byte secret
SECRET_BYTES = 32
_SHARE_VALUE_BYTES = 66  # ceil(521 / 8)


@dataclass(frozen=True)
class Share:
    """Point (x, f(x)) of the sharing polynomial; x >= 1 is the holder's index."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_SHARE_VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 2 + _SHARE_VALUE_BYTES:
            raise ValueError(f"a share is {2 + _SHARE_VALUE_BYTES} bytes, got {len(data)}")
        return cls(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))


def split_secret(secret: bytes, threshold: int, holders: int) -> list[Share]:
    """``holders`` shares of ``secret``, any ``threshold`` of which reconstruct it.

    Args:
        secret: the bytes to share (at most 64).
        threshold: t, shares needed (1 <= t <= holders).
        holders: n, shares made, for x = 1..n (at most 65535).
    """
    if not 1 <= threshold <= holders:
        raise ValueError(f"need 1 <= threshold <= holders, got threshold {threshold} and {holders} holders")
    if holders > 0xFFFF:
        raise ValueError(f"at most 65535 holders, got {holders}")
    if len(secret) > 64:
        raise ValueError(f"secrets are at most 64 bytes, got {len(secret)}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x, y))
    return shares


def reconstruct_secret(shares: Sequence[Share], threshold: int, length: int = SECRET_BYTES) -> bytes:
    """The secret from at least ``threshold`` shares with distinct x (Lagrange interpolation at 0).

    Raises ValueError with fewer than ``threshold`` distinct shares, or when the result does not fit ``length`` bytes
    (a sign of inconsistent shares).
    """
    distinct = {share.x: share for share in shares}
    if len(distinct) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct the secret, got {len(distinct)}")
    points = [distinct[x] for x in sorted(distinct)[:threshold]]
    secret = interpolate_at_zero(points)
    if secret >= 2 ** (8 * length):
        raise ValueError("the shares are inconsistent: the reconstructed value does not fit the secret's length")
    return secret.to_bytes(length, "big")


def interpolate_at_zero(points: Sequence[Share]) -> int:
    """f(0) of the polynomial of degree len(points) - 1 through ``points`` (mod PRIME)."""
    total = 0
    for i, pi in enumerate(points):
        numerator, denominator = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                numerator = numerator * (-pj.x) % PRIME
                denominator = denominator * (pi.x - pj.x) % PRIME
        total = (total + pi.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total
