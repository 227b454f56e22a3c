"""python -m eval: perplexity of a model with the given blocks removed."""

from sleb.cli import run_cli
from sleb.run_eval import run_eval
from sleb.settings import EvalSettings


def cli(argv=None) -> None:
    run_cli(run_eval, EvalSettings, "python -m eval",
            "Load a causal LM, delete --removal_list blocks, measure perplexity, write a results JSON.",
            argv)


if __name__ == "__main__":
    cli()
