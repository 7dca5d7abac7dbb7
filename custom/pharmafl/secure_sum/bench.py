"""Masked secure sum against plaintext summing and NVFLARE's TenSEAL CKKS path, on one core.

``python -m pharmafl.secure_sum.bench [--quick]`` prints progress to stderr and the JSON result as the last line.

What is timed, per (vector length m, clients n, graph):
- ``client_mask_s``: one site encoding ``[w, w*x]``, adding its self mask and its pairwise masks, sharing its
  self-mask seed and signing the upload (sites mask in parallel, so one site's time is the round's);
- ``client_consistency_s``: one site's part of the consistency check: signing U, then verifying everyone's
  signatures over it before it reveals its shares;
- ``server_s``: the server checking n signed uploads (SHA-256 of each), summing them, checking the n consistency
  signatures, collecting the unmasking shares, reconstructing the seeds and stripping the masks, and decoding the
  mean; with ``dropouts`` sites that never upload, their pairwise masks are stripped too;
- ``plain_sum_s``: numpy summing n float32 vectors and dividing, for reference.

To keep memory at O(m) whatever n, the server's n uploads are n correctly signed copies of one masked vector:
the server's work does not depend on the values, so its time is that of n distinct uploads (the decoded mean is
then meaningless and is not checked; exactness is what the tests check).

CKKS (``ckks``): NVFLARE's settings (``nvflare.lighter.impl.he.HEBuilder``: poly modulus 8192, coefficient bits
[60, 40, 40], scale 2^40, relinearisation keys): one client's encryption (``ts.ckks_vector`` + serialisation, as
``HEModelEncryptor``), the server's aggregation of n serialised ciphertexts (deserialise, add, serialise), one
client's decryption (deserialise, decrypt). The n ciphertexts are copies of one, as above.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from pharmafl.core.machine import describe_machine
from pharmafl.secure_sum.config import SecureSumConfig
from pharmafl.secure_sum.encoding import decode_sum, encode_weighted
from pharmafl.secure_sum.keys import participants_digest, upload_signed_bytes
from pharmafl.secure_sum.prg import MaskStreamer
from pharmafl.secure_sum.protocol import MaskedUpload, SecureSumClient, SecureSumServer, flatten_update

JOB = "bench-secagg"
FULL_LENGTHS = (10**5, 10**6, 10**7, 10**8)
FULL_CLIENTS = (2, 4, 8, 16, 32, 64)
QUICK_LENGTHS = (10**5, 10**6, 10**7)
QUICK_CLIENTS = (3, 16)
# (length, clients) pairs for the CKKS comparison; CKKS ciphertexts are ~14x the plaintext, so no 10^8.
FULL_CKKS = ((10**5, 3), (10**6, 3), (10**6, 16), (10**7, 3))
QUICK_CKKS = ((10**5, 3), (10**6, 3))
# Encoding of the benchmark's updates: values in [-1, 1], weights (local steps) up to 1000. With 64 clients the
# 32-bit modulus leaves 14 fraction bits: the mean is exact to 64 * 2^-14 / total weight.
CLIP, MAX_WEIGHT, DEFAULT_MODULUS_BITS = 1.0, 1e3, 32
NVFLARE_CKKS = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}
# The figures for NVFLARE's CKKS at 10^6 values and 3 clients, used when TenSEAL is not installed.
QUOTED_CKKS_1E6_3 = {"encrypt_s": 1.4, "aggregate_s": 0.1, "decrypt_s": 0.3, "expansion": 14.0}


def prg_throughput(megabytes: int = 256, masks: int = 8, repeats: int = 3) -> dict:
    """GB/s of mask generation plus accumulation (keystream bytes added into a uint64 accumulator per second)."""
    accumulator = np.zeros(megabytes * (1 << 20) // 8, dtype=np.uint64)
    accumulator += 1  # touch the pages before timing
    streamer = MaskStreamer()
    keys = [(os.urandom(32), 1 if i % 2 == 0 else -1) for i in range(masks)]
    best_many, best_one = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        streamer.apply(accumulator, keys)
        best_many = min(best_many, time.perf_counter() - start)
        start = time.perf_counter()
        streamer.apply(accumulator, keys[:1])
        best_one = min(best_one, time.perf_counter() - start)
    return {
        "bytes_per_mask": accumulator.nbytes,
        "masks": masks,
        "gb_per_s": masks * accumulator.nbytes / best_many / 1e9,
        "gb_per_s_one_mask": accumulator.nbytes / best_one / 1e9,
    }


def _federation(clients: int, config: SecureSumConfig) -> tuple[dict[str, SecureSumClient], SecureSumServer]:
    sites = [f"site-{i:03d}" for i in range(1, clients + 1)]
    members = {site: SecureSumClient(site, JOB, config) for site in sites}
    server = SecureSumServer(JOB, config)
    adverts = server.register_advertisements([member.advertise() for member in members.values()])
    for site, member in members.items():
        server.register_key_shares(site, member.share_keys(adverts))
    return members, server


def secure_round(
    length: int,
    clients: int,
    neighbours: int | None,
    dropouts: int = 0,
    repeats: int | None = None,
    modulus_bits: int = DEFAULT_MODULUS_BITS,
) -> dict:
    """Time one masked round (see the module docstring); ``dropouts`` sites never upload; best of ``repeats``."""
    repeats = repeats or (3 if length <= 10**7 else 1)
    threshold = max(2, min(clients - dropouts, clients // 2 + 1))
    config = SecureSumConfig(
        threshold=threshold,
        clip=CLIP,
        max_weight=MAX_WEIGHT,
        neighbours=neighbours,
        modulus_bits=modulus_bits,
        rounds=repeats,
    )
    members, server = _federation(clients, config)
    values = np.random.default_rng(0).uniform(-0.5, 0.5, length).astype(np.float32)
    update = {"x": values}
    best_client, best_server, best_encode = float("inf"), float("inf"), float("inf")
    best_consistency = float("inf")
    for round_number in range(repeats):
        participants = server.start_round(round_number)
        uploaders = participants[dropouts:]
        first = members[uploaders[0]]
        start = time.perf_counter()
        masked = first.mask(update, 10.0, round_number, participants)
        best_client = min(best_client, time.perf_counter() - start)
        start = time.perf_counter()
        encode_weighted(values, 10.0, server.fixed_point)
        best_encode = min(best_encode, time.perf_counter() - start)
        # the other uploads: the same vector, each with its own seed shares and signature (not timed)
        uploads = [masked] + [_copy_upload(members[site], masked, round_number, participants) for site in uploaders[1:]]
        start = time.perf_counter()
        for upload in uploads:
            problem = server.receive_upload(upload, sender=upload.site)
            if problem:
                raise RuntimeError(problem)
        uploaded = server.consistency_targets()
        server_s = time.perf_counter() - start
        signatures = {site: members[site].consistency(round_number, uploaded) for site in uploaded[1:]}
        start = time.perf_counter()
        signatures[uploaded[0]] = first.consistency(round_number, uploaded)
        consistency_s = time.perf_counter() - start
        start = time.perf_counter()
        for site, signature in signatures.items():
            server.receive_signature(site, signature)
        requests = server.unmask_requests()
        server_s += time.perf_counter() - start
        responses = {}
        for site, request in requests.items():
            start = time.perf_counter()
            responses[site] = members[site].unmask(request)  # verifies every signature, decrypts its shares
            if site == uploaded[0]:
                consistency_s += time.perf_counter() - start
        start = time.perf_counter()
        result = server.finish(responses, decode=False)
        try:
            decode_sum(result.blind_sum, server.fixed_point)
        except ValueError:  # copies of one masked vector decode to nonsense; only the time matters here
            pass
        best_server = min(best_server, server_s + time.perf_counter() - start)
        best_consistency = min(best_consistency, consistency_s)
    degree = config.graph_degree(clients)
    return {
        "length": length,
        "clients": clients,
        "graph": "full" if degree is None or degree >= clients - 1 else f"neighbours-{degree}",
        "dropouts": dropouts,
        "modulus_bits": server.fixed_point.modulus_bits,
        "fraction_bits": server.fixed_point.fraction_bits,
        "client_mask_s": best_client,
        "client_encode_s": best_encode,
        "client_consistency_s": best_consistency,
        "server_s": best_server,
        "secure_s": best_client + best_consistency + best_server,
        "upload_bytes": int(masked.vector.nbytes),
    }


def _copy_upload(member: SecureSumClient, masked: MaskedUpload, round_number: int, participants: Sequence[str]):
    """``masked``'s vector re-sent as ``member``'s upload: real seed shares and signature, no masking work."""
    own = member.mask({"x": np.zeros(1, np.float32)}, 1.0, round_number, participants)
    layout, _ = flatten_update({"x": np.zeros(masked.vector.size - 1, np.float32)})
    upload = MaskedUpload(member.site, round_number, layout, masked.vector, own.self_seed_shares)
    signed = upload_signed_bytes(JOB, round_number, member.site, upload.digest(), participants_digest(participants))
    upload.signature = member.keys.sign(signed)
    return upload


def plain_sum(length: int, clients: int) -> float:
    """Seconds for numpy to form the weighted mean of ``clients`` float32 vectors (one reused vector)."""
    values = np.random.default_rng(0).uniform(-0.5, 0.5, length).astype(np.float32)
    start = time.perf_counter()
    total = np.zeros(length, dtype=np.float64)
    for _ in range(clients):
        total += 10.0 * values
    total /= 10.0 * clients
    return time.perf_counter() - start


def ckks_round(length: int, clients: int) -> dict:
    """NVFLARE's CKKS path: encrypt (one client), aggregate n, decrypt; raises ImportError without TenSEAL."""
    import tenseal as ts

    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=NVFLARE_CKKS["poly_modulus_degree"],
        coeff_mod_bit_sizes=NVFLARE_CKKS["coeff_mod_bit_sizes"],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.generate_relin_keys()
    context.global_scale = 2 ** NVFLARE_CKKS["scale_bits"]
    values = np.random.default_rng(0).uniform(-0.5, 0.5, length)
    start = time.perf_counter()
    blob = ts.ckks_vector(context, values * 10.0).serialize()
    encrypt_s = time.perf_counter() - start
    start = time.perf_counter()
    total = ts.ckks_vector_from(context, blob)
    for _ in range(clients - 1):
        total += ts.ckks_vector_from(context, blob)
    summed = total.serialize()
    aggregate_s = time.perf_counter() - start
    del total
    start = time.perf_counter()
    decrypted = np.asarray(ts.ckks_vector_from(context, summed).decrypt()) / (10.0 * clients)
    decrypt_s = time.perf_counter() - start
    return {
        "encrypt_s": encrypt_s,
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "ckks_s": encrypt_s + aggregate_s + decrypt_s,
        "expansion": len(blob) / (4 * length),  # over float32 plaintext
        "max_error": float(np.abs(decrypted - values).max()),
        "source": "measured",
    }


def run_secagg_bench(
    lengths: Sequence[int] = FULL_LENGTHS,
    clients: Sequence[int] = FULL_CLIENTS,
    ckks_cases: Sequence[tuple[int, int]] = FULL_CKKS,
    neighbour_graph: bool = True,
    dropout_cases: Sequence[tuple[int, int, int]] = ((10**6, 16, 2),),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The whole benchmark as a dict: ``prg_gb_per_s``, ``secure`` rows, ``ckks`` rows, ``vs_ckks``.

    Args:
        lengths: vector lengths m.
        clients: numbers of sites n (full graph; also the SecAgg+ graph when ``neighbour_graph``).
        ckks_cases: (m, n) pairs run through CKKS (and through the secure sum for the comparison).
        neighbour_graph: also time the SecAgg+ neighbour graph (k = 2 ceil(log2 n)) where it differs from full.
        dropout_cases: (m, n, dropped) rounds where ``dropped`` sites never upload.
        progress: called with a line per measurement.

    ``job_overhead`` (the secure job's simulator wall time over FedAvg's) is null here: it runs the FLARE simulator,
    so ``pharmafl bench secagg --rounds N`` adds it from ``pharmafl.multitask.bench.job_overhead``.
    """
    say = progress or (lambda message: None)
    prg = prg_throughput()
    say(f"PRG + accumulate: {prg['gb_per_s']:.2f} GB/s ({prg['masks']} masks), one mask {prg['gb_per_s_one_mask']:.2f}")
    rows = []

    def measure(length: int, n: int, neighbours: int | None, dropouts: int = 0, modulus_bits: int = 32) -> dict:
        row = secure_round(length, n, neighbours, dropouts, modulus_bits=modulus_bits)
        row["plain_sum_s"] = plain_sum(length, n)
        say(
            f"m={length:.0e} n={n} {row['graph']} drop={dropouts} mod 2^{modulus_bits}: "
            f"client {row['client_mask_s']:.3f} s, server {row['server_s']:.3f} s, plaintext {row['plain_sum_s']:.4f} s"
        )
        rows.append(row)
        return row

    for length in lengths:
        for n in clients:
            measure(length, n, None)
            if neighbour_graph and n - 1 > 2 * int(np.ceil(np.log2(n))):
                measure(length, n, 0)
    for length, n, dropped in dropout_cases:
        measure(length, n, None, dropped)
    ckks_rows, comparison = [], []
    try:
        import tenseal

        ckks_version = tenseal.__version__
    except ImportError:
        ckks_version = None
    for length, n in ckks_cases:
        secure = next(
            (r for r in rows if (r["length"], r["clients"], r["graph"], r["dropouts"]) == (length, n, "full", 0)),
            None,
        ) or measure(length, n, None)
        secure64 = measure(length, n, None, modulus_bits=64)
        if ckks_version:
            ckks = ckks_round(length, n)
        elif (length, n) == (10**6, 3):
            quoted = QUOTED_CKKS_1E6_3
            ckks = dict(
                quoted,
                ckks_s=quoted["encrypt_s"] + quoted["aggregate_s"] + quoted["decrypt_s"],
                source="quoted in issue 4 (TenSEAL not installed)",
            )
        else:
            continue
        ckks.update(length=length, clients=n)
        ckks_rows.append(ckks)
        say(f"CKKS m={length:.0e} n={n}: {ckks['ckks_s']:.3f} s ({ckks['source']})")
        comparison.append(
            {
                "length": length,
                "clients": n,
                "secure_s": secure["secure_s"],
                "ckks_s": ckks["ckks_s"],
                "speedup": ckks["ckks_s"] / secure["secure_s"],
                "modulus_bits": secure["modulus_bits"],
                "secure_s_64bit": secure64["secure_s"],
                "speedup_64bit": ckks["ckks_s"] / secure64["secure_s"],
                "ckks_source": ckks["source"],
            }
        )
    return {
        "prg_gb_per_s": prg["gb_per_s"],
        "prg": prg,
        "secure": rows,
        "ckks": ckks_rows,
        "ckks_settings": NVFLARE_CKKS,
        "tenseal": ckks_version,
        "vs_ckks": comparison,
        "job_overhead": None,
        "job_walls": None,
        "machine": describe_machine(),
    }


def quick_bench(progress: Callable[[str], None] | None = None) -> dict:
    """The ``--quick`` subset: 10^5 to 10^7 values, 3 and 16 sites, CKKS at 10^5 and 10^6 with 3 sites."""
    return run_secagg_bench(QUICK_LENGTHS, QUICK_CLIENTS, QUICK_CKKS, dropout_cases=((10**6, 8, 2),), progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    args = parser.parse_args(argv)
    logging.getLogger("pharmafl.secure_sum").setLevel(logging.ERROR)  # unsigned-advert notes
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    result = quick_bench(say) if args.quick else run_secagg_bench(progress=say)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
