"""The ``pharmafl`` command: prepare, simulate, baseline, experiment, predict, report, bench, poc, submit,
provision, approve, ledger, privacy, audit; one module per command group."""

from __future__ import annotations

import sys

from pharmafl import __version__
from pharmafl.cli import baseline, bench, consortium, experiment, prepare, privacy, run
from pharmafl.cli.common import Parser
from pharmafl.core.errors import InputError


def build_parser() -> Parser:
    parser = Parser(prog="pharmafl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pharmafl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    for group in (prepare, run, baseline, experiment, bench, consortium, privacy):
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:  # UserError is one; any other exception is a bug and keeps its traceback
        print(f"pharmafl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pharmafl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
