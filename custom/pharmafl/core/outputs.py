"""The folders commands write: checked before anything is touched, replaced only when pharmafl made them.

A folder pharmafl writes as a whole (a data preparation, a simulator workspace) carries a marker file naming
what made it. A command refuses an output folder that exists, is not empty and is not its own kind of output;
it replaces one of its own only when asked (``--overwrite``), and never one that holds the folders it reads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pharmafl.core.errors import InputError

MARKER = ".pharmafl.json"
PREPARE_CHEM, PREPARE_BINDING_SITES, SIMULATE = "prepare chem", "prepare binding-sites", "simulate"
PREPARE_EICU = "prepare eicu"
PREPARATIONS = (PREPARE_CHEM, PREPARE_BINDING_SITES, PREPARE_EICU)  # `prepare --overwrite` replaces any kind


def marker_kind(folder: Path, marker: str = MARKER) -> str | None:
    """The kind of output ``folder`` is (``prepare chem``, ``simulate``...), or None if pharmafl did not make it."""
    try:
        return str(json.loads((Path(folder) / marker).read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(folder: Path, kind: str, marker: str = MARKER) -> None:
    (Path(folder) / marker).write_text(json.dumps({"kind": kind}) + "\n")


def check_output(
    folder: str | Path,
    kinds: Iterable[str],
    overwrite: bool,
    option: str,
    reads: Iterable[str | Path] = (),
    marker: str = MARKER,
) -> bool:
    """Refuse ``folder`` as an output unless it is new, empty, or (with ``overwrite``) one of ``kinds``.

    ``reads`` are the folders and files the command reads: the output may neither be nor contain one of them.
    Returns whether an old output will be replaced. Touches nothing.
    """
    out = Path(folder).expanduser().resolve()
    for path in reads:
        source = Path(path).expanduser().resolve()
        if out == source or out in source.parents:
            raise InputError(f"{option} '{folder}' holds '{path}', which this command reads; choose another folder.")
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"{option} '{folder}' exists and is not a folder.")
    if not any(out.iterdir()):
        return False
    kinds = tuple(kinds)
    kind = marker_kind(out, marker)
    if kind not in kinds:
        what = f"a `pharmafl {kind}` output" if kind else "not a pharmafl output"
        raise InputError(
            f"{option} '{folder}' exists and is {what}; it is left untouched: choose a new or empty folder."
        )
    if not overwrite:
        raise InputError(f"{option} '{folder}' holds a `pharmafl {kind}` output already; --overwrite replaces it.")
    return True


@contextmanager
def staged_output(folder: str | Path, kind: str) -> Iterator[Path]:
    """A fresh folder next to ``folder`` to write into; swapped in on success, removed on failure.

    A failure (or Ctrl-C) leaves the old output whole; the new output holds only what was written into it. The
    caller has checked ``folder`` with ``check_output``.
    """
    out = Path(folder).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    fresh.chmod(0o755)  # mkdtemp's 0700 would hide the output from the user's other accounts and tools
    try:
        yield fresh
        write_marker(fresh, kind)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        fresh.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        fresh.rename(out)
