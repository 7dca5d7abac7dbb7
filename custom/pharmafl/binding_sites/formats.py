"""Per-residue binding-site data: read chains with 0/1 labels from GPSite, FASTA + labels, or CSV files.

Every record is checked before it is kept; a skipped record is counted once, under the first reason that
applies, in this order: malformed, empty, missing_labels, duplicate_ids, invalid_labels, unknown_residues,
length_mismatch.

Residues follow the ESM-2 alphabet: the 20 standard amino acids plus X, B, Z, U and O, each of which the
ESM-2 tokenizer maps to its own token. Lowercase letters are upper-cased. Any other character ('.', '-',
'*', digits, spaces inside the sequence, ...) makes the whole chain skipped as unknown_residues: dropping
the character would shift every later residue against its label.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pharmafl.core.errors import InputError

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
# X unknown, B Asx, Z Glx, U selenocysteine, O pyrrolysine: all in the ESM-2 vocabulary as their own tokens.
ESM_ALPHABET = frozenset(STANDARD_RESIDUES + "XBZUO")
LABEL_CHARS = frozenset("01")
FORMATS = ("auto", "threeline", "fasta", "csv")
SKIP_REASONS = (
    "malformed",
    "empty",
    "missing_labels",
    "duplicate_ids",
    "invalid_labels",
    "unknown_residues",
    "length_mismatch",
)
DEFAULT_MAX_LENGTH = 1000


@dataclass
class Chain:
    """One protein chain with one 0/1 label per residue; `source` is the input file's stem (e.g. ATP_train)."""

    id: str
    sequence: str
    labels: np.ndarray  # int8, same length as sequence
    source: str

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    @property
    def positive_rate(self) -> float:
        return self.positives / len(self.sequence) if len(self.sequence) else 0.0


def crop(chain: Chain, max_length: int = DEFAULT_MAX_LENGTH) -> Chain:
    """The chain cut to its first `max_length` residues (and labels); shorter chains come back unchanged."""
    if max_length < 1:
        raise InputError(f"The maximum chain length must be at least 1, got {max_length}.")
    if len(chain.sequence) <= max_length:
        return chain
    return Chain(chain.id, chain.sequence[:max_length], chain.labels[:max_length].copy(), chain.source)


def source_name(path: str | Path) -> str:
    """The file name without directory, '.gz' and its last suffix: '.../ATP_train.txt' -> 'ATP_train'."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem or name


def read_chains(
    path: str,
    fmt: str = "auto",
    labels_path: str | None = None,
    max_length: int | None = None,
) -> tuple[list[Chain], dict]:
    """Read labelled chains from `path`; returns (chains, counts).

    Formats: `threeline` (GPSite: `>id`, sequence, 0/1 string per record), `fasta` (sequences, possibly
    wrapped, with labels from `labels_path`: `>id` + 0/1 string, a CSV with columns id,labels, or binding-residue
    positions, `id<TAB>1-based positions, comma-separated`, as several binding-site benchmarks distribute them) and
    `csv` (columns id,sequence,labels). `auto` picks fasta when a label file is given, csv for a .csv file
    or a first line with commas, else threeline. The id is the first word of a header.

    Counts: records (seen), skipped (per reason, see the module docstring), kept, cropped (chains longer
    than `max_length`, cut to their first `max_length` residues; None keeps them whole), positives_cropped
    (labels lost that way), unused_labels (label-file ids without a sequence), positions_out_of_range (positions
    past the chain's end or below 1, dropped; the chain is kept). Gzipped files are read too. In the positions
    format a chain without a line is skipped as missing_labels (not taken as binding nowhere); a line whose
    positions are not integers makes its chain invalid_labels.
    """
    if fmt not in FORMATS:
        raise InputError(f"Input format must be one of {', '.join(FORMATS)}; got '{fmt}'.")
    if max_length is not None and max_length < 1:
        raise InputError(f"The maximum chain length must be at least 1, got {max_length}.")
    text = _read_text(path)
    if not text.strip():
        raise InputError(f"Input file '{path}' is empty.")
    fmt = _detect_format(path, text, fmt, labels_path)
    if labels_path is not None and fmt != "fasta":
        raise InputError(f"A label file is only used with FASTA input, but '{path}' is read as {fmt}.")

    skipped = dict.fromkeys(SKIP_REASONS, 0)
    unused_labels = out_of_range = 0
    if fmt == "threeline":
        records = _parse_threeline(text, skipped)
    elif fmt == "csv":
        records = _parse_csv(text, path)
    else:
        if labels_path is None:
            raise InputError(f"FASTA input '{path}' needs a label file with one 0/1 string per id.")
        records, unused_labels, out_of_range = _parse_fasta_with_labels(text, labels_path, skipped)

    source = source_name(path)
    chains: list[Chain] = []
    seen: set[str] = set()
    cropped = positives_cropped = 0
    for record_id, sequence, labels in records:
        reason = _problem(record_id, sequence, labels, seen)
        seen.add(record_id)
        if reason:
            skipped[reason] += 1
            continue
        chain = Chain(record_id, sequence.upper(), _label_array(labels), source)
        if max_length is not None and len(chain) > max_length:
            cropped += 1
            positives_cropped += int(chain.labels[max_length:].sum())
            chain = crop(chain, max_length)
        chains.append(chain)

    n_records = len(records) + skipped["malformed"]
    counts = {
        "format": fmt,
        "records": n_records,
        "kept": len(chains),
        "skipped": skipped,
        "cropped": cropped,
        "positives_cropped": positives_cropped,
        "unused_labels": unused_labels,
        "positions_out_of_range": out_of_range,
    }
    if not chains:
        reasons = ", ".join(f"{key} {value}" for key, value in skipped.items() if value) or "none"
        hint = ""
        if fmt == "threeline" and (skipped["missing_labels"] or skipped["malformed"]):
            hint = "; for FASTA input give its label file"
        raise InputError(f"No usable chains in '{path}': {n_records} records, all skipped ({reasons}){hint}.")
    return chains, counts


def _read_text(path: str | Path) -> str:
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"Input file '{path}' does not exist.")
    if not file.is_file():
        raise InputError(f"Input '{path}' is not a file.")
    try:
        raw = file.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # by content, so the extension does not matter
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        raise InputError(f"Could not read '{path}' as a text file.") from None
    # UTF-16 with its byte-order mark (Windows "Unicode text") and UTF-8 with or without one are unambiguous.
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"'{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}, e.g. Latin-1): "
            "save it as UTF-8, or convert it with `iconv -f latin1 -t utf-8 IN > OUT`."
        ) from None


def _detect_format(path: str | Path, text: str, fmt: str, labels_path: str | None) -> str:
    if fmt != "auto":
        return fmt
    if labels_path is not None:
        return "fasta"
    name = Path(path).name.lower().removesuffix(".gz")
    first = next(line for line in text.splitlines() if line.strip()).strip()
    if name.endswith(".csv") or (not first.startswith(">") and "," in first):
        return "csv"
    # Without a label file the labels must be inside the file, so even a .fasta is read as three-line.
    return "threeline"


def _fasta_blocks(text: str, skipped: dict) -> list[tuple[str, list[str]]]:
    """(id, body lines) per `>` header; blank lines are ignored, lines before the first header are malformed."""
    blocks: list[tuple[str, list[str]]] = []
    orphan = False
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            words = line[1:].split()
            blocks.append((words[0] if words else "", []))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            orphan = True
    if orphan:
        skipped["malformed"] += 1
    return blocks


def _parse_threeline(text: str, skipped: dict) -> list[tuple[str, str | None, str | None]]:
    records = []
    for record_id, body in _fasta_blocks(text, skipped):
        if len(body) > 2:  # a sequence and a label line, nothing else; wrapped lines would be ambiguous
            skipped["malformed"] += 1
        elif not body:
            records.append((record_id, "", None))
        elif len(body) == 1:
            records.append((record_id, body[0], None))
        else:
            records.append((record_id, body[0], body[1]))
    return records


def _parse_fasta_with_labels(
    text: str, labels_path: str, skipped: dict
) -> tuple[list[tuple[str, str | None, str | None]], int, int]:
    """(records, label-file ids without a sequence, positions outside their sequence)."""
    labels = _read_label_file(labels_path)
    records = []
    used = set()
    out_of_range = 0
    for record_id, body in _fasta_blocks(text, skipped):
        sequence, label = "".join(body), labels.get(record_id)
        if isinstance(label, tuple):  # binding positions: the 0/1 string needs the sequence's length
            label, outside = _positions_to_labels(label, len(sequence))
            out_of_range += outside
        records.append((record_id, sequence, label))
        used.add(record_id)
    return records, len(set(labels) - used), out_of_range


def _positions_to_labels(positions: tuple[int, ...], length: int) -> tuple[str, int]:
    """(0/1 string with 1 at each 1-based position within ``length``, positions outside it); positions that are
    not integers (``_BAD_POSITIONS``) give an invalid label string so the chain is skipped as invalid_labels."""
    if positions == _BAD_POSITIONS:
        return "?", 0
    inside = [p for p in positions if 1 <= p <= length]
    labels = bytearray(b"0" * length)
    for p in inside:
        labels[p - 1] = ord("1")
    return labels.decode("ascii"), len(positions) - len(inside)


_BAD_POSITIONS = (-(2**63),)  # a positions line that did not parse


def _read_positions(text: str) -> dict[str, tuple[int, ...]]:
    """id -> 1-based binding positions from `id<TAB>p1,p2,...` lines (an id alone: no binding residue)."""
    labels: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        record_id, _, rest = line.strip().partition("\t")
        tokens = [t.strip() for t in rest.split(",") if t.strip()]
        try:
            positions = tuple(int(t) for t in tokens)
        except ValueError:
            positions = _BAD_POSITIONS
        labels.setdefault(record_id.strip(), positions)
    return labels


def _read_label_file(labels_path: str) -> dict[str, str | tuple[int, ...]]:
    """id -> 0/1 string from `>id` + labels (possibly wrapped) or a CSV with columns id,labels, or id -> binding
    positions from `id<TAB>positions` lines; the first line of an id wins."""
    text = _read_text(labels_path)
    if not text.strip():
        raise InputError(f"Label file '{labels_path}' is empty.")
    labels: dict[str, str] = {}
    if "\t" in text and not text.lstrip().startswith(">"):  # tab-separated: id and positions
        return _read_positions(text)
    if text.lstrip().startswith(">"):
        for record_id, body in _fasta_blocks(text, dict.fromkeys(SKIP_REASONS, 0)):
            labels.setdefault(record_id, "".join(body))
        return labels
    rows = _csv_rows(text, labels_path, ("id", "labels"))
    for row in rows:
        labels.setdefault(row["id"], row["labels"])
    return labels


def _parse_csv(text: str, path: str | Path) -> list[tuple[str, str | None, str | None]]:
    rows = _csv_rows(text, path, ("id", "sequence", "labels"))
    return [(row["id"], row["sequence"], row["labels"] or None) for row in rows]


def _csv_rows(text: str, path: str | Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [cell.strip().lower() for cell in next(reader)]
        missing = [c for c in columns if c not in header]
        if missing:
            found = ", ".join(header[:8]) or "none"
            raise InputError(
                f"'{path}' needs the columns {', '.join(columns)} in its header line; "
                f"missing {', '.join(missing)} (found {found})."
            )
        index = {c: header.index(c) for c in columns}
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            rows.append({c: cells[i].strip() if i < len(cells) else "" for c, i in index.items()})
    except csv.Error as exc:
        raise InputError(f"Could not read '{path}' as a CSV file ({exc}).") from None
    return rows


def _problem(record_id: str, sequence: str | None, labels: str | None, seen: set[str]) -> str | None:
    """The first reason to skip a record, or None to keep it."""
    if not record_id:
        return "malformed"
    if not sequence:
        return "empty"
    if labels is None or not labels:
        return "missing_labels"
    if record_id in seen:
        return "duplicate_ids"
    if not set(labels) <= LABEL_CHARS:
        return "invalid_labels"
    if not set(sequence.upper()) <= ESM_ALPHABET:
        return "unknown_residues"
    if len(sequence) != len(labels):
        return "length_mismatch"
    return None


def _label_array(labels: str) -> np.ndarray:
    # '0' and '1' are bytes 48 and 49, checked above, so this is exact.
    return (np.frombuffer(labels.encode("ascii"), dtype=np.uint8) - ord("0")).astype(np.int8)
