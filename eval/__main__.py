"""python -m eval (from a checkout: the paper's command): `sleb eval`."""

from sleb.commands import cli

if __name__ == "__main__":
    cli("eval")
