"""The one error type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or a missing precondition the user can fix: what is wrong and how to fix it."""
