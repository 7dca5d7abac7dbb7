import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pharmafl.secure_sum.graph import default_neighbours, mask_graph
from pharmafl.secure_sum.prg import MaskStreamer, mask_array


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_streamed_masks_equal_the_aes_ctr_keystream(dtype):
    key = os.urandom(32)
    length = 12_345  # not a multiple of the chunk
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(length * 8))
    expected = np.frombuffer(stream, dtype=dtype, count=length)
    streamer = MaskStreamer(chunk_bytes=1024)
    acc = np.arange(length, dtype=dtype)
    streamer.apply(acc, [(key, 1)])
    np.testing.assert_array_equal(acc, np.arange(length, dtype=dtype) + expected)
    np.testing.assert_array_equal(mask_array(length, key, dtype), expected)


def test_plus_and_minus_masks_cancel_and_differ_by_key():
    keys = [os.urandom(32) for _ in range(3)]
    acc = np.arange(10_000, dtype=np.uint64)
    MaskStreamer(4096).apply(acc, [(keys[0], 1), (keys[1], 1), (keys[2], -1)])
    assert not np.array_equal(acc, np.arange(10_000, dtype=np.uint64))
    MaskStreamer(4096).apply(acc, [(keys[1], -1), (keys[0], -1), (keys[2], 1)])
    np.testing.assert_array_equal(acc, np.arange(10_000, dtype=np.uint64))
    assert not np.array_equal(mask_array(100, keys[0], np.uint32), mask_array(100, keys[1], np.uint32))


def test_bad_accumulator_or_key_refused():
    with pytest.raises(ValueError, match="uint32 or uint64"):
        MaskStreamer().apply(np.zeros(4, np.float64), [(os.urandom(32), 1)])
    with pytest.raises(ValueError, match="32-byte"):
        MaskStreamer().apply(np.zeros(4, np.uint32), [(b"short", 1)])


def test_neighbour_graph_is_symmetric_regular_and_shared():
    sites = [f"site-{i}" for i in range(40)]
    k = default_neighbours(len(sites))
    graph = mask_graph(sites, "job", 3, k)
    assert graph == mask_graph(list(reversed(sites)), "job", 3, k)  # everyone computes the same graph
    assert graph != mask_graph(sites, "job", 4, k)  # a fresh graph per round
    for site, peers in graph.items():
        assert site not in peers
        assert len(peers) == k
        assert all(site in graph[peer] for peer in peers)
    assert k < len(sites) - 1


def test_full_graph_when_k_covers_everyone():
    sites = ["a", "b", "c", "d"]
    assert mask_graph(sites, "j", 0, None) == mask_graph(sites, "j", 0, 5) == {s: set(sites) - {s} for s in sites}
