"""Block discovery, removal and skipping on every supported architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from sleb import blocks
from sleb.errors import UsageError
from sleb.models import load_model


def _ids(tokenizer, length=40):
    return tokenizer(tiny.sample_text(20, seed=3), return_tensors="pt").input_ids[:, :length]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_blocks_found_removed_and_skipped(arch, model_dirs, tmp_path):
    model, tokenizer = load_model(model_dirs[arch], device="cpu")
    found = blocks.get_blocks(model)
    assert len(found) == 6 and len({type(b) for b in found}) == 1
    ids = _ids(tokenizer)
    removal = [4, 1]
    with torch.inference_mode():
        dense = model(ids).logits
        with blocks.skipping(model, removal):
            skipped = model(ids).logits
        assert blocks.num_blocks(model) == 6  # whole again after skipping
        torch.testing.assert_close(model(ids).logits, dense)
        blocks.remove_blocks(model, removal)
        deleted = model(ids).logits
    assert not torch.allclose(skipped, dense)
    torch.testing.assert_close(deleted, skipped)
    assert model.config.num_hidden_layers == 4
    for position, block in enumerate(blocks.get_blocks(model)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                assert module.layer_idx == position

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, deleted)
        # Generation with the KV cache on the reloaded checkpoint equals greedy decoding by hand.
        prompt = ids[:, :8]
        generated = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                                      pad_token_id=0)
        manual = prompt
        for _ in range(6):
            next_id = reloaded(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, next_id], dim=1)
    assert torch.equal(generated, manual)


def test_per_layer_config_lists_are_trimmed(model_dirs):
    model, _ = load_model(model_dirs["gemma3"], device="cpu")
    layer_types = list(model.config.layer_types)
    assert "full_attention" in layer_types and "sliding_attention" in layer_types
    blocks.remove_blocks(model, [0, 2])
    assert list(model.config.layer_types) == [layer_types[i] for i in (1, 3, 4, 5)]


def test_generic_fallback_finds_blocks(model_dirs, monkeypatch):
    model, _ = load_model(model_dirs["llama"], device="cpu")
    monkeypatch.setattr(blocks, "BLOCK_PATHS", {})
    assert blocks.get_blocks(model) is model.model.layers


@pytest.mark.parametrize("bad, message", [
    ([6], "index 6"), ([-1], "index -1"), ([1, 1], "twice"), (list(range(6)), "all 6"), (["a"], "list of block"),
])
def test_bad_removal_lists(bad, message, model_dirs):
    model, _ = load_model(model_dirs["llama"], device="cpu")
    with pytest.raises(UsageError, match=message):
        blocks.remove_blocks(model, bad)
