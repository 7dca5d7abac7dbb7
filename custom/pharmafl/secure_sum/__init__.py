"""Masked secure sum (Bonawitz et al. 2017, with the SecAgg+ neighbour graph as an option): pure protocol code.

``protocol`` holds the site and server state machines, with the consistency check that makes them hold against an
actively malicious server; ``config`` the server's settings and each site's own policy; ``ledger`` the hash-chained
round records; ``encoding`` (fixed point), ``shamir`` (t-of-n shares), ``keys`` (X25519, HKDF, AES-GCM, Ed25519,
startup-kit signatures), ``prg`` (AES-CTR masks streamed into the accumulator) and ``graph`` (who masks with whom)
are the parts. No FLARE imports: the FLARE adapters live in ``pharmafl.flare``.
"""

from pharmafl.secure_sum.config import PolicyError, SecureSumConfig, SitePolicy
from pharmafl.secure_sum.encoding import FixedPoint, choose_fixed_point, decode_sum, encode_weighted
from pharmafl.secure_sum.protocol import (
    MaskedUpload,
    RefusedError,
    SecureSumClient,
    SecureSumError,
    SecureSumResult,
    SecureSumServer,
    UnmaskRequest,
)

__all__ = [
    "FixedPoint",
    "MaskedUpload",
    "PolicyError",
    "RefusedError",
    "SecureSumClient",
    "SecureSumConfig",
    "SecureSumError",
    "SecureSumResult",
    "SecureSumServer",
    "SitePolicy",
    "UnmaskRequest",
    "choose_fixed_point",
    "decode_sum",
    "encode_weighted",
]
