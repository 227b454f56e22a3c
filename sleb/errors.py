"""The one error type users see: bad input they can fix, reported as a single line (exit code 2)."""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix. The CLI prints it alone and exits 2."""


def check_at_least(name: str, value, minimum) -> None:
    """Flag --name must be >= minimum."""
    if value < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, got {value!r}")
