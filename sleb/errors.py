"""The one error type users see: bad input they can fix, reported as a single line (exit code 2)."""

import math


class UsageError(ValueError):
    """Bad input: the message names the problem and the fix. The CLI prints it alone and exits 2; from
    Python (`sleb.UsageError`) it is raised like any ValueError."""


def check_at_least(name: str, value, minimum) -> None:
    """Flag --name must be >= minimum."""
    if value < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, got {value!r}")


def comma_list(value: str, flag_name: str, example: str) -> list:
    """'a, b,c' -> ['a', 'b', 'c']; an empty list is an error."""
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    if not names:
        raise UsageError(f"--{flag_name} is empty; name at least one, e.g. {example}")
    return names


def first_line(error: BaseException, limit: int = 240) -> str:
    """A library's error reduced to its first line, for quoting inside a one-line message."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit].rstrip(".")  # our message goes on after it


def check_finite(value, what: str, model) -> None:
    """Stop with one line when a loss, score or perplexity is NaN or infinite.

    A half-precision overflow makes every later comparison meaningless (NaN compares false), so
    the run must not go on to pick a block or write a number as if it were a result.
    """
    if value is not None and math.isfinite(value):
        return
    dtype = str(model.dtype).replace("torch.", "")
    advice = {"float16": "try --dtype bfloat16 or --dtype float32",
              "bfloat16": "try --dtype float32"}.get(dtype, "the checkpoint's weights themselves may be broken")
    name = getattr(model, "name_or_path", "") or type(model).__name__
    raise UsageError(f"{what} is {value} for {name} in {dtype} (the forward overflowed); {advice}")
