"""`import sleb`: the public API, checked against the commands and on a model split by a device_map."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import sleb
import tiny
from sleb.blocks import get_blocks as sleb_blocks
from clitools import OFFLINE, ROOT, invoke, run


def _readme_python_block() -> str:
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written_and_matches_the_command(tmp_path):
    # From another directory, sleb importable as after `pip install .`.
    out = subprocess.run([sys.executable, "-c", _readme_python_block()], cwd=tmp_path, env=dict(OFFLINE, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"removal list (\[.*?\]); demo perplexity ([\d.]+) -> ([\d.]+) \(skipped ([\d.]+)\)", out.stdout)
    assert found, out.stdout
    assert (tmp_path / "demo-pruned" / "config.json").exists()
    # The quickstart: no model or data flags, the demo model and its data sets are the defaults.
    cli = invoke("sleb", "--nsamples", "64", "--result_folder", str(tmp_path / "results"), timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout.splitlines()[0] == "loading demo: float32 on cpu"  # dtype and placement first
    (result,) = (tmp_path / "results").glob("*.json")
    record = json.loads(result.read_text())
    assert record["settings"]["dataset"] == "demo" and record["settings"]["ppl_datasets"] == "demo"
    assert record["placement"] == {"dtype": "float32", "input_device": "cpu"} and record["seqlen"] == 512
    assert json.loads(found.group(1)) == record["removal_list"]
    assert float(found.group(2)) == pytest.approx(record["ppl_dense"]["demo"]["ppl"], abs=5e-4)
    assert float(found.group(3)) == pytest.approx(record["ppl"]["demo"]["ppl"], abs=5e-4)
    assert found.group(4) == found.group(3)  # skipping and removing give the same model
    assert f"{float(found.group(3)):.3f}" in open(os.path.join(ROOT, "README.md")).read()


def test_search_on_a_model_split_by_a_device_map_gives_the_commands_list(model_dirs, text_file, tmp_path):
    cli = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "64",
              "--seqlen", "64", "--num_remove_blocks", "2", "--eval_ppl", "False", "--result_folder", str(tmp_path))
    assert cli.returncode == 0, cli.stderr
    (result,) = tmp_path.glob("*.json")
    expected = json.loads(result.read_text())["removal_list"]
    # Loaded by the test itself, not by sleb: 4 of 6 blocks offloaded to disk behind accelerate's hooks.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="auto", max_memory={"cpu": "150KB"},
                                                 offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(map(str, model.hf_device_map.values()))
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=64, seqlen=64)
    model.train()  # left as found, accelerate's hooks included
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    found = sleb.search(model, windows, num_remove_blocks=2, progress=False)
    assert found.removal_list == expected and found.engine == "fast"
    assert model.training and model.config.use_cache
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(hasattr(m, "_hf_hook") for m in sleb_blocks(model)[1:5])  # the offloaded blocks keep theirs


def test_skipping_leaves_the_logits_identical(model_dirs):
    model, tokenizer = sleb.load(model_dirs["qwen2"], device="cpu")
    ids = tokenizer(tiny.sample_text(10, seed=2), return_tensors="pt").input_ids[:, :32]
    with torch.inference_mode():
        before = model(ids).logits
        with sleb.skipping(model, [1, 3]):
            inside = model(ids).logits
        after = model(ids).logits
    assert not torch.equal(inside, before)
    assert torch.equal(after, before)


def test_bad_argument_raises_usage_error_with_the_commands_message(model_dirs, tmp_path):
    model, _ = sleb.load(model_dirs["llama"], device="cpu")
    with pytest.raises(sleb.UsageError) as raised:
        sleb.remove_blocks(model, [9])
    assert isinstance(raised.value, ValueError)
    cli = run("eval", "--model_name", model_dirs["llama"], "--removal_list", "[9]", "--result_folder", str(tmp_path))
    assert cli.returncode == 2 and cli.stderr.strip() == f"error: {raised.value}"
    with pytest.raises(sleb.UsageError, match="--metric"):
        sleb.search(model, torch.zeros(1, 8, dtype=torch.long), metric="nope")


def test_import_sleb_loads_no_heavy_library():
    code = ("import sys, time; t = time.perf_counter(); import sleb; s = time.perf_counter() - t; "
            "print(s, [m for m in ('lm_eval', 'peft', 'datasets', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE, timeout=120)
    seconds, loaded = out.stdout.split(" ", 1)
    assert loaded.strip() == "[]", out.stdout
    assert sorted(sleb.__all__) == sorted(["load", "calibration_windows", "evaluation_windows", "search",
                                           "search_sublayers", "SearchResult", "remove_blocks", "skipping", "check_compensable",
                                           "compensate", "CompensationResult", "serving_problems", "perplexity",
                                           "zeroshot_tasks", "dense_distributions", "kl_to_dense", "Evolution",
                                           "zeroshot", "heal", "LoraRecipe", "HealResult", "save_pretrained", "save_gguf",
                                           "UsageError", "__version__"])


def test_heal_returns_a_merged_model_that_fits_its_texts_better(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, [2, 4])
    texts = open(text_file).read().splitlines()
    before = sleb.perplexity(model, tokenizer, texts, seqlen=32, progress=False)
    result = sleb.heal(model, tokenizer, texts, nsamples=300, seqlen=32, lr=1e-2, warmup_steps=2, max_steps=20,
                       train_batch_size=4, grad_accum=1, logging_steps=5)
    healed = result.model
    assert result.train_windows > 0 and result.train_seconds > 0 and len(result.loss_curve) == 4
    assert "down_proj" in result.targets["lora_targets"]
    assert type(healed).__name__ == "LlamaForCausalLM" and len(sleb_blocks(healed)) == 4  # merged, no peft
    assert healed.config.use_cache  # put back as it was found
    assert sleb.perplexity(healed, tokenizer, texts, seqlen=32, progress=False) < before
    # The same texts as a file:PATH data set give the same calibration windows.
    assert torch.equal(sleb.calibration_windows(tokenizer, texts, nsamples=50, seqlen=16),
                       sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=50, seqlen=16))


def test_calibration_windows_are_capped_at_the_models_positions_as_the_command_caps_them(model_dirs, text_file,
                                                                                        tmp_path):
    cli = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "300",
                 "--seqlen", "4096", "--num_remove_blocks", "1", "--eval_ppl", "False", "--result_folder", str(tmp_path))
    assert cli.returncode == 0, cli.stderr
    (result,) = tmp_path.glob("*.json")
    record = json.loads(result.read_text())
    assert record["seqlen"] == 256  # the tiny model's max_position_embeddings
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=300, seqlen=4096, model=model)
    assert tuple(windows.shape) == (record["calibration_windows"], 256)
    assert torch.equal(windows, sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=300, seqlen=256))
    evaluation = sleb.evaluation_windows(tokenizer, f"file:{text_file}", seqlen=4096, model=model)
    assert evaluation.shape[1] == 256
    assert sleb.perplexity(model, windows=evaluation, progress=False) == pytest.approx(
        sleb.perplexity(model, tokenizer, f"file:{text_file}", seqlen=4096, progress=False), rel=1e-12)
