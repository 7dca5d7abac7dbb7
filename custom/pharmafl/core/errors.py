"""Errors a user can cause. The CLI prints their message as one sentence and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (missing file, wrong column, invalid configuration)."""
