"""Running a model up to its LM head, whole or block by block. The only module that hooks a model.

The model's own forward computes masks, position embeddings and everything else a block is given;
`capture` records those arguments for every block once, with hooks on the real blocks (they depend
on shapes and positions, not on hidden states), so a block can later be called on any hidden state
exactly as the model would call it, including after other blocks were skipped. Callers hand over
the block modules they run, so an engine keeps running its own blocks even if the model's list is
changed elsewhere. The head (final
norm, LM head, Gemma's soft-capping) is applied in chunks of positions with the loss in float32, so
full float32 logits for a large vocabulary (150k x batch x 2048) never exist at once.
"""

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sleb import blocks
from sleb.errors import check_finite, first_line
from sleb.models import input_device

# Positions per head chunk: about 2**26 float32 logits (256 MB) at a time.
LOGITS_PER_CHUNK = 2**26


class _ReachedHead(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def _stop_at_head(module, args, kwargs):
    raise _ReachedHead(args[0] if args else next(iter(kwargs.values())))


def _run_to_head(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward, stopped where the LM head would start; returns the head's input."""
    handle = model.get_output_embeddings().register_forward_pre_hook(_stop_at_head, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _ReachedHead as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__} never called its output embeddings")


def final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states the LM head would see (after the final norm), without computing logits."""
    return _run_to_head(model, input_ids)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits computed as the model's own forward computes them (in its dtype, then cast)."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma 2/3 squash logits in their CausalLM forward, after the head, in the model's dtype
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def head_matches_forward(model) -> bool:
    """True when final_hidden_states + head_logits reproduce model(...).logits.

    Checked once per model on a short input; architectures that post-process logits in some other
    way fall back to the model's own full logits. A forward that is not finite stops the run here.
    """
    cached = getattr(model, "_sleb_head_matches", None)
    if cached is not None:
        return cached
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(8, device=input_device(model)).unsqueeze(0) % vocab
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits.float()
        check_finite(reference.sum().item(), "the dense model's logits on a short input", model)
        ours = head_logits(model, final_hidden_states(model, ids))
    scale = reference.abs().max().clamp_min(1.0)
    matches = bool(torch.allclose(ours.to(reference.device), reference, atol=1e-3 * float(scale), rtol=1e-3))
    model._sleb_head_matches = matches
    return matches


def nll_sums_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor, term=None) -> torch.Tensor:
    """Per window: sum of next-token NLL over positions 0..T-2, float32, head applied in chunks; or, given
    `term(logits, start, stop) -> per-window sums`, that objective's sums (sleb/objectives.py)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    batch, length = input_ids.shape
    chunk = max(1, LOGITS_PER_CHUNK // (vocab * batch))
    total = None
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        logits = head_logits(model, hidden[:, start:stop])
        if term is not None:
            part = term(logits, start, stop)
        else:
            labels = input_ids[:, start + 1 : stop + 1].to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none")
            part = nll.view(batch, -1).sum(dim=1)
        total = part if total is None else total + part
    return total


def window_nll_sums(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per window: sum of next-token NLL (float32) under the model as it is now."""
    if head_matches_forward(model):
        return nll_sums_from_hidden(model, final_hidden_states(model, input_ids), input_ids)
    logits = model(input_ids=input_ids, use_cache=False).logits
    labels = input_ids[:, 1:].to(logits.device)
    return torch.stack([
        F.cross_entropy(logits[i, :-1].float(), labels[i], reduction="sum") for i in range(len(input_ids))
    ])


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # what enters block 0 (embeddings, scaled as the model scales them)
    args: list  # per original block: positional arguments after the hidden state
    kwargs: list  # per original block: keyword arguments (masks, position embeddings, ...)
    outputs: Optional[list] = None  # per block: its output in this dense forward (when asked for)
    tail: Optional[nn.Module] = None  # the first module the last block's output goes into (None: not seen)


def _hidden_key(kwargs) -> str:
    """The keyword carrying the hidden state of a call made without positional arguments."""
    return "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))


def hidden_of(args, kwargs):
    """A module call's hidden state: its first positional argument, else the hidden-state keyword."""
    return args[0] if args else kwargs[_hidden_key(kwargs)]


def output_of(out):
    return out[0] if isinstance(out, tuple) else out


def capture(model, input_ids: torch.Tensor, keep_outputs: bool = False) -> BlockInputs:
    """What the model hands each of its blocks for these token ids, seen by hooks on the real blocks
    during one dense forward (so every attribute the model reads from a block is there).

    Also finds the tail: the first module outside the blocks that runs after the last block, and
    checks that it receives the last block's output unchanged, so `tail_nll_sums` can hand it any
    hidden state. `keep_outputs` keeps every block's output (the first phase's prefix states)."""
    block_list = blocks.get_blocks(model)
    inside = {id(module) for block in block_list for module in block.modules()} | {id(block_list)}
    calls, outputs, last, tail = [], [], [], []

    def on_block(module, args, kwargs):
        rest = dict(kwargs)
        if not args:
            rest.pop(_hidden_key(rest))
        calls.append((hidden_of(args, kwargs), tuple(args[1:]), rest))

    def after_block(module, args, kwargs, out):
        last.append(output_of(out))
        if keep_outputs:
            outputs.append(last[-1])
        elif len(last) > 1:
            last[-2] = None  # hold only the newest output unless all are asked for

    def outside(module, args, kwargs):
        if len(last) == len(block_list) and not tail and (args or kwargs):
            tail.append((module, hidden_of(args, kwargs)))

    handles = [block.register_forward_pre_hook(on_block, with_kwargs=True) for block in block_list]
    handles += [block.register_forward_hook(after_block, with_kwargs=True) for block in block_list]
    handles += [module.register_forward_pre_hook(outside, with_kwargs=True) for module in model.modules()
                if id(module) not in inside]
    try:
        _run_to_head(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(block_list):
        raise RuntimeError(f"expected {len(block_list)} block calls, saw {len(calls)}")
    # Where anything happens between the last block and the next module, the tail cannot be followed.
    entry = tail[0][0] if tail and torch.equal(tail[0][1], last[-1]) else None
    return BlockInputs(calls[0][0], [a for _, a, _ in calls], [k for _, _, k in calls],
                       outputs if keep_outputs else None, entry)


def run_blocks(block_list, indices, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """Run blocks `indices` (positions in `block_list`, which `inputs` was captured for) in order."""
    for index in indices:
        hidden = output_of(block_list[index](hidden, *inputs.args[index], **inputs.kwargs[index]))
    return hidden


def _after_blocks(model, tail: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The head's input when `hidden` leaves the last block: the model's own forward with an empty
    block list, `hidden` handed to the tail module in place of what arrives there."""
    def inject(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, _hidden_key(kwargs): hidden}

    parent, attribute = blocks.block_owner(model)
    original = getattr(parent, attribute)
    handle = tail.register_forward_pre_hook(inject, with_kwargs=True)
    setattr(parent, attribute, nn.ModuleList())
    try:
        return _run_to_head(model, input_ids)
    finally:
        setattr(parent, attribute, original)
        handle.remove()


def tail_nll_sums(model, hidden: torch.Tensor, inputs: BlockInputs, input_ids: torch.Tensor,
                  term=None) -> torch.Tensor:
    """Per window: next-token NLL sum (float32), or `term`'s sums, of what follows the blocks (final norm,
    head) applied to `hidden`."""
    if inputs.tail is None:
        raise RuntimeError("the capture did not see where the last block's output goes")
    if inputs.tail is not model.get_output_embeddings():
        hidden = _after_blocks(model, inputs.tail, hidden, input_ids)
    return nll_sums_from_hidden(model, hidden, input_ids, term)


def cannot_follow(model) -> Optional[str]:
    """Why the fast engine cannot compute this model's loss from block outputs, or None when it can.

    Tried once per model on a short input: the head must reproduce the logits, the capture must see
    each block called once and the tail must take the last block's output unchanged."""
    if not head_matches_forward(model):
        return f"{type(model).__name__} post-processes its logits in a way the fast engine cannot follow"
    derived = blocks.index_derived(model)
    if derived:  # the fast engine reuses block outputs computed at the blocks' original positions
        return (f"{type(model).__name__}'s blocks derive {', '.join(derived)} from their index (or the depth), "
                "which a removal changes, so each candidate must run its blocks renumbered")
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(8, device=input_device(model)).unsqueeze(0) % vocab
    try:
        with torch.inference_mode():
            inputs = capture(model, ids)
            if inputs.tail is None:
                return f"{type(model).__name__} changes the last block's output before its final norm"
            hidden = run_blocks(blocks.get_blocks(model), range(len(inputs.args)), inputs.hidden, inputs)
            dense = window_nll_sums(model, ids)
            ours = tail_nll_sums(model, hidden, inputs, ids)
    except Exception as error:  # an architecture whose forward cannot be split at its blocks
        return f"splitting {type(model).__name__} at its blocks failed ({first_line(error, 160)})"
    if not torch.allclose(ours.to(dense.device), dense, rtol=1e-3, atol=1e-3):
        return f"{type(model).__name__}'s loss computed block by block differs from its own forward"
    return None


class _Stopped(Exception):
    pass


@dataclass
class Observation:
    """What one forward showed: each watched module's output (first tensor) and its call's inputs,
    and the order in which the watched modules finished."""

    outputs: dict
    inputs: dict
    finished: list


def observe(model, input_ids: torch.Tensor, watched: dict, stop_after: Optional[nn.Module] = None,
            replace: Optional[dict] = None, keep_inputs: bool = False) -> Observation:
    """One forward of the model as it is, with hooks on `watched` ({name: module}); it stops as soon as
    `stop_after` has run, so nothing after it is computed. `replace` ({name: function}) hands the rest
    of the model function(output) in place of that module's output (for checks that perturb it)."""
    return _observing(lambda: model(input_ids=input_ids, use_cache=False), watched, stop_after, replace,
                      keep_inputs)[1]


def observe_call(module: nn.Module, args: tuple, kwargs: dict, watched: dict, replace: Optional[dict] = None,
                 keep_inputs: bool = False):
    """`module(*args, **kwargs)` (a block on inputs captured earlier) watched as `observe` watches a
    forward; returns (the call's output, the Observation)."""
    result, seen = _observing(lambda: module(*args, **kwargs), watched, None, replace, keep_inputs)
    return output_of(result), seen


def _observing(run, watched: dict, stop_after, replace, keep_inputs: bool):
    outputs, inputs, finished = {}, {}, []
    replace = replace or {}

    def watch(name):
        def before(module, args, kwargs):
            if keep_inputs:
                inputs[name] = (args, kwargs)

        def after(module, args, kwargs, out):
            outputs[name] = output_of(out)
            finished.append(name)
            if name in replace:
                changed = replace[name](outputs[name])
                return (changed, *out[1:]) if isinstance(out, tuple) else changed
        return before, after

    def stop(module, args, out):
        raise _Stopped

    handles = []
    for name, module in watched.items():
        before, after = watch(name)
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    result = None
    try:
        result = run()
    except _Stopped:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return result, Observation(outputs, inputs, finished)


@dataclass
class BlockOutputs:
    """Each block's output in one forward, kept small: output @ projection (a fixed (hidden x k) matrix),
    and the form a block returns (a tuple of this length, or None for a bare tensor)."""

    fingerprints: dict
    tuple_length: Optional[int] = None


@contextlib.contextmanager
def block_outputs(block_list, projection: torch.Tensor):
    """Within the block, every forward through `block_list` records each block's output fingerprint."""
    seen = BlockOutputs({})

    def hook(index):
        def keep(module, args, out):
            if isinstance(out, tuple):
                seen.tuple_length = len(out)
            hidden = output_of(out)
            if isinstance(hidden, torch.Tensor) and hidden.shape[-1] == len(projection):
                seen.fingerprints[index] = (hidden.float() @ projection.to(hidden.device)).cpu()
        return keep

    handles = [block.register_forward_hook(hook(index)) for index, block in enumerate(block_list)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def pass_over(block: nn.Module, tuple_length: Optional[int]) -> None:
    """The block hands its input on unchanged, in the form its class returns (the model's own loop still
    calls it and reads its attributes): a removed block, as the fast engine scores it."""
    def passed(*args, **kwargs):
        hidden = hidden_of(args, kwargs)
        return hidden if tuple_length is None else (hidden,) + (None,) * (tuple_length - 1)
    block.forward = passed
