"""Benchmarks, each printing JSON: run from a checkout as `python -m bench.NAME` (bench/*.py says which)."""

import sys


def command(main) -> None:
    """Run `main` as a command: flags through fire, and a bad input one line on stderr with exit code 2."""
    import fire

    from sleb.errors import UsageError

    try:
        fire.Fire(main)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def choices(value, allowed, flag: str) -> list:
    """A comma list flag as fire hands it over ("a,b", a lone 3 as int, or a tuple), each entry one of `allowed`;
    else one line naming the flag."""
    from sleb.errors import UsageError

    found = [str(v).strip() for v in (str(value).split(",") if isinstance(value, (str, int)) else value)]
    wrong = [name for name in found if name not in allowed]
    if wrong:
        raise UsageError(f"--{flag}: {wrong[0]!r} is not one of {', '.join(map(str, allowed))}")
    return found
