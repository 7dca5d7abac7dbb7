"""What every command group shares: the parser class and option types."""

from __future__ import annotations

import argparse

from pharmafl.core.settings import parsed_value


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, options without a help text included."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and action.nargs != 0 and not action.required
        if shown and action.default is not argparse.SUPPRESS and "default" not in text:
            text += " (default: not set)" if action.default is None else " (default: %(default)s)"
        return text.strip()


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def ints(text: str) -> list[int]:
    return [int(v) for v in floats(text)]


def assignment(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as JSON when it is JSON (numbers, true/false, lists), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return name, parsed_value(value)


def add_executor_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        type=assignment,
        metavar="NAME=VALUE",
        help="change a setting of the job (repeatable): NAME or GROUP.NAME (groups: training, trunk, lora, "
        "secure_sum), e.g. --set grad_noise_std=1e-4 --set lora.rank=8; an unknown name is refused",
    )


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} (never a folder pharmafl did not make)"
    )


def executor_overrides(args: argparse.Namespace) -> dict | None:
    overrides = dict(args.set or [])
    if getattr(args, "model", None):
        overrides["model"] = args.model
    return overrides or None
