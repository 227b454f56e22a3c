"""python -m sleb: search which blocks to remove (SLEB), then evaluate the pruned model."""

from sleb.cli import run_cli
from sleb.run_search import run_search
from sleb.settings import SearchSettings


def cli(argv=None) -> None:
    run_cli(run_search, SearchSettings, "python -m sleb",
            "Greedily remove the blocks whose removal raises calibration loss least; evaluate; write a results JSON.",
            argv)


if __name__ == "__main__":
    cli()
