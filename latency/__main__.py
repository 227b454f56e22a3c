"""python -m latency (from a checkout: the paper's command): `sleb latency`."""

from sleb.commands import cli

if __name__ == "__main__":
    cli("latency")
