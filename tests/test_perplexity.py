"""Perplexity equals a naive reference: one full forward per window, batch 1, CrossEntropyLoss."""

import math

import pytest
import torch

from sleb import data
from sleb.models import load_model
from sleb.ppl import perplexity


def naive_perplexity(model, windows):
    nll = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(window.unsqueeze(0)).logits
            loss = torch.nn.CrossEntropyLoss()(logits[0, :-1].float(), window[1:])
            nll += loss.item() * window.numel()  # the paper's bookkeeping: mean x seqlen
    return math.exp(nll / windows.numel())


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3", "gpt2"])
def test_perplexity_matches_naive_reference(arch, model_dirs, text_file):
    model, tokenizer = load_model(model_dirs[arch], device="cpu")
    windows = data.load_eval_windows(f"file:{text_file}", tokenizer, seqlen=64)
    assert windows.shape[1] == 64 and len(windows) > 3
    expected = naive_perplexity(model, windows)
    for batch_size in (1, 3):
        assert perplexity(model, windows, batch_size) == pytest.approx(expected, rel=1e-5)


def test_head_is_applied_in_chunks(model_dirs, text_file, monkeypatch):
    from sleb import forward

    model, tokenizer = load_model(model_dirs["llama"], device="cpu")
    windows = data.load_eval_windows(f"file:{text_file}", tokenizer, seqlen=64)
    whole = perplexity(model, windows, 2)
    monkeypatch.setattr(forward, "LOGITS_PER_CHUNK", model.config.vocab_size * 2 * 5)  # 5 positions
    assert perplexity(model, windows, 2) == pytest.approx(whole, rel=1e-6)


def test_windows_drop_the_remainder_and_calibration_is_seeded(model_dirs, text_file):
    _, tokenizer = load_model(model_dirs["llama"], device="cpu")
    with open(text_file) as handle:
        lines = handle.read().split("\n")
    ids = tokenizer("\n\n".join(lines), return_tensors="pt").input_ids[0]
    windows = data.load_eval_windows(f"file:{text_file}", tokenizer, seqlen=50)
    assert len(windows) == ids.numel() // 50
    assert torch.equal(windows.flatten(), ids[: len(windows) * 50])

    from datasets import Dataset

    rows = Dataset.from_dict({"text": lines}).shuffle(seed=3)[:20]["text"]
    expected = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    calibration = data.load_calibration_windows(f"file:{text_file}", tokenizer, nsamples=20, seed=3, seqlen=16)
    assert torch.equal(calibration.flatten(), expected[: len(calibration) * 16])
    other = data.load_calibration_windows(f"file:{text_file}", tokenizer, nsamples=20, seed=4, seqlen=16)
    assert not torch.equal(other[:1], calibration[:1])
