"""The one exception type dori raises for problems a user can fix (bad input, missing files)."""


class DoriError(Exception):
    """A user-facing error: the CLI prints its message without a traceback."""
