"""Perplexity: exp(mean next-token NLL over all windows), batched, with the loss in float32."""

import math

import torch
from tqdm import tqdm

from sleb.errors import check_finite
from sleb.forward import window_nll_sums
from sleb.models import input_device, use_cache


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity",
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over all windows; `windows` is (n, seqlen) token ids."""
    device = input_device(model)
    total = 0.0
    with torch.inference_mode(), use_cache(model, False):
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            total += window_nll_sums(model, batch).double().sum().item()
    value = math.exp(total / (len(windows) * (windows.shape[1] - 1))) if math.isfinite(total) else total
    check_finite(value, f"the {desc}", model)
    return value
