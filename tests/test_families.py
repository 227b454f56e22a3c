"""MoE, hybrid and vision-language decoders: search, removal and a checkpoint that reloads as the same model.

One tiny random model per family, built from its config with the field that ties structure to block
index set (tests/tiny.py), saved and loaded through the real `from_pretrained`.
"""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

import tiny
from clitools import OFFLINE, ROOT, invoke, run
from sleb import blocks, checkpoint, forward, models
from sleb.engines import ReferenceEngine
from sleb.errors import UsageError
from sleb.fast_search import FastEngine
from sleb.search_algorithms import SearchJob, SearchState, sleb_iterative

REMOVAL = [1, 4]  # touches every family's layout: a dense/MoE, attention/Mamba or index-listed block
# Families the fast engine cannot split at their blocks, and the reason it gives.
REFERENCE_ONLY = {"cohere2": "post-processes its logits",  # logit_scale
                  "minimax": "derive num_hidden_layers from their index (or the depth)"}  # decay rates from index and depth


def _windows(tokenizer):
    return tokenizer(tiny.sample_text(60, seed=1), return_tensors="pt").input_ids[:, :256].view(4, 64)


def _search(model, windows, build) -> list:
    job = SearchJob(model, windows, 2, 1, 1, build_engine=build, log=lambda *a: None)
    with models.use_cache(model, False):
        return sleb_iterative(job, SearchState(blocks.num_blocks(model))).removal_list


@pytest.mark.parametrize("arch", tiny.FAMILIES)
def test_search_prune_save_reload(arch, family_dirs, tmp_path):
    model, tokenizer = models.load_model(family_dirs[arch], device="cpu")
    windows = _windows(tokenizer)
    reason = forward.cannot_follow(model)
    reference = _search(model, windows, lambda: ReferenceEngine(model, windows))
    if arch in REFERENCE_ONLY:  # the search says why and runs the reference engine
        assert REFERENCE_ONLY[arch] in reason
    else:  # the fast engine follows the family and finds the reference list
        assert reason is None, reason
        assert _search(model, windows, lambda: FastEngine(model, windows, batch_size=2)) == reference

    ids = windows[:1, :24]
    blocks.remove_blocks(model, REMOVAL)
    with torch.inference_mode():
        pruned_logits = model(input_ids=ids, use_cache=False).logits
    checkpoint.save(model, tokenizer, str(tmp_path / "pruned"))

    # Stock transformers, the same auto class a user would pick: nothing new, nothing unused, same logits.
    reloaded, info = tiny.auto_class(arch).from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded) is type(model)
    reloaded.eval()
    assert blocks.num_blocks(reloaded) == 4
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, pruned_logits)
    assert tiny.generates_alike_with_and_without_cache(reloaded, ids[:, :8])


@pytest.mark.parametrize("arch", ["qwen3_moe", "nemotron_h", "gemma3_vl"])
def test_fast_equals_reference_in_bfloat16(arch, family_dirs):
    """Users load bf16 checkpoints: the near-tie settling keeps the lists equal there too."""
    model, tokenizer = models.load_model(family_dirs[arch], dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    windows = _windows(tokenizer)
    reference = _search(model, windows, lambda: ReferenceEngine(model, windows))
    assert _search(model, windows, lambda: FastEngine(model, windows, batch_size=2)) == reference


def test_layout_fields_rewritten(family_dirs):
    """The explicit forms written for the rules, checked by value (the reload test checks the effect)."""
    expected = {
        "qwen3_moe": {"mlp_only_layers": [0, 2]},  # [0, 3] of [0, 2, 3, 5]
        "qwen2_moe": {"decoder_sparse_step": 1, "mlp_only_layers": [0, 1]},  # sparse 1, 3, 5 -> 3, 5
        "deepseek_v3": {"first_k_dense_replace": 1},
        "glm4_moe": {"first_k_dense_replace": 1},  # block 0 stays the one dense block
        "llama4": {"moe_layers": [2, 3]},  # moe at 1, 3, 5 -> 3, 5
        "lfm2": {"full_attn_idxs": [2]},  # [1, 3] -> 3
        # MoE at 1 and 3 by (i + 1) % 2 == 0 in [1, 4]; 3 stays, as block 2: written as the interval [2, 2]
        "ernie4_5_moe": {"moe_layer_start_index": 2, "moe_layer_end_index": 2, "moe_layer_interval": 1},
        "bamba": {"attn_layer_indices": [2]},  # attention at [1, 3] -> 3
    }
    for arch, fields in expected.items():
        model, _ = models.load_model(family_dirs[arch], device="cpu")
        blocks.remove_blocks(model, REMOVAL)
        for name, value in fields.items():
            assert getattr(model.config, name) == value, (arch, name)
    model, _ = models.load_model(family_dirs["nemotron_h"], device="cpu")
    kinds = list(model.config.layers_block_type)
    with blocks.skipping(model, REMOVAL):
        assert model.config.layers_block_type == [kinds[i] for i in (0, 2, 3, 5)]
        assert model.config.num_hidden_layers == 4
    assert model.config.layers_block_type == kinds  # whole again
    model, _ = models.load_model(family_dirs["smollm3"], device="cpu")
    no_rope = list(model.config.no_rope_layers)
    assert 0 in no_rope  # the rule left a block without RoPE in 6
    blocks.remove_blocks(model, REMOVAL)
    assert model.config.no_rope_layers == [no_rope[i] for i in (0, 2, 3, 5)]


def _inexpressible_jamba(path) -> str:
    """Jamba with MoE in every second block (expert_layer_period 2): removing block 1 leaves MoE blocks at
    positions 2 and 4 of 5, which no period and offset describe."""
    from transformers import AutoModelForCausalLM

    config = tiny.make_config("jamba")
    config.expert_layer_period, config.expert_layer_offset = 2, 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny.make_tokenizer().save_pretrained(path)
    return str(path)


def test_guard_refuses_an_inexpressible_layout(tmp_path):
    model, tokenizer = models.load_model(_inexpressible_jamba(tmp_path / "jamba"), device="cpu")
    blocks.remove_blocks(model, [1])
    with pytest.raises(UsageError, match="expert_layer_period") as raised:
        checkpoint.save(model, tokenizer, str(tmp_path / "out"))
    assert "\n" not in str(raised.value) and "JambaForCausalLM" in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == ["jamba"]  # no checkpoint, no partial directory


def test_eval_cli_keeps_results_when_the_guard_refuses(tmp_path, text_file):
    model_dir = _inexpressible_jamba(tmp_path / "jamba")
    out = run("eval", "--model_name", model_dir, "--removal_list", "[1]", "--ppl_datasets", f"file:{text_file}",
              "--seqlen", "64", "--save_model", str(tmp_path / "out"), "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr  # the perplexity bar comes first, then the one error line
    assert out.stderr.strip().splitlines()[-1].startswith("error: not saved") and "expert_layer_period" in out.stderr
    assert not (tmp_path / "out").exists()
    (result,) = (tmp_path / "results").iterdir()
    assert json.loads(result.read_text())["removal_list"] == [1]


def test_sleb_cli_fast_engine_on_nemotron_h(family_dirs, tmp_path, text_file):
    """Nemotron-H's forward reads `block_type` from every block: the hooks see the real ones."""
    out = invoke("sleb", "--model_name", family_dirs["nemotron_h"], "--dataset", f"file:{text_file}",
              "--nsamples", "64", "--seqlen", "64", "--num_remove_blocks", "2", "--eval_ppl", "False",
              "--result_folder", str(tmp_path), "--save_model", str(tmp_path / "pruned"))
    assert out.returncode == 0, out.stderr
    assert "using the reference engine" not in out.stderr
    (result,) = tmp_path.glob("*.json")
    record = json.loads(result.read_text())
    assert record["search"]["engine"] == "fast" and len(record["removal_list"]) == 2
    check = invoke("eval", "--model_name", str(tmp_path / "pruned"), "--removal_list", "[]", "--eval_ppl", "False",
                   "--result_folder", str(tmp_path / "again"))
    assert check.returncode == 0, check.stderr


def test_finder_refuses_two_candidate_lists(model_dirs, monkeypatch):
    model, _ = models.load_model(model_dirs["llama"], device="cpu")
    model.model.twin = torch.nn.ModuleList(torch.nn.Identity() for _ in range(6))
    monkeypatch.setattr(blocks, "BLOCK_PATHS", {})
    with pytest.raises(UsageError, match="cannot tell which ModuleList") as raised:
        blocks.get_blocks(model)
    assert "model.layers" in str(raised.value) and "model.twin" in str(raised.value)


def test_finder_takes_mixed_classes(family_dirs):
    model, _ = models.load_model(family_dirs["jamba"], device="cpu")
    found = blocks.get_blocks(model)
    assert len({type(block).__name__ for block in found}) == 2 and len(found) == 6


def test_save_under_a_file_is_one_line(model_dirs, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = run("eval", "--model_name", model_dirs["llama"], "--removal_list", "[1]", "--eval_ppl", "False",
              "--save_model", str(tmp_path / "afile" / "pruned"), "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "is a file" in out.stderr and not (tmp_path / "results").exists()


def test_write_error_during_save_is_one_line(model_dirs, tmp_path):
    """A write that fails mid-save (here the file-size limit, standing in for a full disk) is one line
    with nothing half-written; the results file, written first, stays."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write(), as on a full disk, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    out = subprocess.run([sys.executable, "-m", "eval", "--model_name", model_dirs["llama"], "--removal_list", "[1]",
                          "--eval_ppl", "False", "--save_model", str(tmp_path / "pruned"),
                          "--result_folder", str(tmp_path / "results")],
                         cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=300,
                         preexec_fn=limit_file_size)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the checkpoint" in lines[0] and "nothing was written" in lines[0], out.stderr
    assert sorted(os.listdir(tmp_path)) == ["results"]


def _heal(model_dir, text_file, tmp_path, *extra, removal="[1, 4]", runner=invoke):
    return runner("sleb.heal", *extra, "--model_name", model_dir, "--removal_list", removal, "--dataset", f"file:{text_file}",
               "--nsamples", "300", "--seqlen", "32", "--ppl_datasets", f"file:{text_file}", "--eval_seqlen", "32",
               "--lr", "1e-2", "--warmup_steps", "2", "--train_batch_size", "4", "--grad_accum", "1",
               "--max_steps", "12", "--logging_steps", "4", "--output_dir", str(tmp_path / "healed"),
               "--result_folder", str(tmp_path), "--result_file", "h.json")


def test_heal_on_moe_adapts_experts_not_routers(family_dirs, text_file, tmp_path):
    out = _heal(family_dirs["qwen2_moe"], text_file, tmp_path, "--lora_dropout", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["lora_expert_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert {"q_proj", "down_proj", "gate_proj", "up_proj"} <= set(record["lora_targets"])
    assert "gate" not in record["lora_targets"] and "shared_expert_gate" not in record["lora_targets"]
    name = f"file:{text_file}"
    assert record["ppl_healed"][name]["ppl"] < record["ppl_pruned"][name]["ppl"]
    assert "fused expert weights experts.down_proj" in (tmp_path / "healed" / "README.md").read_text()
    healed, info = tiny.auto_class("qwen2_moe").from_pretrained(tmp_path / "healed", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original, _ = models.load_model(family_dirs["qwen2_moe"], device="cpu")
    # The experts moved (LoRA on the fused weights was merged); the routers did not.
    assert not torch.equal(healed.model.layers[2].mlp.experts.gate_up_proj, original.model.layers[3].mlp.experts.gate_up_proj)
    assert torch.equal(healed.model.layers[2].mlp.gate.weight, original.model.layers[3].mlp.gate.weight)


def test_heal_on_a_vision_language_model_leaves_the_vision_tower(family_dirs, text_file, tmp_path):
    out = _heal(family_dirs["gemma3_vl"], text_file, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    healed, info = tiny.auto_class("gemma3_vl").from_pretrained(tmp_path / "healed", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original, _ = models.load_model(family_dirs["gemma3_vl"], device="cpu")
    for (name, theirs), (_, ours) in zip(original.model.vision_tower.named_parameters(),
                                         healed.model.vision_tower.named_parameters()):
        assert torch.equal(theirs, ours), name
    assert torch.equal(original.model.multi_modal_projector.mm_input_projection_weight,
                       healed.model.multi_modal_projector.mm_input_projection_weight)
    assert not torch.equal(original.model.language_model.layers[0].self_attn.q_proj.weight,
                           healed.model.language_model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("arch", tiny.VISION_FAMILIES)
def test_latency_and_zeroshot_on_text_for_vision_language_models(arch, family_dirs, tmp_path):
    out = invoke("latency", "--model_name", family_dirs[arch], "--generation", "True", "--batch_size", "2",
              "--prompt_len", "8", "--new_tokens", "4", "--warmup", "0", "--repeats", "1",
              "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("latency_*.json")
    record = json.loads(result.read_text())
    assert record["pruned"]["new_tokens_generated"] == 4 and record["removal_list"] == [1, 2]
    out = invoke("eval", "--model_name", family_dirs[arch], "--removal_list", "[1]", "--eval_ppl", "False",
                 "--eval_zeroshot", "True", "--tasks", "demo_cloze", "--limit", "8",
                 "--result_folder", str(tmp_path / "zs"))
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = (tmp_path / "zs").glob("*.json")
    accuracy = json.loads(result.read_text())["zeroshot"]["tasks"]["demo_cloze"]["acc"]
    assert 0 <= accuracy <= 1


def test_a_checkpoint_whose_config_missed_the_deletion_is_named_as_such(family_dirs, tmp_path):
    """What the old --save_model wrote for DeepSeek-V3: weights of 5 blocks, a config still saying the first
    two are dense. Loading it names the config, not "not a causal language model"."""
    model, tokenizer = models.load_model(family_dirs["deepseek_v3"], device="cpu")
    blocks.remove_blocks(model, [1])
    checkpoint.save(model, tokenizer, str(tmp_path / "pruned"))
    config_file = tmp_path / "pruned" / "config.json"
    config = json.loads(config_file.read_text())
    config["first_k_dense_replace"] = 2
    config_file.write_text(json.dumps(config))
    out = run("eval", "--model_name", str(tmp_path / "pruned"), "--removal_list", "[]", "--eval_ppl", "False",
              "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "its config describes blocks its weights do not hold" in lines[0], out.stderr
    assert "first_k_dense_replace" in lines[0] and "not a causal" not in lines[0]


def test_heal_refuses_to_save_an_inexpressible_layout(tmp_path, text_file):
    out = _heal(_inexpressible_jamba(tmp_path / "jamba"), text_file, tmp_path, removal="[1]", runner=run)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: not saved") and "expert_layer_period" in out.stderr
    assert not (tmp_path / "healed").exists()
