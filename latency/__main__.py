"""python -m latency: prompt and generation latency, dense vs pruned, and the speedup."""

from sleb.cli import run_cli
from sleb.latency import run_latency
from sleb.settings import LatencySettings


def cli(argv=None) -> None:
    run_cli(run_latency, LatencySettings, "python -m latency",
            "Measure dense and pruned latency in one process; report the speedup and the ideal N/(N-k).",
            argv)


if __name__ == "__main__":
    cli()
