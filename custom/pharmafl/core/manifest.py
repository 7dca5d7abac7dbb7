"""Content hashes of prepared data folders: written into each manifest.json, checked on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pharmafl.core.errors import InputError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path, manifest: dict | None = None) -> None:
    """Raise a InputError unless every file the manifest lists matches its sha256.

    ``manifest`` defaults to the folder's own manifest.json."""
    if manifest is None:
        try:
            manifest = json.loads((Path(folder) / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(
                f"The manifest at '{Path(folder) / 'manifest.json'}' is missing or not valid JSON."
            ) from None
    checksums = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(checksums, dict) or not checksums:
        raise InputError(f"The manifest at '{folder}' lists no checksums to verify.")
    for name, expected in checksums.items():
        file = Path(folder) / name
        if not file.is_file():
            raise InputError(f"'{file}' is listed in the manifest but missing; prepare the data again.")
        if sha256_file(file) != expected:
            raise InputError(f"'{file}' does not match its manifest checksum; it changed after preparation.")
