"""Masks from a cryptographic PRG, streamed into the accumulator: AES-256-CTR keystream added or subtracted in place.

A mask is the keystream of AES-256-CTR under a 32-byte key (zero nonce: every key is used for one stream only),
read as little-endian uint32 or uint64 words. Masks are never materialised: the keystream is produced chunk by
chunk into one reused buffer (``encryptor.update_into``) and added to, or subtracted from, the matching slice of
the accumulator. With several masks the loop runs chunk-major, so each accumulator slice stays in cache while
every mask touches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Bytes of keystream per step: large enough to amortise the Python overhead, small enough to stay in L2.
CHUNK_BYTES = 1 << 18
_ZERO_NONCE = bytes(16)
_AES_BLOCK = 16


class MaskStreamer:
    """Adds and subtracts AES-CTR masks into uint32/uint64 arrays; holds the reused buffers.

    Args:
        chunk_bytes: keystream bytes per step (multiple of 16).
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes <= 0 or chunk_bytes % _AES_BLOCK:
            raise ValueError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._zeros = bytes(chunk_bytes)
        self._out = bytearray(chunk_bytes + _AES_BLOCK - 1)

    def apply(self, accumulator: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
        """``accumulator += sum_i sign_i * PRG(key_i)`` modulo 2^bits, in place.

        Args:
            accumulator: 1-D C-contiguous uint32 or uint64 array.
            masks: (32-byte key, +1 or -1) pairs.
        """
        if accumulator.dtype not in (np.uint32, np.uint64) or accumulator.ndim != 1:
            raise ValueError(f"the accumulator must be a 1-D uint32 or uint64 array, got {accumulator.dtype}")
        if not accumulator.flags.c_contiguous:
            raise ValueError("the accumulator must be C-contiguous")
        if not masks:
            return
        for key, sign in masks:
            if len(key) != 32 or sign not in (1, -1):
                raise ValueError("each mask is a 32-byte key and a sign of +1 or -1")
        encryptors = [Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor() for key, _ in masks]
        signs = [sign for _, sign in masks]
        item = accumulator.itemsize
        words_per_chunk = self.chunk_bytes // item
        total = accumulator.size
        for start in range(0, total, words_per_chunk):
            words = min(words_per_chunk, total - start)
            nbytes = words * item
            target = accumulator[start : start + words]
            source = self._zeros if nbytes == self.chunk_bytes else self._zeros[:nbytes]
            for encryptor, sign in zip(encryptors, signs, strict=True):
                encryptor.update_into(source, self._out)
                keystream = np.frombuffer(self._out, dtype=accumulator.dtype, count=words)
                if sign > 0:
                    np.add(target, keystream, out=target)
                else:
                    np.subtract(target, keystream, out=target)


def mask_array(length: int, key: bytes, dtype: type) -> np.ndarray:
    """The whole mask PRG(key) as an array (tests and small vectors only: it materialises the mask)."""
    out = np.zeros(length, dtype=dtype)
    MaskStreamer().apply(out, [(key, 1)])
    return out
