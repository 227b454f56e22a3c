"""Perplexity: exp(mean next-token NLL over all windows), batched, with the loss in float32.

The LM head is applied to a few hundred positions at a time, so full float32 logits for a large
vocabulary (150k x batch x 2048) never exist at once.
"""

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sleb.models import input_device

# Positions per head chunk: about 2**26 float32 logits (256 MB) at a time.
_LOGITS_PER_CHUNK = 2**26


class _Captured(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def _capture(module, args, kwargs):
    raise _Captured(args[0] if args else next(iter(kwargs.values())))


def final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states the LM head would see (after the final norm), without computing logits."""
    handle = model.get_output_embeddings().register_forward_pre_hook(_capture, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured as captured:
        return captured.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__} never called its output embeddings")


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma 2/3 squash logits in their CausalLM forward, after the head
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def head_matches_forward(model) -> bool:
    """True when final_hidden_states + logits_from_hidden reproduce model(...).logits.

    Checked once per model on a short input; architectures that post-process logits in some other
    way fall back to the model's own full logits.
    """
    cached = getattr(model, "_sleb_head_matches", None)
    if cached is not None:
        return cached
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(8, device=input_device(model)).unsqueeze(0) % vocab
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits.float()
        ours = logits_from_hidden(model, final_hidden_states(model, ids))
    scale = reference.abs().max().clamp_min(1.0)
    matches = bool(torch.allclose(ours.to(reference.device), reference, atol=1e-3 * float(scale), rtol=1e-3))
    model._sleb_head_matches = matches
    return matches


def nll_sums_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per window: sum of next-token NLL over positions 0..T-2, float32, head applied in chunks."""
    vocab = model.get_output_embeddings().weight.shape[0]
    batch, length = input_ids.shape
    chunk = max(1, _LOGITS_PER_CHUNK // (vocab * batch))
    total = None
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        logits = logits_from_hidden(model, hidden[:, start:stop])
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


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows; `windows` is (n, seqlen) token ids."""
    device = input_device(model)
    use_cache = model.config.use_cache
    model.config.use_cache = False
    total = 0.0
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
                batch = windows[start : start + batch_size].to(device)
                total += window_nll_sums(model, batch).double().sum().item()
    finally:
        model.config.use_cache = use_cache
    return math.exp(total / (len(windows) * (windows.shape[1] - 1)))
