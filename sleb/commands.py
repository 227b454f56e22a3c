"""The front door: every command in one table, each a pipeline module's `run(settings)` and its settings.

    sleb search|eval|heal|latency|report [--flags]     (the console script; `python -m sleb ...` the same)
    python -m sleb [--flags]                            (search, as the paper's README runs it)
    python -m eval, python -m latency, python -m sleb.heal   (the paper's and earlier names, from a checkout)
"""

import sys
from dataclasses import dataclass
from typing import Callable

from sleb import latency, report, run_eval, run_heal, run_search
from sleb.cli import run_cli

from sleb.settings import EvalSettings, HealSettings, LatencySettings, ReportSettings, SearchSettings


@dataclass(frozen=True)
class Command:
    run: Callable  # run(settings) -> the results record
    settings: type
    usage: str  # how the help text names it
    summary: str


COMMANDS = {
    "search": Command(run_search.run, SearchSettings, "sleb search (python -m sleb)",
                      "Greedily remove the blocks whose removal raises calibration loss least; evaluate; write a "
                      "results JSON."),
    "eval": Command(run_eval.run, EvalSettings, "sleb eval (python -m eval)",
                    "Load a causal LM, delete --removal_list blocks, measure perplexity, write a results JSON."),
    "heal": Command(run_heal.run, HealSettings, "sleb heal (python -m sleb.heal)",
                    "LoRA-heal a pruned model with transformers' Trainer; save the merged checkpoint and a results "
                    "JSON."),
    "latency": Command(latency.run, LatencySettings, "sleb latency (python -m latency)",
                       "Measure dense and pruned latency in one process; report the speedup and the ideal N/(N-k)."),
    "report": Command(report.run, ReportSettings, "sleb report [FOLDER]",
                      "Write a markdown report and plots from a folder of results JSONs."),
}


def cli(name: str, argv=None) -> None:
    """Run one command on command-line flags (`argv`, default sys.argv[1:])."""
    command = COMMANDS[name]
    argv = list(sys.argv[1:] if argv is None else argv)
    if name == "report" and argv and not argv[0].startswith("-"):
        argv = ["--folder"] + argv  # `sleb report FOLDER`, as the report has always been called
    run_cli(command.run, command.settings, command.usage, command.summary, argv)


def main(argv=None) -> None:
    """`sleb COMMAND [--flags]`; with flags only (or none), `search`, as `python -m sleb` has always run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        cli(argv[0], argv[1:])
    else:
        cli("search", argv)  # a stray word is refused there, in one line


def search(argv=None) -> None:
    cli("search", argv)


def evaluate(argv=None) -> None:
    cli("eval", argv)


def heal(argv=None) -> None:
    cli("heal", argv)


def measure_latency(argv=None) -> None:
    cli("latency", argv)


def write_report(argv=None) -> None:
    cli("report", argv)



