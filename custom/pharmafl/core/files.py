"""Reading the JSON files pharmafl is handed (job configs, policies, manifests), with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

from pharmafl.core.errors import InputError


def read_json(path: str | Path, what: str = "file", hint: str = "") -> dict:
    """The JSON object in ``path``; a missing file, invalid JSON or a non-object is an `InputError`.

    Args:
        path: the file.
        what: what the file is, for the message (``"job config"``).
        hint: a sentence appended when the file is missing (``"is this a FLARE job folder?"``).
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(f"the {what} '{path}' does not exist" + (f"; {hint}" if hint else ".")) from err
    except json.JSONDecodeError as err:
        raise InputError(f"the {what} '{path}' is not valid JSON ({err.msg} at line {err.lineno}).") from err
    if not isinstance(value, dict):
        raise InputError(f"the {what} '{path}' must hold a JSON object, not {type(value).__name__}.")
    return value
