"""Fixed-point encoding of a weighted update ``[w, w*x]`` into integers modulo 2^32 or 2^64.

Each client clips ``x`` to ``[-clip, clip]`` and ``w`` to ``(0, max_weight]``, scales by ``2^fraction_bits`` and
rounds stochastically (unbiased: ``E[q] = v * 2^f``). The entries are ``w`` itself (at most ``max_weight``) and
``w * x`` (at most ``max_weight * clip``), so every encoded entry has magnitude at most
``B = ceil(max_weight * max(clip, 1) * 2^f)``, the rounding included. The sum of ``n`` entries must stay inside the
signed range of the modulus, ``n * (B + 1) < 2^(bits - 1)``; a configuration that could break this is refused.
NaN and Inf are refused before encoding: clipping cannot bound them.

Decoding the sum of n uploads gives ``sum w`` and ``sum w x`` each within ``n * 2^-f`` of the exact values (each
stochastic rounding moves an entry by less than one unit), so the weighted mean of in-range inputs is within
``mean_error_bound`` of the plaintext weighted mean.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SUPPORTED_MODULUS_BITS = (32, 64)
FLOAT_EXACT = 2**52  # encoded magnitudes stay below this so that float64 rounding is exact to the unit
# Elements encoded per step: bounds the float64 temporaries to a few MiB whatever the vector length.
_ENCODE_CHUNK = 1 << 16


@dataclass(frozen=True)
class FixedPoint:
    """How updates become integers modulo ``2^modulus_bits``.

    Args:
        clip: every update value is clipped to ``[-clip, clip]`` before encoding.
        max_weight: largest client weight (e.g. local steps); larger weights are clipped to it.
        fraction_bits: quantization step ``2^-fraction_bits``.
        modulus_bits: 32 or 64.
        max_clients: most uploads that may be summed.
    """

    clip: float
    max_weight: float
    fraction_bits: int
    modulus_bits: int
    max_clients: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and np.isfinite(self.clip)):
            raise ValueError(f"clip must be a positive number, got {self.clip}")
        if not (self.max_weight > 0 and np.isfinite(self.max_weight)):
            raise ValueError(f"max_weight must be a positive number, got {self.max_weight}")
        if self.modulus_bits not in SUPPORTED_MODULUS_BITS:
            raise ValueError(f"modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if not isinstance(self.fraction_bits, int) or self.fraction_bits < 0:
            raise ValueError(f"fraction_bits must be a non-negative integer, got {self.fraction_bits}")
        if not isinstance(self.max_clients, int) or self.max_clients < 1:
            raise ValueError(f"max_clients must be a positive integer, got {self.max_clients}")
        if self.entry_bound >= FLOAT_EXACT:
            raise ValueError(
                f"max_weight {self.max_weight} x max(clip {self.clip}, 1) x 2^{self.fraction_bits} is not below "
                "2^52, so float64 cannot round it to the unit; lower fraction_bits"
            )
        worst = self.max_clients * (self.entry_bound + 1)
        if worst >= 2 ** (self.modulus_bits - 1):
            raise ValueError(
                f"the secure sum could overflow: {self.max_clients} clients x (max_weight {self.max_weight} x "
                f"max(clip {self.clip}, 1) x 2^{self.fraction_bits} + 1) = {worst:.4g} does not fit below "
                f"2^{self.modulus_bits - 1}"
                f"; lower fraction_bits, clip or max_weight, or use a 64-bit modulus"
            )

    @property
    def dtype(self) -> type:
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    @property
    def scale(self) -> float:
        return float(2**self.fraction_bits)

    @property
    def entry_bound(self) -> int:
        """Largest magnitude of one encoded entry, the weight ``w <= max_weight`` and ``w * x`` alike."""
        return int(np.ceil(self.max_weight * max(self.clip, 1.0) * self.scale))

    def sum_error_bound(self, clients: int) -> float:
        """Largest difference between the decoded sum of ``clients`` uploads and the exact sum, per entry."""
        return clients / self.scale

    def mean_error_bound(self, clients: int, total_weight: float, mean_abs_max: float) -> float:
        """Bound on |secure weighted mean - plaintext weighted mean| for inputs inside the clipping range.

        Args:
            clients: number of uploads summed.
            total_weight: sum of the (unclipped) weights.
            mean_abs_max: largest magnitude of the plaintext weighted mean.
        """
        e = self.sum_error_bound(clients)
        if total_weight <= e:
            return float("inf")
        return e * (1.0 + mean_abs_max) / (total_weight - e)


def choose_fixed_point(
    clip: float, max_weight: float, max_clients: int, fraction_bits: int | None = None, modulus_bits: int | None = None
) -> FixedPoint:
    """A FixedPoint that cannot overflow for ``max_clients``; unspecified parts chosen for precision.

    With ``modulus_bits`` None: the 32-bit modulus when ``fraction_bits`` is given and fits in it, else 64 bits.
    With ``fraction_bits`` None all the headroom of the modulus goes to precision (at most 40 bits). Raises
    ValueError, naming the numbers, when nothing fits.

    Args:
        clip: clipping range of update values.
        max_weight: largest client weight.
        max_clients: most uploads summed.
        fraction_bits: quantization bits, or None to choose.
        modulus_bits: 32, 64, or None to choose.
    """
    if modulus_bits is not None:
        candidates = [modulus_bits]
    elif fraction_bits is not None:
        candidates = list(SUPPORTED_MODULUS_BITS)
    else:
        candidates = [64]  # precision first: 32 bits leaves too few fraction bits for typical weights
    for bits in candidates:
        frac = fraction_bits if fraction_bits is not None else _widest_fraction(clip, max_weight, max_clients, bits)
        try:
            return FixedPoint(clip, max_weight, frac, bits, max_clients)
        except ValueError:
            if bits == candidates[-1]:
                raise
    raise AssertionError("unreachable")


def _widest_fraction(clip: float, max_weight: float, max_clients: int, bits: int, most: int = 40) -> int:
    """The most fraction bits (up to ``most``) that cannot overflow; 0 when even that overflows."""
    for frac in range(most, -1, -1):
        bound = int(np.ceil(max_weight * max(clip, 1.0) * 2.0**frac))
        if bound < FLOAT_EXACT and max_clients * (bound + 1) < 2 ** (bits - 1):
            return frac
    return 0


def encode_weighted(
    arrays: Sequence[np.ndarray] | np.ndarray,
    weight: float,
    fixed_point: FixedPoint,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``[w, w*x]`` clipped, scaled and stochastically rounded to a 1-D array of the modulus dtype.

    Raises ValueError for a weight that is not a positive finite number and for values that are not finite real
    numbers (NaN and Inf cannot be clipped into range).

    Args:
        arrays: the update: one float array or several, flattened and concatenated in order.
        weight: the client's weight, > 0 (clipped to ``max_weight``).
        fixed_point: the encoding.
        rng: source of the rounding noise (default: seeded from the OS).
    """
    if isinstance(weight, bool) or not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive finite number, got {weight}")
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    flats = [np.asarray(array).reshape(-1) for array in arrays]
    for index, flat in enumerate(flats):
        if not (np.issubdtype(flat.dtype, np.floating) or np.issubdtype(flat.dtype, np.integer)):
            raise ValueError(f"array {index} has dtype {flat.dtype}; only real numbers can be encoded")
        if not np.all(np.isfinite(flat)):
            raise ValueError(f"array {index} holds NaN or Inf: such an update cannot be encoded")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    w = min(float(weight), fixed_point.max_weight)
    out = np.empty(1 + sum(flat.size for flat in flats), dtype=fixed_point.dtype)
    out_signed = out.view(np.int32 if fixed_point.modulus_bits == 32 else np.int64)
    out_signed[:1] = _round(np.array([w * fixed_point.scale]), rng)
    factor = w * fixed_point.scale
    # reused float64 buffers: clip, scale, add U[0, 1), floor, store; no temporaries per chunk
    scaled = np.empty(min(_ENCODE_CHUNK, max(out.size, 1)), dtype=np.float64)
    noise = np.empty_like(scaled)
    offset = 1
    for flat in flats:
        for start in range(0, flat.size, _ENCODE_CHUNK):
            count = min(_ENCODE_CHUNK, flat.size - start)
            chunk, chunk_noise = scaled[:count], noise[:count]
            np.clip(flat[start : start + count], -fixed_point.clip, fixed_point.clip, out=chunk)
            chunk *= factor
            rng.random(out=chunk_noise)
            chunk += chunk_noise
            np.floor(chunk, out=chunk)
            out_signed[offset : offset + count] = chunk
            offset += count
    return out


def decode_sum(total: np.ndarray, fixed_point: FixedPoint) -> tuple[float, np.ndarray]:
    """(sum of weights, weighted mean) from the modular sum of ``[w, w*x]`` uploads (two's complement)."""
    signed = total.view(np.int32 if fixed_point.modulus_bits == 32 else np.int64)
    weight = float(signed[0]) / fixed_point.scale
    if not weight > 0:
        raise ValueError(f"the decoded total weight is {weight}; the aggregate is not a sum of valid uploads")
    return weight, signed[1:].astype(np.float64) / (weight * fixed_point.scale)


def _round(scaled: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding: floor(v + U[0, 1)), unbiased; returns int64."""
    return np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
