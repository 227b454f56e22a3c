"""What a search minimises over the calibration windows: the paper's cross-entropy, or KL to the dense model.

Both are sums over windows of a per-window term, mean over its predicted positions x seqlen, so the
numbers of either objective read on the same scale as the paper's loss:

- `ce` (the paper's metric 3): next-token cross-entropy against the calibration text.
- `kl` (EvoPress's fitness): KL(p_dense || p_candidate) of the next-token distributions. The dense
  distributions are computed in one pass before the search and kept within a memory budget: the whole
  vocabulary where it fits, else the top K log-probabilities of every position with the remaining mass
  as one bucket, which is the exact KL of the two distributions coarsened to those K tokens plus one
  (EvoPress's authors find K >= 512 about as good as the full vocabulary).

The cross-entropy is what the engines compute by default, exactly as the paper's code does (`build`
returns None for it). Another objective hands them `chunk_sums(logits, rows, start, stop)`: per window,
the sum of its per-position terms for positions start..stop-1 of windows `rows` (float32 logits of
those positions), so the fast engine's head applies it chunk by chunk, as it applies the cross-entropy;
prefix reuse and every other exact trick of the fast engine are untouched. The dense distributions are
kept in CPU memory (as EvoPress keeps them), a chunk moved to the logits' device when it is needed.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sleb import memory
from sleb.errors import UsageError
from sleb.models import input_device

OBJECTIVES = ("ce", "kl")
DEFAULT_TOP_K = 512
AUTO_SHARE = 0.25  # of the machine's memory, when no budget is given


@dataclass
class _Dense:
    """The dense model's next-token log-probabilities: all of them (`top` None) or the top K with the rest."""

    log_probs: torch.Tensor  # (windows, seqlen - 1, vocab), or (windows, seqlen - 1, K) for the top K
    top: Optional[torch.Tensor] = None  # (windows, seqlen - 1, K) token ids of the kept log-probabilities
    rest: Optional[torch.Tensor] = None  # (windows, seqlen - 1) log of the mass outside them


class KLToDense:
    """Mean KL(p_dense || p_candidate) per predicted token; see the module docstring."""

    name = "kl"

    def __init__(self, model, windows: torch.Tensor, top_k: int = DEFAULT_TOP_K, budget_gb: float = 0.0,
                 batch_size: int = 4, progress: bool = True):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise UsageError(f"--kl_top_k must be a positive number of tokens, got {top_k!r}")
        vocab = model.get_output_embeddings().weight.shape[0]
        positions = len(windows) * (windows.shape[1] - 1)
        budget = budget_gb * 2**30 if budget_gb > 0 else AUTO_SHARE * memory.total_bytes()
        full = positions * vocab * 4
        self.top_k = None if full <= budget else min(top_k, vocab - 1)
        needed = full if self.top_k is None else positions * (self.top_k * (4 + 8) + 4)
        if needed > budget:
            raise UsageError(f"the dense distributions need {needed / 2**30:.3g} GiB even at top {self.top_k} "
                             f"({positions} positions), over the budget of {budget / 2**30:.3g} GiB; raise --kl_gb "
                             "or lower --kl_top_k or --nsamples")
        self.bytes = needed
        self.vocab = vocab
        self.windows = windows
        self.dense = self._dense(model, windows, batch_size, progress)

    def _dense(self, model, windows, batch_size, progress) -> _Dense:
        chunks, tops, rests = [], [], []
        for _, logits in _next_token_logits(model, windows, batch_size, "dense distributions", progress):
            log_p = F.log_softmax(logits, dim=-1)
            if self.top_k is None:
                chunks.append(log_p.cpu())
                continue
            values, indices = log_p.topk(self.top_k, dim=-1)
            chunks.append(values.cpu())
            tops.append(indices.cpu())
            rests.append(_log_rest(values).cpu())
        if self.top_k is None:
            return _Dense(torch.cat(chunks))
        return _Dense(torch.cat(chunks), torch.cat(tops), torch.cat(rests))

    def chunk_sums(self, logits: torch.Tensor, rows, start: int, stop: int) -> torch.Tensor:
        log_q = F.log_softmax(logits, dim=-1)
        log_p = self.dense.log_probs[rows, start:stop].to(logits.device)
        if self.dense.top is None:
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        else:
            log_q_top = log_q.gather(-1, self.dense.top[rows, start:stop].to(logits.device))
            rest_p = self.dense.rest[rows, start:stop].to(logits.device)
            kl = (log_p.exp() * (log_p - log_q_top)).sum(dim=-1) + rest_p.exp() * (rest_p - _log_rest(log_q_top))
        return kl.clamp_min(0).sum(dim=1)

    def mean_kl(self, model, batch_size: int = 1, desc: str = "KL to dense", progress: bool = True) -> float:
        """The mean over predicted tokens of KL(p_dense || p_model) on the windows the dense distributions
        were taken on, in nats per token: how far `model` (pruned, compensated, healed) moved from them."""
        total = 0.0
        for start, logits in _next_token_logits(model, self.windows, batch_size, desc, progress):
            rows = list(range(start, start + len(logits)))
            total += float(self.chunk_sums(logits, rows, 0, logits.shape[1]).double().sum())
        return total / (len(self.windows) * (self.windows.shape[1] - 1))

    def record(self) -> dict:
        return {"objective": "kl", "kl_vocabulary": "full" if self.top_k is None else f"top {self.top_k} + rest",
                "kl_memory_mb": round(self.bytes / 2**20, 1)}


def _next_token_logits(model, windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    """(first row, float32 logits of every predicted position) per batch of windows, the model as it stands."""
    from tqdm import tqdm

    device = input_device(model)
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=not progress):
            ids = windows[start:start + batch_size].to(device)
            yield start, model(input_ids=ids, use_cache=False).logits[:, :-1].float()


def _log_rest(log_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_top))) over the last dimension, never below the float32 floor."""
    kept = torch.logsumexp(log_top, dim=-1)
    return torch.log(-torch.expm1(kept.clamp_max(-1e-7)))  # log(1 - e^kept), stable near kept = 0


def build(name: str, model, windows: torch.Tensor, top_k: int = DEFAULT_TOP_K, budget_gb: float = 0.0,
          batch_size: int = 4, progress: bool = True):
    """The objective named `name` for these calibration windows: None for the paper's cross-entropy (the
    engines' own computation), else an object with chunk_sums."""
    check(name, top_k, budget_gb)
    if name == "ce":
        return None
    return KLToDense(model, windows, top_k, budget_gb, batch_size, progress)


def check(name: str, top_k: int, budget_gb: float) -> None:
    """The objective's flags, before any model loads."""
    if name not in OBJECTIVES:
        raise UsageError(f"unknown --objective {name!r}; use ce (the paper's loss) or kl (KL to the dense model)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--kl_top_k must be a positive number of tokens, got {top_k!r}")
    if not math.isfinite(budget_gb) or budget_gb < 0:
        raise UsageError(f"--kl_gb must be >= 0 (0: a quarter of the free memory), got {budget_gb!r}")
