"""Split binding-site chains into simulated clients: a common test set, then per-client train and test sets.

The unit of every split is a sequence group: all chains with the same (cropped) sequence, e.g. one protein
listed under ATP and under MG, or identical chains A and B of a homodimer. A group never straddles the
common test set and a training set, so no test sequence was seen in training.

Splits of what remains after the common test set:
- `iid`: groups shuffled and cut into clients of (nearly) equal chain counts.
- `label-skew` (Apheris experiment 2): groups sorted by positive rate (binding residues / residues) and cut
  into a low half and a high half. Client 1 draws `skew_ratios[0]` of its chains from the high half and the
  rest from the low half; with more than two clients the high share runs linearly from `skew_ratios[0]`
  (client 1) to `skew_ratios[1]` (client N). The ratios must sum to 1 so that both halves are used exactly:
  (0.2, 0.8) gives client 1 0.2 high / 0.8 low and client 2 0.8 high / 0.2 low.
- `by-source`: each input file to its own client, in input order; the `clients` option is ignored (with a
  note), and `client_names` must then name one client per input.
Each client then holds out `test_fraction` of its chains, by group and stratified by source, as its test set;
under by-source a sequence held out by one client is held out by every client that has it. With `val_fraction`
each client then holds out that share of its remaining chains, again by group and stratified by source, as a
validation set (`val.jsonl`: thresholds and model choice, never training); 0, the default, writes none and leaves
every other draw as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pharmafl.binding_sites.dataset import COMMON_TEST, FORMAT_VERSION, ProteinSplit, write_jsonl
from pharmafl.binding_sites.formats import SKIP_REASONS, Chain, read_chains, source_name
from pharmafl.core.errors import InputError
from pharmafl.core.manifest import sha256_file
from pharmafl.core.outputs import PREPARATIONS, PREPARE_BINDING_SITES, check_output, staged_output
from pharmafl.core.paths import check_site_names

SPLITS = ("iid", "label-skew", "by-source")


@dataclass
class SplitConfig:
    """Options of `prepare_binding_sites`; see the module docstring for the splits."""

    clients: int = 2
    split: str = "iid"
    max_length: int = 1000  # longer chains keep their first max_length residues (ESM-2 context; Apheris: 1000)
    test_fraction: float = 0.2  # of all chains for the common test set, then of each client's chains
    val_fraction: float = 0.0  # of each client's chains left after its test set: val.jsonl (0 = none)
    skew_ratios: tuple[float, float] = (0.2, 0.8)  # high-half share of client 1 and of client N (label-skew)
    seed: int = 0
    client_names: list[str] | None = None  # default site-1 .. site-N
    max_chains_per_input: int | None = None  # keep the first N usable chains of each input (tests, demos)


def prepare_binding_sites(
    inputs: list[str],
    out_dir: str,
    config: SplitConfig,
    fmt: str = "auto",
    labels_path: str | None = None,
    progress: Callable[[str], None] | None = print,
    overwrite: bool = False,
) -> dict:
    """Read `inputs`, split them into clients and a common test set, write them under `out_dir`.

    Writes `<client>/{train,test}.jsonl`, `common_test/test.jsonl`, a manifest.json per folder and
    `summary.json`; returns the summary. `out_dir` must be new, empty or (with `overwrite`) an earlier
    preparation, which is then replaced as a whole (see `pharmafl.core.outputs`).
    """
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    inputs = [str(path) for path in inputs]
    _validate(inputs, config)
    check_output(out_dir, PREPARATIONS, overwrite, "--out", reads=[*inputs, *([labels_path] if labels_path else [])])

    chains: list[Chain] = []
    input_summaries = []
    for path in inputs:
        read, counts = read_chains(path, fmt=fmt, labels_path=labels_path, max_length=config.max_length)
        used = read if config.max_chains_per_input is None else read[: config.max_chains_per_input]
        chains.extend(used)
        input_summaries.append(
            {"path": path, "source": source_name(path), **counts, "used": len(used), "not_used": len(read) - len(used)}
        )
        skipped = sum(counts["skipped"].values())
        labels_unmatched = (
            f", {counts['unused_labels']} label ids without a sequence" if counts["unused_labels"] else ""
        ) + (
            f", {counts['positions_out_of_range']} positions outside their chain dropped"
            if counts["positions_out_of_range"]
            else ""
        )
        say(
            f"{path}: {counts['records']} records, {len(used)} used, {skipped} skipped, "
            f"{counts['cropped']} cropped to {config.max_length}{labels_unmatched}"
        )

    sources = [summary["source"] for summary in input_summaries]
    names, notes = _client_names(config, sources)
    for note in notes:
        say(f"note: {note}")
    group_of, n_groups = _sequence_groups(chains)
    source_index = {name: i for i, name in enumerate(sources)}
    chain_source = np.array([source_index[chain.source] for chain in chains], dtype=np.int64)
    _, first_chain = np.unique(group_of, return_index=True)
    group_source = chain_source[first_chain]  # a group's stratum: the source of its first chain
    group_size = np.bincount(group_of, minlength=n_groups)

    # Independent streams per step, so changing one step's draws leaves the others as they were.
    common_key, assign_key, client_key, val_key = (
        np.random.default_rng([config.seed, step]).random(n_groups) for step in range(4)
    )
    in_common = _holdout(np.arange(n_groups), group_size, group_source, common_key, config.test_fraction)
    rest = np.flatnonzero(~in_common[group_of])  # chain indices available to clients

    client_of = np.full(len(chains), -1, dtype=np.int64)
    if config.split == "by-source":
        client_of[rest] = chain_source[rest]
    else:
        rest_groups = np.flatnonzero(~in_common)
        if config.split == "iid":
            group_client = _assign_iid(rest_groups, group_size, assign_key, len(names))
        else:
            group_client = _assign_label_skew(rest_groups, group_size, chains, group_of, assign_key, config, len(names))
        client_of[rest] = group_client[group_of[rest]]

    in_client_test, moved = _client_test(
        client_of, group_of, chain_source, client_key, config.test_fraction, len(names)
    )
    if moved:
        notes.append(f"{moved} chains joined their clients' test sets because another client tests the same sequence")
        say(f"note: {notes[-1]}")

    in_val = np.zeros(len(chains), dtype=bool)
    if config.val_fraction > 0:
        left = np.where(in_client_test, -1, client_of)  # each client's chains outside every test set
        in_val, _ = _client_test(left, group_of, chain_source, val_key, config.val_fraction, len(names))
    common_chains = [chains[i] for i in np.flatnonzero(in_common[group_of])]
    parts = {}
    for index, name in enumerate(names):
        mine = client_of == index
        parts[name] = {
            "train": [chains[i] for i in np.flatnonzero(mine & ~in_client_test & ~in_val)],
            "test": [chains[i] for i in np.flatnonzero(mine & in_client_test)],
        }
        if config.val_fraction > 0:
            parts[name]["val"] = [chains[i] for i in np.flatnonzero(mine & in_val)]
        if not parts[name]["train"]:
            raise InputError(f"Client '{name}' gets no training chains; use fewer clients or more input chains.")

    input_files = [
        {"path": s["path"], "source": s["source"], "sha256": sha256_file(Path(s["path"]))} for s in input_summaries
    ]
    for summary, file in zip(input_summaries, input_files, strict=True):
        summary["sha256"] = file["sha256"]
    parameters = _parameters(config, names)
    with staged_output(out_dir, PREPARE_BINDING_SITES) as out:
        client_summaries = {}
        for name, part in parts.items():
            client_summaries[name] = _write_folder(out / name, name, part, parameters, input_files)
            train, test = client_summaries[name]["train"], client_summaries[name]["test"]
            val = client_summaries[name].get("val")
            say(
                f"{name}: {train['chains']} train / {test['chains']} test chains"
                + (f" / {val['chains']} validation" if val else "")
                + f", positive rate {train['positive_rate']:.2%} / {test['positive_rate']:.2%}, "
                f"{_describe_sources(train['sources'])}"
            )
        common = _write_folder(out / COMMON_TEST, COMMON_TEST, {"test": common_chains}, parameters, input_files)["test"]
        say(f"{COMMON_TEST}: {common['chains']} chains, positive rate {common['positive_rate']:.2%}")

        summary = {
            "format_version": FORMAT_VERSION,
            "inputs": input_summaries,
            "records": sum(s["records"] for s in input_summaries),
            "skipped": {reason: sum(s["skipped"][reason] for s in input_summaries) for reason in SKIP_REASONS},
            "cropped": sum(s["cropped"] for s in input_summaries),
            "positives_cropped": sum(s["positives_cropped"] for s in input_summaries),
            "not_used": sum(s["not_used"] for s in input_summaries),
            "chains": len(chains),
            "sequence_groups": int(n_groups),
            "chains_sharing_a_sequence": int(group_size[group_size > 1].sum()),
            "split": config.split,
            "clients": client_summaries,
            "common_test": common,
            "notes": notes,
            "config": parameters,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"prepared {summary['chains']} chains ({sum(summary['skipped'].values())} skipped, {summary['cropped']} "
        f"cropped) into {len(names)} clients and a common test set in {summary['seconds']} s -> {out_dir}"
    )
    return summary


def _validate(inputs: list[str], config: SplitConfig) -> None:
    if not inputs:
        raise InputError("Give at least one input file.")
    if config.split not in SPLITS:
        raise InputError(f"The split must be one of {', '.join(SPLITS)}; got '{config.split}'.")
    stems = [source_name(path) for path in inputs]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise InputError(
            f"Input files must have distinct names (they name the sources); repeated: {', '.join(repeated)}."
        )
    if config.split != "by-source" and config.clients < 1:
        raise InputError(f"The number of clients must be at least 1, got {config.clients}.")
    if config.split == "label-skew" and config.clients < 2:
        raise InputError(f"The label-skew split needs at least 2 clients, got {config.clients}.")
    if config.max_length < 1:
        raise InputError(f"The maximum chain length must be at least 1, got {config.max_length}.")
    if not 0 <= config.test_fraction < 1:
        raise InputError(f"The test fraction must be at least 0 and below 1, got {config.test_fraction}.")
    if not 0 <= config.val_fraction < 1:
        raise InputError(f"The validation fraction must be at least 0 and below 1, got {config.val_fraction}.")
    if config.max_chains_per_input is not None and config.max_chains_per_input < 1:
        raise InputError(f"max_chains_per_input must be at least 1, got {config.max_chains_per_input}.")
    ratios = tuple(config.skew_ratios)
    if config.split == "label-skew":
        if len(ratios) != 2 or not all(0 <= r <= 1 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise InputError(
                f"The skew ratios must be two numbers between 0 and 1 that sum to 1 (e.g. 0.2 0.8), got {ratios}."
            )


def _client_names(config: SplitConfig, sources: list[str]) -> tuple[list[str], list[str]]:
    notes = []
    count = config.clients
    if config.split == "by-source":
        count = len(sources)
        if config.client_names is None and config.clients != count:
            notes.append(f"by-source split: {count} clients, one per input file; the clients option is ignored")
    names = list(config.client_names) if config.client_names is not None else [f"site-{i + 1}" for i in range(count)]
    if len(names) != count:
        what = "input files" if config.split == "by-source" else "clients"
        raise InputError(f"Give one client name per client: {len(names)} names for {count} {what}.")
    check_site_names(names, "Client")
    for name in names:
        if name == COMMON_TEST:
            raise InputError(f"'{COMMON_TEST}' is the common test set's folder; choose another client name.")
    return names, notes


def _sequence_groups(chains: list[Chain]) -> tuple[np.ndarray, int]:
    """Group index per chain; chains with the same sequence share a group, numbered in order of appearance."""
    index: dict[str, int] = {}
    group_of = np.array([index.setdefault(chain.sequence, len(index)) for chain in chains], dtype=np.int64)
    return group_of, len(index)


def _holdout(groups: np.ndarray, size: np.ndarray, stratum: np.ndarray, key: np.ndarray, fraction: float) -> np.ndarray:
    """Mask over all groups: per stratum, groups in `key` order until `fraction` of its chains is reached."""
    held = np.zeros(len(size), dtype=bool)
    for value in np.unique(stratum[groups]):
        members = groups[stratum[groups] == value]
        members = members[np.argsort(key[members], kind="stable")]
        before = np.cumsum(size[members]) - size[members]
        held[members[before < round(fraction * size[members].sum())]] = True
    return held


def _cut(groups: np.ndarray, size: np.ndarray, targets: list[int]) -> np.ndarray:
    """Bin per group (in the given order): a group goes to the bin its first chain falls into."""
    before = np.cumsum(size[groups]) - size[groups]
    return np.minimum(np.searchsorted(np.cumsum(targets), before, side="right"), len(targets) - 1)


def _equal_targets(total: int, bins: int) -> list[int]:
    return [total // bins + (i < total % bins) for i in range(bins)]


def _assign_iid(groups: np.ndarray, size: np.ndarray, key: np.ndarray, clients: int) -> np.ndarray:
    client = np.full(len(size), -1, dtype=np.int64)
    shuffled = groups[np.argsort(key[groups], kind="stable")]
    client[shuffled] = _cut(shuffled, size, _equal_targets(int(size[groups].sum()), clients))
    return client


def _assign_label_skew(
    groups: np.ndarray,
    size: np.ndarray,
    chains: list[Chain],
    group_of: np.ndarray,
    key: np.ndarray,
    config: SplitConfig,
    clients: int,
) -> np.ndarray:
    positives = np.bincount(group_of, weights=[chain.positives for chain in chains], minlength=len(size))
    residues = np.bincount(group_of, weights=[len(chain) for chain in chains], minlength=len(size))
    rate = positives / np.maximum(residues, 1)
    # Many chains share a rate (a single binding residue, say): the random key breaks those ties.
    ordered = groups[np.lexsort((key[groups], rate[groups]))]
    total = int(size[groups].sum())
    in_high = _cut(ordered, size, [total // 2, total - total // 2]) == 1
    low, high = ordered[~in_high], ordered[in_high]

    sizes = _equal_targets(total, clients)
    first, last = config.skew_ratios[0], 1 - config.skew_ratios[0]
    shares = [first + (last - first) * i / (clients - 1) for i in range(clients)]
    high_targets = [round(share * n) for share, n in zip(shares, sizes, strict=True)]
    # Rounding and groups of several chains land on the last client.
    high_targets[-1] = min(sizes[-1], max(0, int(size[high].sum()) - sum(high_targets[:-1])))
    low_targets = [n - h for n, h in zip(sizes, high_targets, strict=True)]

    client = np.full(len(size), -1, dtype=np.int64)
    for half, targets in ((low, low_targets), (high, high_targets)):
        shuffled = half[np.argsort(key[half], kind="stable")]
        client[shuffled] = _cut(shuffled, size, targets)
    return client


def _client_test(
    client_of: np.ndarray,
    group_of: np.ndarray,
    chain_source: np.ndarray,
    key: np.ndarray,
    fraction: float,
    clients: int,
) -> tuple[np.ndarray, int]:
    """Mask over chains of each client's test set, and how many chains the cross-client rule moved there."""
    test_group = np.zeros((clients, len(key)), dtype=bool)
    for client in range(clients):
        mine = np.flatnonzero(client_of == client)
        groups, first = np.unique(group_of[mine], return_index=True)
        size = np.zeros(len(key), dtype=np.int64)
        np.add.at(size, group_of[mine], 1)
        stratum = np.zeros(len(key), dtype=np.int64)
        stratum[groups] = chain_source[mine[first]]
        test_group[client] = _holdout(groups, size, stratum, key, fraction)
    assigned = client_of >= 0
    chosen = np.zeros(len(client_of), dtype=bool)
    chosen[assigned] = test_group[client_of[assigned], group_of[assigned]]
    # A sequence in one client's test set stays out of every client's training set (matters for by-source).
    anywhere = test_group.any(axis=0)
    in_test = assigned & anywhere[group_of]
    return in_test, int(np.count_nonzero(in_test & ~chosen))


def _describe_sources(sources: dict[str, int]) -> str:
    if len(sources) <= 3:
        return "sources " + ", ".join(sources)
    return f"{len(sources)} sources"


def _parameters(config: SplitConfig, names: list[str]) -> dict:
    return {**asdict(config), "skew_ratios": list(config.skew_ratios), "client_names": names}


def _write_folder(folder: Path, name: str, parts: dict[str, list[Chain]], parameters: dict, inputs: list) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    stats = {}
    for part, chains in parts.items():
        write_jsonl(folder / f"{part}.jsonl", chains)
        stats[part] = ProteinSplit(chains).stats()
    manifest = {
        "format_version": FORMAT_VERSION,
        "client": name,
        **stats,
        "parameters": parameters,
        "inputs": inputs,
        "sha256": {f"{part}.jsonl": sha256_file(folder / f"{part}.jsonl") for part in parts},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return stats
