"""Masked secure sum (Bonawitz et al. 2017, with the SecAgg+ neighbour graph as an option): pure protocol code.

``protocol`` holds the site and server state machines; ``encoding`` (fixed point), ``shamir`` (t-of-n shares),
``keys`` (X25519, HKDF, AES-GCM, Ed25519, startup-kit signatures), ``prg`` (AES-CTR masks streamed into the
accumulator) and ``graph`` (who masks with whom) are the parts. No FLARE imports: the FLARE adapters live in
``pharmafl.flare``.
"""

from pharmafl.aggregation.secure_sum.encoding import FixedPoint, choose_fixed_point, decode_sum, encode_weighted
from pharmafl.aggregation.secure_sum.protocol import (
    MaskedUpload,
    SecureSumClient,
    SecureSumConfig,
    SecureSumError,
    SecureSumResult,
    SecureSumServer,
    UnmaskRequest,
)

__all__ = [
    "FixedPoint",
    "MaskedUpload",
    "SecureSumClient",
    "SecureSumConfig",
    "SecureSumError",
    "SecureSumResult",
    "SecureSumServer",
    "UnmaskRequest",
    "choose_fixed_point",
    "decode_sum",
    "encode_weighted",
]
