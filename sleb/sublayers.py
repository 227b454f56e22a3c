"""Sub-layers: the attention or the MLP of one block, removed alone (BlockPruner, arXiv 2406.10594; FinerCut,
arXiv 2405.18218; LLM-Drop, arXiv 2406.15786).

A removal list may name them beside whole blocks: `[14, "17.attn", "5.mlp"]`, in the original block
numbering. A removed sub-layer is replaced by a module that outputs zeros, so its block adds nothing to the
residual stream there: exactly the block without it (a norm after the sub-layer, as Gemma's, maps zeros to
zeros). An attention that is gone writes nothing into the KV cache; block 0 is never a candidate (the
paper's barrier), so the cache's length, which transformers reads from layer 0, stays right.

The search (`greedy`) is SLEB's loop with sub-layers as candidates: each phase skips every remaining
candidate alone on top of what is removed, scores it (metric 3's loss, or KL to the dense model), and
removes the least; ties go to the lower block, attention before MLP. It goes on while the weights removed
are fewer than `budget_blocks` blocks' worth, counting the sub-layers' own matrices (norms and biases not
counted). The reference scoring runs the whole model batch-1 per candidate; `PrefixScorer` reuses each
block's input across a phase, and the candidates it scores within float rounding of the best are scored
again the reference way, so both give one list.
"""

import contextlib
import json
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from sleb import blocks
from sleb.errors import UsageError

KINDS = ("attn", "mlp")  # in tie order: attention before MLP
UNITS = {"block": (), "sublayer": KINDS, "attention": ("attn",), "mlp": ("mlp",)}
_ATTRIBUTES = {"attn": "self_attn", "mlp": "mlp"}  # the module each kind is, in the decoder blocks that have both
_NAME = re.compile(r"^\s*(\d+)\.(attn|mlp)\s*$")


@dataclass(frozen=True)
class Sublayer:
    block: int  # original index
    kind: str  # "attn" or "mlp"

    def __str__(self) -> str:
        return f"{self.block}.{self.kind}"

    @property
    def order(self) -> tuple:
        return self.block, KINDS.index(self.kind)


def parse(item):
    """A removal-list entry: a block (int) or a Sublayer ("17.attn", "5.mlp")."""
    if isinstance(item, Sublayer) or (isinstance(item, int) and not isinstance(item, bool)):
        return item
    found = _NAME.match(item) if isinstance(item, str) else None
    if found is None:
        raise UsageError(f"removal list entry {item!r} is neither a block number nor a sub-layer such as '17.attn' "
                         "or '5.mlp'")
    return Sublayer(int(found.group(1)), found.group(2))


def split(removal_list) -> tuple:
    """(whole blocks, sub-layers) of a removal list, each checked once: no repeats, and no sub-layer of a block
    that goes whole."""
    parsed = [parse(item) for item in removal_list]
    whole = [item for item in parsed if isinstance(item, int)]
    parts = [item for item in parsed if isinstance(item, Sublayer)]
    if len(set(parts)) != len(parts):
        raise UsageError(f"the removal list names a sub-layer twice: {[str(p) for p in parts]}")
    both = [p for p in parts if p.block in whole]
    if both:
        raise UsageError(f"the removal list removes block {both[0].block} whole and its {both[0].kind} too; name one")
    return whole, parts


def parse_flag(value, what: str = "--removal_list") -> list:
    """A removal list as a user typed it, sub-layers allowed: fire's list, a JSON string or a single entry."""
    from sleb.blocks import check_removal_list

    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # the block validator says what is wrong with it
    if isinstance(value, str) and _NAME.match(value):
        value = [value]
    if isinstance(value, (list, tuple)) and any(isinstance(item, str) for item in value):
        split(value)  # one line for a bad entry or a repeat
        return as_record(value)  # blocks as numbers, sub-layers as "17.attn": what results and settings write
    return check_removal_list(value, what=what)


def has_sublayers(removal_list) -> bool:
    return any(isinstance(parse(item), Sublayer) for item in removal_list or [])


def as_record(removal_list) -> list:
    """The list as results and cards write it: blocks as numbers, sub-layers as "17.attn"."""
    return [item if isinstance(item, int) else str(item) for item in map(parse, removal_list)]


def check_model(model) -> None:
    """One line for a model whose blocks do not hold an attention and an MLP sub-layer sleb can take out."""
    for index, block in enumerate(blocks.get_blocks(model)):
        missing = [name for name in _ATTRIBUTES.values() if not isinstance(getattr(block, name, None), nn.Module)]
        if missing:
            raise UsageError(f"block {index} of {type(model).__name__} has no {missing[0]} sub-layer; sub-layers can "
                             "be removed from decoders whose blocks hold self_attn and mlp (Llama, Qwen, Mistral, "
                             "Gemma), not this one")


def check_against(removal_list, depth: int) -> list:
    """The sub-layers of `removal_list`, each in a block the model has."""
    _, parts = split(removal_list)
    wrong = [p for p in parts if not 0 <= p.block < depth]
    if wrong:
        raise UsageError(f"sub-layer {wrong[0]} names block {wrong[0].block}, and the model has blocks 0..{depth - 1}")
    return parts


def blocks_worth(model, removal_list) -> float:
    """How many blocks' weights a removal list takes out (whole blocks 1 each, a sub-layer its share of one);
    on the model before anything is removed."""
    whole, parts = split(removal_list)
    block = weights(model, parts[0].block if parts else 0)  # an int names the whole block: both sub-layers
    return len(whole) + sum(weights(model, part) for part in parts) / block


def budget_weights(model, budget_blocks: int) -> int:
    """`budget_blocks` blocks' worth of weights, a block being its attention's and its MLP's matrices (block 1's:
    the first candidate)."""
    return budget_blocks * weights(model, 1 if blocks.num_blocks(model) > 2 else 0)


def matrices(module: nn.Module) -> int:
    """Weights of a sub-layer as the budget counts them: its matrices (2-D parameters), not its norms or biases."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def weights(model, item) -> int:
    block = blocks.get_blocks(model)[item.block if isinstance(item, Sublayer) else item]
    kinds = [item.kind] if isinstance(item, Sublayer) else list(KINDS)
    return sum(matrices(getattr(block, _ATTRIBUTES[kind])) for kind in kinds)


def _absent(kind: str) -> nn.Module:
    # the same module the saved checkpoint's own code builds (sleb/decilm/modeling_decilm.py)
    from sleb.decilm.modeling_decilm import Absent

    return Absent(attention=kind == "attn")


@contextlib.contextmanager
def skipping(model, parts):
    """Within the block, the sub-layers `parts` (original numbering, of a model with no blocks removed yet) are
    gone; afterwards the model is whole again."""
    stack, saved = blocks.get_blocks(model), []
    try:
        for part in parts:
            block, name = stack[part.block], _ATTRIBUTES[part.kind]
            saved.append((block, name, getattr(block, name)))
            setattr(block, name, _absent(part.kind))
        yield model
    finally:
        for block, name, module in reversed(saved):
            setattr(block, name, module)


def removed_in(model) -> list:
    """The sub-layers gone from `model` (original numbering), read from the modules that stand in for them."""
    from sleb.decilm.modeling_decilm import Absent

    kept = blocks.origin(model).kept
    return [Sublayer(kept[position], kind) for position, block in enumerate(blocks.get_blocks(model))
            for kind, name in _ATTRIBUTES.items() if isinstance(getattr(block, name, None), Absent)]


def remove(model, parts) -> None:
    """Take the sub-layers out for good (before any whole block goes: the numbering is the original one)."""
    stack = blocks.get_blocks(model)
    for part in parts:
        setattr(stack[part.block], _ATTRIBUTES[part.kind], _absent(part.kind))


def candidates(depth: int, unit: str, removed: list) -> list:
    """This phase's candidates: each kind `unit` allows in every block but the first and the last, not yet gone."""
    gone = set(removed)
    return [Sublayer(block, kind) for block in range(1, depth - 1) for kind in UNITS[unit]
            if Sublayer(block, kind) not in gone]


@dataclass
class SublayerSearch:
    """What the sub-layer search found: the removal list in removal order, and per phase every candidate's loss."""

    removal_list: list
    losses: list  # per phase: {"17.attn": loss, ...}
    weights_removed: int
    budget: int  # weights of budget_blocks blocks
    phase_seconds: list
    total_seconds: float


class PrefixScorer:
    """Every candidate of a phase scored with exact prefix reuse: what enters block j does not depend on which
    sub-layer of block j or later is skipped, so each block's input is computed once per phase and batch, and
    a candidate runs only its own block on (the fast engine's trick, sleb/fast_search.py, on sub-layers).
    Batched windows and a chunked head round differently from the reference's batch-1 forwards, so
    `tie_margin` says how close two losses must be for that to matter; the loop re-scores those the reference
    way."""

    def __init__(self, model, windows: torch.Tensor, objective=None, batch_size: int = 4, progress: bool = True):
        from sleb.fast_search import HALF_TIE_MARGIN, TIE_MARGINS

        self.model, self.windows, self.objective, self.batch_size = model, windows, objective, max(1, batch_size)
        self.progress = progress
        self.tie_margin = TIE_MARGINS.get(blocks.compute_dtype(model), HALF_TIE_MARGIN)

    @torch.inference_mode()
    def phase(self, removed: list, options: list) -> dict:
        from tqdm import tqdm

        from sleb import forward
        from sleb.engines import window_loss
        from sleb.models import input_device

        stack, losses = blocks.get_blocks(self.model), {option: 0.0 for option in options}
        seqlen = self.windows.shape[1]
        with skipping(self.model, removed):
            for start in tqdm(range(0, len(self.windows), self.batch_size), desc=f"phase {len(removed) + 1}",
                              leave=False, disable=not self.progress):
                rows = list(range(start, min(start + self.batch_size, len(self.windows))))
                ids = self.windows[rows].to(input_device(self.model))
                inputs = forward.capture(self.model, ids)
                entering, hidden = [], inputs.hidden
                for index in range(len(stack)):  # the prefix states: each block's input, once for all candidates
                    entering.append(hidden)
                    hidden = forward.run_blocks(stack, [index], hidden, inputs)
                term = None if self.objective is None else (
                    lambda logits, first, stop: self.objective.chunk_sums(logits, rows, first, stop))
                for option in options:
                    with skipping(self.model, [option]):
                        out = forward.run_blocks(stack, range(option.block, len(stack)), entering[option.block],
                                                 inputs)
                        sums = forward.tail_nll_sums(self.model, out, inputs, ids, term)
                    losses[option] += sum(window_loss(float(s) / (seqlen - 1), seqlen) for s in sums.double().cpu())
        return losses


@torch.inference_mode()
def importance(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """LLM-Drop's one-shot score per sub-layer of every block: 1 - the mean over tokens of the cosine between the
    residual stream before the sub-layer and after it. Before the attention is the block's input, after it
    (which is before the MLP) the block's output with its MLP gone, after the MLP the block's output."""
    from tqdm import tqdm

    from sleb import forward
    from sleb.models import input_device

    check_model(model)
    stack = blocks.get_blocks(model)
    sums, tokens = {}, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="sub-layer similarities", leave=False,
                      disable=not progress):
        ids = windows[start:start + batch_size].to(input_device(model))
        inputs = forward.capture(model, ids)
        hidden = inputs.hidden
        for index in range(len(stack)):
            with skipping(model, [Sublayer(index, "mlp")]):
                middle = forward.run_blocks(stack, [index], hidden, inputs)
            after = forward.run_blocks(stack, [index], hidden, inputs)
            for kind, (a, b) in (("attn", (hidden, middle)), ("mlp", (middle, after))):
                cos = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).double().sum().item()
                sums[Sublayer(index, kind)] = sums.get(Sublayer(index, kind), 0.0) + (a.shape[0] * a.shape[1] - cos)
            hidden = after
        tokens += ids.shape[0] * ids.shape[1]
    return {part: total / tokens for part, total in sums.items()}


def by_importance(model, scores: dict, budget_blocks: int, unit: str) -> list:
    """The candidates of `unit` from the least important up, taken until `budget_blocks` blocks' weights are
    gone (ties to the lower block, attention before MLP)."""
    budget, taken, chosen = budget_weights(model, budget_blocks), 0, []
    for part in sorted(candidates(blocks.num_blocks(model), unit, []), key=lambda p: (scores[p], p.order)):
        if taken >= budget:
            break
        chosen.append(part)
        taken += weights(model, part)
    if taken < budget:
        raise UsageError(f"every {unit} candidate is gone before {budget_blocks} blocks' worth of weights; "
                         "remove fewer")
    return chosen


def _settled(scores: dict, margin: float, exact: Callable) -> dict:
    """`scores` with every candidate within `margin` (relative) of the best re-scored by `exact`, so float
    rounding never decides which one goes."""
    if margin <= 0:
        return scores
    best = min(scores.values())
    close = [part for part, value in scores.items() if value - best <= margin * abs(best)]
    if len(close) < 2:
        return scores
    return {**scores, **{part: exact(part) for part in close}}


def greedy(model, score: Callable[[list, list], dict], budget_blocks: int, unit: str = "sublayer",
           log: Callable = print, on_phase: Optional[Callable] = None, exact: Optional[Callable] = None,
           tie_margin: float = 0.0, resume: Optional[SublayerSearch] = None) -> SublayerSearch:
    """The greedy loop. `score(removed, options)` gives each option's calibration loss with it and `removed`
    skipped; `exact(parts)`, the reference loss, settles options within `tie_margin` of the best. `resume`, a
    partial result of the same search, goes on after its phases (a phase depends only on the ones before it);
    `on_phase(result)` gets the result so far after each phase."""
    if unit not in UNITS or unit == "block":
        raise UsageError(f"--unit must be sublayer, attention or mlp for a sub-layer search, got {unit!r}")
    check_model(model)
    depth, budget = blocks.num_blocks(model), budget_weights(model, budget_blocks)
    found = resume or SublayerSearch([], [], 0, budget, [], 0.0)
    if found.budget != budget:
        raise UsageError(f"the search resumed had a budget of {found.budget} weights, this one {budget}; "
                         "use the same --num_remove_blocks")
    removed, started = [parse(name) for name in found.removal_list], time.perf_counter() - found.total_seconds
    while found.weights_removed < budget:
        options = candidates(depth, unit, removed)
        if not options:
            raise UsageError(f"every {unit} candidate is gone before {budget_blocks} blocks' worth of weights; "
                             "remove fewer")
        began = time.perf_counter()
        scores = score(removed, options)
        if exact is not None:
            scores = _settled(scores, tie_margin, lambda part: exact(removed + [part]))
        best = min(options, key=lambda part: (scores[part], part.order))
        removed.append(best)
        found = SublayerSearch([str(p) for p in removed], found.losses + [{str(p): v for p, v in scores.items()}],
                               found.weights_removed + weights(model, best), budget,
                               found.phase_seconds + [round(time.perf_counter() - began, 3)],
                               round(time.perf_counter() - started, 3))
        log(f"phase {len(removed)}: removed {best} (loss {scores[best]:.4f}); {found.weights_removed / budget:.0%} "
            f"of {budget_blocks} blocks' weights")
        if on_phase is not None:
            on_phase(found)
    return found
