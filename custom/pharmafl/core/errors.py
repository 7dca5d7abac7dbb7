"""Errors by layer.

Library code (data preparation, models, training, aggregation) raises `InputError` for bad data or
settings it was handed, or plain `ValueError`/`TypeError`. The boundaries that know the user's input
(the CLI, the jobs and consortium layers) raise `UserError`; the CLI prints either as one sentence
and exits with code 2. Anything else is a bug: it keeps its traceback and exits with code 1.
"""


class InputError(ValueError):
    """Bad data or settings handed to library code (an unparsable file, a missing column, a refused value)."""


class UserError(InputError):
    """Bad input from the user, worded for the command line (missing file, wrong option, invalid configuration)."""
