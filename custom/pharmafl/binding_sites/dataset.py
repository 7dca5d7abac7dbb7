"""Load prepared binding-site folders (written by `prepare_binding_sites`) back into chains."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pharmafl.binding_sites.formats import ESM_ALPHABET, LABEL_CHARS, Chain
from pharmafl.core.errors import InputError
from pharmafl.core.manifest import verify_checksums

FORMAT_VERSION = 1
PARTS = ("train", "test", "val")
COMMON_TEST = "common_test"


@dataclass
class ProteinSplit:
    """A set of chains (one client's train or test part, or the common test set) with its statistics."""

    chains: list[Chain]

    def __len__(self) -> int:
        return len(self.chains)

    @property
    def residues(self) -> int:
        return sum(len(chain) for chain in self.chains)

    @property
    def positives(self) -> int:
        return sum(chain.positives for chain in self.chains)

    @property
    def positive_rate(self) -> float:
        """Binding residues over all residues (what a per-residue classifier sees)."""
        residues = self.residues
        return self.positives / residues if residues else 0.0

    @property
    def mean_chain_positive_rate(self) -> float:
        """The mean over chains of each chain's positive rate (what the label-skew split sorts by)."""
        return float(np.mean([chain.positive_rate for chain in self.chains])) if self.chains else 0.0

    @property
    def sources(self) -> dict[str, int]:
        return dict(sorted(Counter(chain.source for chain in self.chains).items()))

    def stats(self) -> dict:
        return {
            "chains": len(self),
            "residues": self.residues,
            "positives": self.positives,
            "positive_rate": round(self.positive_rate, 6),
            "mean_chain_positive_rate": round(self.mean_chain_positive_rate, 6),
            "max_length": max((len(chain) for chain in self.chains), default=0),
            "sources": self.sources,
        }


def load_client(path: str, part: str = "train", verify: bool = False) -> list[Chain]:
    """The chains of one client's `part` ("train", "test" or "val"); `verify` checks the manifest's sha256 first."""
    if part not in PARTS:
        raise InputError(f"The part must be one of {', '.join(PARTS)}, got '{part}'.")
    folder = Path(path)
    for name in (f"{part}.jsonl", "manifest.json"):
        if not (folder / name).is_file():
            raise InputError(
                f"No prepared data for client at '{path}' (missing {name}); run `pharmafl prepare binding-sites` first."
            )
    if verify:
        verify_checksums(folder)
    return read_jsonl(folder / f"{part}.jsonl")


def load_common_test(out_dir: str, verify: bool = False) -> list[Chain]:
    """The common test set every client is evaluated on, from `out_dir/common_test/test.jsonl`."""
    folder = Path(out_dir) / COMMON_TEST
    if not (folder / "test.jsonl").is_file():
        raise InputError(
            f"No common test set at '{folder}' (missing test.jsonl); run `pharmafl prepare binding-sites` first."
        )
    if verify:
        verify_checksums(folder)
    return read_jsonl(folder / "test.jsonl")


def read_jsonl(path: Path) -> list[Chain]:
    """Chains from a prepared JSONL file; any damaged line is a InputError naming the file and line."""
    chains = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            chain = _chain_from_line(line)
            if chain is None:
                raise InputError(f"'{path}' line {number} is not a valid chain record; prepare the data again.")
            chains.append(chain)
    return chains


def write_jsonl(path: Path, chains: list[Chain]) -> None:
    """One JSON object per chain: id, sequence, labels (a 0/1 string of the same length) and source."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for chain in chains:
            labels = (chain.labels.astype(np.uint8) + ord("0")).tobytes().decode("ascii")
            record = {"id": chain.id, "sequence": chain.sequence, "labels": labels, "source": chain.source}
            handle.write(json.dumps(record) + "\n")


def _chain_from_line(line: str) -> Chain | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    chain_id, sequence, labels = record.get("id"), record.get("sequence"), record.get("labels")
    source = record.get("source", "")
    if not all(isinstance(value, str) for value in (chain_id, sequence, labels, source)):
        return None
    if not sequence or len(sequence) != len(labels) or not set(labels) <= LABEL_CHARS:
        return None
    if not set(sequence) <= ESM_ALPHABET:
        return None
    array = (np.frombuffer(labels.encode("ascii"), dtype=np.uint8) - ord("0")).astype(np.int8)
    return Chain(chain_id, sequence, array, source)
