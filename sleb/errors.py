"""The one error type users see: bad input they can fix, reported as a single line (exit code 2)."""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix. The CLI prints it alone and exits 2."""
