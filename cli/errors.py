"""CLI error type, in its own module so `python -m cli.main` and the `stylerec` script share one class."""


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""
