"""Issue 29: the saved model computes what was scored. Config fields that families read at run time are
changed after removal, as a wrong layout rule would change them, and the save must refuse in one line;
weights changed after removal must pass; every failure of the guard is one line; a resumed run must
recognise the weights themselves; the hybrid-kind constraint binds only where the model needs it.

The plants use only the public API, so each test also runs on the code before the issue (where the
plants saved without a word)."""

import json
import os
import shutil

import pytest
import torch
import transformers as t
from transformers import AutoModelForCausalLM

import sleb
import tiny
from clitools import invoke, run

COMMON = dict(vocab_size=tiny.VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _config(kind: str):
    if kind == "llama4":  # chunked attention, full attention in every 4th block (block 3)
        return tiny.make_config("llama4")
    if kind == "mistral":  # one model-wide sliding window
        return t.MistralConfig(sliding_window=16, **SMALL, **COMMON)
    if kind == "qwen2_moe":  # its own rule: the even blocks below max_window_layers slide, the rest attend fully
        return t.Qwen2MoeConfig(moe_intermediate_size=16, num_experts_per_tok=2, num_experts=4,
                                shared_expert_intermediate_size=32, use_sliding_window=True, sliding_window=8,
                                max_window_layers=3, **SMALL, **COMMON)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_time_fields")
    built = {}

    def get(kind: str) -> str:
        if kind not in built:
            config = _config(kind)
            config.initializer_range = 0.2
            torch.manual_seed(0)
            path = root / kind
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            tiny.make_tokenizer().save_pretrained(path)
            built[kind] = str(path)
        return built[kind]
    return get


def _swap_chunked_and_full(config):
    kinds = list(config.layer_types)
    full, chunked = kinds.index("full_attention"), kinds.index("chunked_attention")
    kinds[full], kinds[chunked] = kinds[chunked], kinds[full]
    config.layer_types = kinds


def _one_full_block_to_sliding(config):
    kinds = list(config.layer_types)
    assert "sliding_attention" in kinds and "full_attention" in kinds
    kinds[kinds.index("full_attention")] = "sliding_attention"
    config.layer_types = kinds


def _narrower_window(config):
    config.sliding_window = 4


def _shorter_chunk(config):
    assert config.attention_chunk_size == 16
    config.attention_chunk_size = 4


# (model, what is changed after removal, a field the refusal must name)
PLANTS = {"mask kind per block (Llama 4 chunked/full swapped)": ("llama4", _swap_chunked_and_full, "layer_types"),
          "mask kind per block (Qwen2-MoE full -> sliding)": ("qwen2_moe", _one_full_block_to_sliding, "layer_types"),
          "model-wide window (Mistral)": ("mistral", _narrower_window, "sliding_window"),
          "attention chunk (Llama 4)": ("llama4", _shorter_chunk, "attention_chunk_size")}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_config_field_read_at_run_time_changed_after_removal_is_refused(plant, saved, tmp_path):
    kind, change, field = PLANTS[plant]
    model, tokenizer = sleb.load(saved(kind), device="cpu")
    sleb.remove_blocks(model, [1])
    ids = torch.arange(2, 60).unsqueeze(0) % tiny.VOCAB
    with torch.inference_mode():
        scored = model(ids, use_cache=False).logits
    change(model.config)
    with torch.inference_mode():  # the plant matters: the model these fields describe computes otherwise
        assert (model(ids, use_cache=False).logits - scored).abs().max() > 1e-3
    with pytest.raises(sleb.UsageError) as raised:
        sleb.save_pretrained(model, tokenizer, str(tmp_path / "out"))
    message = str(raised.value)
    assert "\n" not in message and "not saved" in message and field in message, message
    assert "block" in message and "differs" in message, message
    assert os.listdir(tmp_path) == []  # nothing written, no partial directory


def test_weights_changed_after_removal_pass_and_reload_as_they_are(saved, tmp_path):
    """A user's edit after removal (as compensation or a merged LoRA changes weights) is legitimate: both
    rebuilds hold the current tensors."""
    model, tokenizer = sleb.load(saved("mistral"), device="cpu")
    sleb.remove_blocks(model, [2])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    ids = torch.arange(2, 60).unsqueeze(0) % tiny.VOCAB
    with torch.inference_mode():
        expected = model(ids, use_cache=False).logits
    assert sleb.save_pretrained(model, tokenizer, str(tmp_path / "out")) == []
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, expected)


def test_a_field_changed_since_load_that_outputs_do_not_show_is_a_warning_in_results_and_card(model_dirs, tmp_path):
    from sleb import stages
    from sleb.model_card import pruned_card

    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, [1, 4])
    model.config.initializer_range = 0.5  # read only when weights are initialised, never by the forward
    record = {"command": "eval", "settings": {"model_name": model_dirs["llama"]}, "removal_list": [1, 4],
              "num_blocks": 6}
    path = str(tmp_path / "r.json")
    stages.save_checkpoint(model, tokenizer, str(tmp_path / "out"), record, path, pruned_card)
    (line,) = json.loads(open(path).read())["config_warnings"]
    assert "initializer_range (0.2 -> 0.5)" in line and "num_hidden_layers" not in line
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Config changed since load" in card and "initializer_range" in card


def test_a_saved_config_transformers_refuses_to_read_is_one_line(family_dirs, tmp_path):
    """Gemma 4's per-layer overrides are validated when the config is read: an override left at an index the
    pruned model no longer has (as the code before this issue left every per_layer_config key) is one line."""
    model, tokenizer = sleb.load(family_dirs["gemma4"], device="cpu")
    sleb.remove_blocks(model, [4])
    model.config.__dict__["_heterogeneity_spec"].per_layer_overrides[5] = {"head_dim": 16}  # past the setter's check
    with pytest.raises(sleb.UsageError) as raised:
        sleb.save_pretrained(model, tokenizer, str(tmp_path / "out"))
    assert "\n" not in str(raised.value) and "per_layer_config" in str(raised.value)
    assert os.listdir(tmp_path) == []


def test_per_layer_overrides_follow_their_blocks(family_dirs):
    model, _ = sleb.load(family_dirs["gemma4"], device="cpu")
    with sleb.skipping(model, [4]):
        assert model.config.__dict__["_heterogeneity_spec"].per_layer_overrides == {2: {"head_dim": 16},
                                                                                     4: {"head_dim": 16}}
    assert model.config.__dict__["_heterogeneity_spec"].per_layer_overrides == {2: {"head_dim": 16},
                                                                                 5: {"head_dim": 16}}


@pytest.mark.parametrize("arch", sorted(tiny.REFUSED_FAMILIES))
def test_families_sleb_cannot_prune_are_one_line_before_any_search(arch, family_dirs, text_file, tmp_path):
    for command, flags in (("eval", ["--removal_list", "[2, 4]", "--ppl_datasets", f"file:{text_file}",
                                     "--seqlen", "32"]),
                           ("sleb", ["--dataset", f"file:{text_file}", "--nsamples", "60", "--seqlen", "32",
                                     "--num_remove_blocks", "2", "--eval_ppl", "False"])):
        out = invoke(command, "--model_name", family_dirs[arch], *flags, "--result_folder", str(tmp_path / command))
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and "phase 1" not in out.stderr + out.stdout
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot remove blocks of") and tiny.REFUSED_FAMILIES[arch] in last, last
        assert not (tmp_path / command).exists() or not [p for p in (tmp_path / command).iterdir()
                                                        if not p.name.startswith(".")]


def test_rederive_leaves_a_block_whose_rebuild_has_other_shapes():
    """A block class whose width follows its index: rebuilt at another position it has other tensors, so
    it is not the same block there, and none of its settings may be copied from that rebuild."""
    from sleb import blocks

    class Widening(torch.nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4 + layer_idx)
            self.scale = 1.0 / (layer_idx + 1)

    config = tiny.make_config("llama")
    block = Widening(config, 3)
    assert blocks.rederive([block], config) == [] and block.scale == 0.25


def _search_args(model_dir, data, folder):
    return ["--model_name", str(model_dir), "--dataset", f"file:{data}", "--nsamples", "60", "--seqlen", "32",
            "--num_remove_blocks", "3", "--eval_ppl", "False", "--result_folder", str(folder), "--result_file", "r.json"]


def test_resume_over_rewritten_weights_of_the_same_size_is_refused(model_dirs, text_file, tmp_path):
    """The model directory overwritten with other weights: same names, shapes and file size."""
    model_dir = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], model_dir)
    first = invoke("sleb", *_search_args(model_dir, text_file, tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / "r.json").read_text())
    record["search"]["status"] = "searching"
    for name in ("removal_list", "losses", "lower_bounds", "phase_seconds"):
        record["search"][name] = record["search"][name][:1]
    (tmp_path / "r.json").write_text(json.dumps(record))
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    other = tmp_path / "other"
    tiny.make_model_dir(other, "llama", seed=1)
    shutil.copy(other / "model.safetensors", weights)
    assert weights.stat().st_size == size
    out = run("sleb", *_search_args(model_dir, text_file, tmp_path), "--resume", "True")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert "cannot resume" in out.stderr and "weight files" in out.stderr


def test_api_resume_refuses_what_the_command_refuses(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=60, seqlen=32, model=model)
    oneshot = sleb.search(model, windows, num_remove_blocks=2, metric="sleb_oneshot", progress=False)
    oneshot.status, oneshot.removal_list = "searching", []
    with pytest.raises(sleb.UsageError, match="scores every block in one pass"):
        sleb.search(model, windows, num_remove_blocks=2, metric="sleb_oneshot", resume=oneshot, progress=False)
    found = sleb.search(model, windows, num_remove_blocks=1, metric="sleb_compensated", progress=False)
    with pytest.raises(sleb.UsageError, match="folds maps into the model"):
        sleb.search(model, windows, num_remove_blocks=1, metric="sleb_compensated", resume=found, progress=False)


@pytest.mark.parametrize("change", ["another removal list", "compensation"])
def test_heal_resume_refuses_another_removal_or_compensation(change, model_dirs, text_file, tmp_path):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, [2])
    texts = open(text_file).read().splitlines()
    settings = dict(nsamples=100, seqlen=32, max_steps=4, save_steps=2, warmup_steps=0, train_batch_size=4,
                    grad_accum=1, logging_steps=2, work_dir=str(tmp_path / "work"))
    sleb.heal(model, tokenizer, texts, **settings)
    again, _ = sleb.load(model_dirs["llama"], device="cpu")
    if change == "another removal list":  # one block of the same kind: the same config, other weights
        sleb.remove_blocks(again, [3])
    else:
        windows = sleb.calibration_windows(tokenizer, texts, nsamples=100, seqlen=32, model=again)
        sleb.compensate(again, windows, [2], progress=False)
    with pytest.raises(sleb.UsageError, match="cannot resume"):
        sleb.heal(again, tokenizer, texts, **settings, resume_from=str(tmp_path / "work" / "checkpoint-4"))


def test_block_kinds_bind_only_where_the_model_needs_them(family_dirs, tmp_path):
    """Llama 4's chunked and full attention blocks are both attention: the default search returns the paper's
    list, which takes the one full block, and that checkpoint generates the same with and without its cache.
    Nemotron-H still keeps an attention block (test_guard)."""
    model, tokenizer = sleb.load(family_dirs["llama4"], device="cpu")
    windows = tokenizer(tiny.sample_text(80, seed=0), return_tensors="pt").input_ids[:, :256].view(4, 64)
    free = sleb.search(model, windows, 3, progress=False, keep_block_kinds=False).removal_list
    full = model.config.layer_types.index("full_attention")
    assert full in free
    assert sleb.search(model, windows, 3, progress=False).removal_list == free
    sleb.remove_blocks(model, free)
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert tiny.generates_alike_with_and_without_cache(reloaded, windows[:1, :8])
