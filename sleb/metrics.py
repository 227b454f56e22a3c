"""The search metrics, one record each: what runs, and what the rest of the package may ask of it.

Settings, the API, the commands, the model card and the report read these records; no other module
compares a metric's name. A metric's function has the signature `run(job, state) -> state`
(sleb/search_algorithms.py, sleb/evopress.py)."""

from dataclasses import dataclass
from typing import Callable

from sleb import objectives
from sleb import search_algorithms
from sleb.errors import UsageError
from sleb.evopress import evopress
from sleb.objectives import OBJECTIVES

ENGINES = ("fast", "reference")


@dataclass(frozen=True)
class Metric:
    name: str
    run: Callable
    summary: str  # for --help
    iterative: bool = False  # a partial result (phases, generations) can be continued
    objectives: tuple = ("ce",)  # the objectives it can minimise (those scored by calibration loss take kl too)
    engines: tuple = ()  # the loss engines it scores with (sleb/engines.py); none where it runs the blocks itself
    compensates: bool = False  # scores each candidate with its linear map and leaves the maps folded in
    evolves: bool = False  # takes the --evo_* settings
    paper_objective: str = "ce"  # what its own paper scores by: a run on another objective is labelled so
    calibrated: bool = True  # chooses from calibration data (random does not)
    seeded_draw: bool = False  # a random draw: runs that differ only by seed are one experiment, averaged
    # how it ranks sub-layers (--unit sublayer|attention|mlp): "greedy" (the loop, by calibration loss),
    # "similarity" (LLM-Drop's one-shot cosine of before and after), or None where it takes whole blocks only
    sublayers: object = None

    @property
    def changes_weights(self) -> bool:
        """Leaves something folded into the model: its dense figures come first, and it is never resumed."""
        return self.compensates

    def label(self, objective: str) -> str:
        """How results name a search on `objective`: the objective is named where it is not the paper's ce
        or not the metric's own paper's (evopress's scores by KL, so its ce runs say ce)."""
        return self.name if objective == "ce" == self.paper_objective else f"{self.name} ({objective})"


_BY_LOSS = dict(objectives=OBJECTIVES, engines=ENGINES)
METRICS = {metric.name: metric for metric in (
    Metric("sleb", search_algorithms.sleb_iterative, "iterative, the paper's metric 3", iterative=True,
           sublayers="greedy", **_BY_LOSS),
    Metric("sleb_compensated", search_algorithms.sleb_iterative,  # with a CompensatedEngine (api.search builds it)
           "the same loop, each candidate scored with its linear map folded in, the chosen maps kept",
           compensates=True, **_BY_LOSS),
    Metric("evopress", evopress, "EvoPress's evolutionary search, started from the sleb list", iterative=True,
           evolves=True, paper_objective="kl", **_BY_LOSS),
    Metric("sleb_oneshot", search_algorithms.sleb_oneshot, "the paper's metric 2, one pass", **_BY_LOSS),
    Metric("cosine", search_algorithms.cosine, "ShortGPT's Block Influence", sublayers="similarity"),
    Metric("angular", search_algorithms.angular, "Gromov et al.'s angular distance of a run of blocks"),
    Metric("random", search_algorithms.random_choice, "a seeded random draw", calibrated=False, seeded_draw=True),
)}
PAPER = "sleb"  # the paper's search: other lists are compared with its list (sleb/report.py)


def described() -> str:
    """Every metric with its summary, for --metric's help."""
    return ", ".join(f"{metric.name} ({metric.summary})" for metric in METRICS.values())


def get(name: str) -> Metric:
    if name not in METRICS:
        raise UsageError(f"unknown --metric {name!r}; use one of {', '.join(METRICS)}")
    return METRICS[name]


def check_choices(metric: str, engine: str, early_barrier: int, latter_barrier: int) -> None:
    """The checks of a search's settings that need no model."""
    if engine not in ENGINES:
        raise UsageError(f"unknown --engine {engine!r}; use {' or '.join(ENGINES)}")
    get(metric)
    if early_barrier < 0 or latter_barrier < 0:
        raise UsageError(f"barriers must be >= 0, got --early_barrier {early_barrier} --latter_barrier {latter_barrier}")


def check_objective(metric: str, objective: str, kl_top_k: int, kl_gb: float) -> None:
    """The one check of a search's objective: a known one with sane settings, on a metric that takes it."""
    objectives.check(objective, kl_top_k, kl_gb)
    if objective not in get(metric).objectives:
        takers = [name for name, entry in METRICS.items() if objective in entry.objectives]
        raise UsageError(f"--objective {objective} applies to the metrics that score by calibration loss "
                         f"({', '.join(takers)}), not to {metric}")


def check_resumable(metric: str, finished: bool, what: str, fix: str) -> None:
    """Whether a search of `metric` can continue from a saved result (`what`, finished or not): one line why not."""
    if get(metric).changes_weights:
        raise UsageError(f"cannot resume: --metric {metric} folds maps into the model as it goes, and {what} does "
                         f"not hold them; {fix}")
    if not finished and not get(metric).iterative:
        raise UsageError(f"cannot resume: --metric {metric} scores every block in one pass, so {what} holds nothing "
                         f"to continue; {fix}")
