"""Zero-shot accuracy through the released lm-eval, on the offline demo tasks."""

import json

import pytest
import torch

from clitools import invoke
from sleb import accuracy, blocks
from sleb.models import load_model


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context): the tokenizer's own special tokens, the pair encoded as
    one string and split after the context's tokens."""
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_lm_eval_scores_the_pruned_model():
    # The demo model's own BPE tokenizer gives every choice distinct tokens (a word-level test tokenizer
    # would map them all to <unk> and make every choice tie).
    model, tokenizer = load_model("demo", device="cpu")
    blocks.remove_blocks(model, [4, 1])
    names = ["demo_cloze"]
    result = accuracy.evaluate_zeroshot(model, tokenizer, accuracy.find_tasks(names), limit=20, log_samples=True)
    samples = result["samples"]["demo_cloze"]
    assert len(samples) == 20
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        ours = [own_loglikelihood(model, tokenizer, doc["context"], " " + choice) for choice in doc["choices"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert len(set(round(value, 3) for value in ours)) == len(ours)  # the choices do not tie
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-3)
        correct += int(max(range(len(ours)), key=lambda i: (ours[i], -i)) == doc["label"])
    assert result["tasks"]["demo_cloze"]["acc"] == pytest.approx(correct / 20)
    assert result["mean"]["acc"] == result["tasks"]["demo_cloze"]["acc"]


def test_eval_cli_reports_zeroshot(model_dirs, tmp_path):
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[2]", "--eval_ppl", "False",
              "--eval_zeroshot", "True", "--tasks", "demo_cloze,demo_order", "--limit", "20",
              "--result_folder", str(tmp_path), "--result_file", "z.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "z.json").read_text())
    for task in ("demo_cloze", "demo_order"):
        acc = result["zeroshot"]["tasks"][task]["acc"]
        assert 0 <= acc <= 1 and f"{100 * acc:.2f}" in out.stdout
    assert "samples" not in result["zeroshot"]
