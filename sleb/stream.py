"""Running a model block by block: capture what enters the blocks once, then call blocks directly.

The model's own forward computes masks, position embeddings and everything else a block is given;
`capture` records those arguments for every block (they depend on shapes and positions, not on
hidden states), so a block can later be called on any hidden state exactly as the model would call
it, including after other blocks were skipped. `tail_nll_sums` finishes a forward from a hidden
state with the model's own final norm and head.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from sleb import blocks
from sleb.perplexity import _Captured, _capture, nll_sums_from_hidden


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
    """Run the model with its block list replaced; stop before the LM head; return the head's input."""
    parent, attribute = blocks.block_owner(model)
    original = getattr(parent, attribute)
    config = model.config
    depth = config.num_hidden_layers
    setattr(parent, attribute, nn.ModuleList(replacement))
    handle = model.get_output_embeddings().register_forward_pre_hook(_capture, with_kwargs=True)
    try:
        config.num_hidden_layers = len(replacement) if len(replacement) < depth else depth
        model(input_ids=input_ids, use_cache=False)
    except _Captured as captured:
        return captured.hidden
    finally:
        handle.remove()
        setattr(parent, attribute, original)
        config.num_hidden_layers = depth
    raise RuntimeError(f"{type(model).__name__} never called its output embeddings")


def capture(model, input_ids: torch.Tensor) -> BlockInputs:
    sink = []
    depth = blocks.num_blocks(model)
    _with_blocks(model, [_Recorder(sink) for _ in range(depth)], input_ids)
    if len(sink) != depth:
        raise RuntimeError(f"expected {depth} block calls, saw {len(sink)}")
    return BlockInputs(sink[0][0], [args for _, args, _ in sink], [kwargs for _, _, kwargs in sink])


def run_block(model, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    out = blocks.get_blocks(model)[index](hidden, *inputs.args[index], **inputs.kwargs[index])
    return out[0] if isinstance(out, tuple) else out


def run_blocks(model, indices, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    for index in indices:
        hidden = run_block(model, index, hidden, inputs)
    return hidden


def tail_nll_sums(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per window: next-token NLL sum (float32) of the model's final norm + head applied to `hidden`."""
    return nll_sums_from_hidden(model, _with_blocks(model, [_Injector(hidden)], input_ids), input_ids)
