"""Who masks with whom: every pair of sites (Bonawitz et al.) or a k-regular neighbour graph (SecAgg+, Bell et al.).

The neighbour graph is a Harary graph on a random ring: the sites are permuted by a permutation seeded from
SHA-256(job id, round), so every party computes the same graph without talking, and each site is joined to the
k/2 nearest sites on either side. A fresh graph each round keeps the pairs unpredictable before the round starts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np


def default_neighbours(sites: int) -> int:
    """k = 2 * ceil(log2 n), even, at least 2: O(log n) neighbours as in SecAgg+."""
    return max(2, 2 * math.ceil(math.log2(max(sites, 2))))


def mask_graph(sites: Sequence[str], job_id: str, round_number: int, neighbours: int | None) -> dict[str, set[str]]:
    """Each site's masking peers.

    Args:
        sites: the participants of the round.
        job_id, round_number: seed of the neighbour graph.
        neighbours: None for the complete graph; otherwise k (rounded up to even; the complete graph when
            k >= n - 1).
    """
    ordered = sorted(sites)
    if len(set(ordered)) != len(ordered):
        raise ValueError("site names must be unique")
    n = len(ordered)
    if neighbours is None or neighbours >= n - 1:
        return {site: set(ordered) - {site} for site in ordered}
    if neighbours < 1:
        raise ValueError(f"neighbours must be positive, got {neighbours}")
    half = (neighbours + 1) // 2
    seed = hashlib.sha256(f"pharmafl-secagg-graph|{job_id}|{round_number}|{','.join(ordered)}".encode()).digest()
    ring = [ordered[i] for i in np.random.default_rng(int.from_bytes(seed, "big")).permutation(n)]
    graph = {site: set() for site in ordered}
    for position, site in enumerate(ring):
        for step in range(1, half + 1):
            peer = ring[(position + step) % n]
            graph[site].add(peer)
            graph[peer].add(site)
    return graph
