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
