"""Running a model up to its LM head, whole or block by block. The only module that hooks a model.

The model's own forward computes masks, position embeddings and everything else a block is given;
`capture` records those arguments for every block once (they depend on shapes and positions, not on
hidden states), so a block can later be called on any hidden state exactly as the model would call
it, including after other blocks were skipped. Callers hand over the block modules they run, so an
engine keeps running its own blocks even if the model's list is changed elsewhere. The head (final
norm, LM head, Gemma's soft-capping) is applied in chunks of positions with the loss in float32, so
full float32 logits for a large vocabulary (150k x batch x 2048) never exist at once.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sleb import blocks
from sleb.errors import check_finite
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


def nll_sums_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per window: sum of next-token NLL over positions 0..T-2, float32, head applied in chunks."""
    vocab = model.get_output_embeddings().weight.shape[0]
    batch, length = input_ids.shape
    chunk = max(1, LOGITS_PER_CHUNK // (vocab * batch))
    total = None
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        logits = head_logits(model, hidden[:, start:stop])
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


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call and passes the hidden state through."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, args, kwargs))
        return hidden_states


class _Injector(nn.Module):
    """Stands in for the whole block stack: ignores its input and returns a given hidden state."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


def _with_blocks(model, replacement, input_ids):
    """The head's input when the model runs with its block list replaced by `replacement`."""
    parent, attribute = blocks.block_owner(model)
    original = getattr(parent, attribute)
    config = model.config
    depth = config.num_hidden_layers
    setattr(parent, attribute, nn.ModuleList(replacement))
    try:
        config.num_hidden_layers = min(len(replacement), depth)
        return _run_to_head(model, input_ids)
    finally:
        setattr(parent, attribute, original)
        config.num_hidden_layers = depth


def capture(model, input_ids: torch.Tensor) -> BlockInputs:
    """What the model hands each of its blocks for these token ids."""
    sink = []
    depth = blocks.num_blocks(model)
    _with_blocks(model, [_Recorder(sink) for _ in range(depth)], input_ids)
    if len(sink) != depth:
        raise RuntimeError(f"expected {depth} block calls, saw {len(sink)}")
    return BlockInputs(sink[0][0], [args for _, args, _ in sink], [kwargs for _, _, kwargs in sink])


def run_blocks(block_list, indices, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """Run blocks `indices` (positions in `block_list`, which `inputs` was captured for) in order."""
    for index in indices:
        out = block_list[index](hidden, *inputs.args[index], **inputs.kwargs[index])
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def tail_nll_sums(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per window: next-token NLL sum (float32) of the model's final norm + head applied to `hidden`."""
    return nll_sums_from_hidden(model, _with_blocks(model, [_Injector(hidden)], input_ids), input_ids)
