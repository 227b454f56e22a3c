"""A pruned model is the model the search scored, wherever it is loaded next, or a one-line refusal:
the reload guard compares behaviour, blocks that derive settings from their index are renumbered in
the scored model too, and the tie margin follows the dtype the blocks compute in."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import sleb
import tiny
from sleb import blocks, checkpoint, guard
from sleb.engines import ReferenceEngine
from sleb.errors import UsageError
from sleb.fast_search import HALF_TIE_MARGIN, FastEngine


def test_a_behaviour_only_mismatch_is_refused(model_dirs, tmp_path):
    """Two layer_types entries swapped after removal: the same tensors, another model (which block
    attends to the full context). The tensor comparison alone let it through."""
    model, tokenizer = sleb.load(model_dirs["gemma3"], device="cpu")
    sleb.remove_blocks(model, [1])
    assert guard.tensor_differences(model, guard._build(model, guard._saved_form(model.config))) == []  # the tensors alone cannot tell
    kinds = list(model.config.layer_types)
    full = kinds.index("full_attention")
    kinds[0], kinds[full] = kinds[full], kinds[0]
    model.config.layer_types = kinds
    with pytest.raises(UsageError) as raised:
        sleb.save_pretrained(model, tokenizer, str(tmp_path / "out"))
    message = str(raised.value)
    assert "\n" not in message and "block 0 (self_attn)" in message and "'sliding_attention' here" in message
    assert "layer_types" in message
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_shared_block_weights_are_refused(model_dirs, tmp_path):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, [1])
    model.model.layers[2].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(UsageError, match="are one tensor here, not rebuilt"):
        sleb.save_pretrained(model, tokenizer, str(tmp_path / "out"))


@pytest.fixture(scope="module")
def inverse_scaled_gpt2(tmp_path_factory):
    """GPT-2 whose attention divides by (layer_idx + 1), fixed when the block is built."""
    path = tmp_path_factory.mktemp("gpt2_inverse")
    config = tiny.make_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny.make_tokenizer().save_pretrained(path)
    return str(path)


def test_gpt2_with_inverse_layer_index_scaling_saves_the_model_that_was_scored(inverse_scaled_gpt2, text_file,
                                                                                 tmp_path, capsys):
    model, tokenizer = sleb.load(inverse_scaled_gpt2, device="cpu")
    assert blocks.index_derived(model) == ["scaling"]
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=300, seqlen=32, model=model)[:6]
    found = sleb.search(model, windows, num_remove_blocks=2, progress=False)
    assert found.engine == "reference" and "derive scaling from their index" in capsys.readouterr().err
    scored = found.losses[-1][found.removal_list[-1]]
    with sleb.skipping(model, found.removal_list):
        skipped = ReferenceEngine(model, windows).loss([])
    sleb.remove_blocks(model, found.removal_list)
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert ReferenceEngine(reloaded, windows).loss([]) == pytest.approx(scored, rel=1e-6)
    assert skipped == pytest.approx(scored, rel=1e-6)


def test_the_tie_margin_follows_the_dtype_the_blocks_compute_in(model_dirs):
    model, _ = sleb.load(model_dirs["llama"], device="cpu")
    blocks.get_blocks(model).to(torch.bfloat16)  # float32 embeddings first, bfloat16 blocks
    assert model.dtype == torch.float32 and blocks.compute_dtype(model) == torch.bfloat16
    engine = FastEngine(model, torch.zeros(1, 8, dtype=torch.long))  # builds without running the model
    assert engine.tie_margin == HALF_TIE_MARGIN and engine.block_forwards == 0


def test_a_hybrid_search_keeps_an_attention_block_and_its_checkpoint_generates(family_dirs, text_file, tmp_path):
    """Nemotron-H of 6 blocks, attention at 2 and 5, no barrier at the end: unconstrained, the search may take
    both; by default it keeps one, and the saved model generates the same with and without its cache."""
    model, tokenizer = sleb.load(family_dirs["nemotron_h"], device="cpu")
    kinds = blocks.block_kinds(model)
    attention = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    assert attention == [2, 5]
    windows = tokenizer(tiny.sample_text(60, seed=1), return_tensors="pt").input_ids[:, :256].view(4, 64)
    free = sleb.search(model, windows, num_remove_blocks=4, latter_barrier=0, progress=False, keep_block_kinds=False)
    kept = sleb.search(model, windows, num_remove_blocks=4, latter_barrier=0, progress=False)
    assert set(attention) <= set(free.removal_list)  # what a new user met: every attention block gone
    assert not set(attention) <= set(kept.removal_list) and blocks.keeps_every_kind(kept.removal_list, kinds)
    with pytest.raises(UsageError, match="cannot generate"):
        with blocks.skipping(model, free.removal_list):
            guard.check_generates(model)
    sleb.remove_blocks(model, kept.removal_list)
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert tiny.generates_alike_with_and_without_cache(reloaded, windows[:1, :8])


def test_a_given_list_that_takes_every_attention_block_is_one_line(family_dirs, tmp_path):
    from clitools import run

    out = run("eval", "--model_name", family_dirs["nemotron_h"], "--removal_list", "[2, 5]", "--eval_ppl", "False",
              "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "removes every 'full_attention' block (blocks [2, 5])" in out.stderr and "--keep_block_kinds" in out.stderr
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def _search_args(model_dir, data, tmp_path, *extra):
    return ["--model_name", model_dir, "--dataset", f"file:{data}", "--nsamples", "60", "--seqlen", "32",
            "--num_remove_blocks", "3", "--eval_ppl", "False", "--result_folder", str(tmp_path), "--result_file",
            "r.json", *extra]


@pytest.mark.parametrize("change", ["dtype", "data", "model"])
def test_resume_of_another_run_is_refused(change, model_dirs, text_file, tmp_path):
    """A partial search resumed on another dtype, other text under the same file name, or another
    checkpoint at the same path: one line naming what changed, exit 2, the partial result kept."""
    import json
    import shutil

    from clitools import invoke, run

    data = tmp_path / "calibration.txt"
    shutil.copy(text_file, data)
    model_dir = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], model_dir)
    first = invoke("sleb", *_search_args(str(model_dir), data, tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / "r.json").read_text())
    record["search"]["status"] = "searching"  # as a run killed after two phases leaves it
    for name in ("removal_list", "losses", "lower_bounds", "phase_seconds"):
        record["search"][name] = record["search"][name][:2]
    (tmp_path / "r.json").write_text(json.dumps(record))
    extra, named = [], ""
    if change == "dtype":
        extra, named = ["--dtype", "bfloat16"], "model.dtype was 'float32', now 'bfloat16'"
        record["settings"]["dtype"] = "bfloat16"  # the flag check passes; the run itself differs
        (tmp_path / "r.json").write_text(json.dumps(record))
    elif change == "data":
        data.write_text(data.read_text()[::-1])
        named = "the calibration windows"
    else:
        shutil.rmtree(model_dir)
        shutil.copytree(model_dirs["qwen2"], model_dir)
        named = "the model's"
    out = run("sleb", *_search_args(str(model_dir), data, tmp_path, "--resume", "True", *extra))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert "cannot resume" in out.stderr and named in out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["search"]["status"] == "searching"


def test_api_resume_refuses_a_result_of_another_k_or_metric(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=60, seqlen=32, model=model)
    found = sleb.search(model, windows, num_remove_blocks=2, progress=False)
    assert sleb.search(model, windows, num_remove_blocks=2, resume=found, progress=False).removal_list == \
        found.removal_list
    with pytest.raises(UsageError, match="settings.num_remove_blocks was 2, now 3"):
        sleb.search(model, windows, num_remove_blocks=3, resume=found, progress=False)
    with pytest.raises(UsageError, match="settings.metric was 'sleb', now 'sleb_oneshot'"):
        sleb.search(model, windows, num_remove_blocks=2, metric="sleb_oneshot", resume=found, progress=False)
    other, _ = sleb.load(model_dirs["qwen2"], device="cpu")
    with pytest.raises(UsageError, match="the model's config changed"):
        sleb.search(other, windows, num_remove_blocks=2, resume=found, progress=False)


def test_heal_resume_checks_the_run(model_dirs, text_file, tmp_path):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, [2])
    texts = open(text_file).read().splitlines()
    work = tmp_path / "work"
    sleb.heal(model, tokenizer, texts, nsamples=100, seqlen=32, max_steps=4, save_steps=2, warmup_steps=0,
              train_batch_size=4, grad_accum=1, logging_steps=2, work_dir=str(work))
    checkpoint_dir = str(work / "checkpoint-4")
    again, _ = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(again, [2])
    with pytest.raises(UsageError, match="settings.lr was 0.0001, now 0.001"):
        sleb.heal(again, tokenizer, texts, nsamples=100, seqlen=32, max_steps=6, save_steps=2, warmup_steps=0,
                  train_batch_size=4, grad_accum=1, logging_steps=2, lr=1e-3, work_dir=str(work),
                  resume_from=checkpoint_dir)


def test_saved_configs_tell_serving_engines_the_layout(family_dirs, text_file, tmp_path):
    """DeepSeek-V3: no multi-token-prediction weights are saved, so the config says 0 of them; Nemotron-H:
    the pattern string vLLM reads matches layers_block_type; GPT-OSS after an odd deletion: no field can
    tell vLLM (sliding = even blocks), so a warning in stderr, the results JSON and the card."""
    import json

    from clitools import invoke

    model, tokenizer = sleb.load(family_dirs["deepseek_v3"], device="cpu")
    assert model.config.num_nextn_predict_layers == 1
    sleb.remove_blocks(model, [2])
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "deepseek"))
    saved = json.loads((tmp_path / "deepseek" / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "deepseek" / "model.safetensors"), "pt") as weights:
        depth_in_weights = len({key.split(".")[2] for key in weights.keys() if key.startswith("model.layers.")})
    assert depth_in_weights == saved["num_hidden_layers"] and saved["num_nextn_predict_layers"] == 0

    model, tokenizer = sleb.load(family_dirs["nemotron_h"], device="cpu")
    sleb.remove_blocks(model, [1, 4])
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "nemotron"))
    saved = json.loads((tmp_path / "nemotron" / "config.json").read_text())
    codes = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
    assert saved["hybrid_override_pattern"] == "".join(codes[kind] for kind in saved["layers_block_type"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nemotron")
    assert list(reloaded.config.layers_block_type) == saved["layers_block_type"]

    out = invoke("eval", "--model_name", family_dirs["gpt_oss"], "--removal_list", "[1]", "--eval_ppl", "False",
                 "--result_folder", str(tmp_path / "results"), "--result_file", "g.json",
                 "--save_model", str(tmp_path / "gpt_oss"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning: served by vLLM 0.33: layer_types: it takes GPT-OSS's sliding blocks as the even ones" in out.stderr
    record = json.loads((tmp_path / "results" / "g.json").read_text())
    assert any("GPT-OSS's sliding blocks" in line for line in record["serving_warnings"])
    assert "GPT-OSS's sliding blocks as the even ones" in (tmp_path / "gpt_oss" / "README.md").read_text()


def test_a_per_block_list_without_layer_in_its_name_is_carried(model_dirs, tmp_path):
    """A per-block setting under a name the table does not know (here a per-block top-k) is trimmed with
    the blocks, so the saved config describes the kept blocks."""
    import json

    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    model.config.experts_per_token_per_block = [1, 2, 3, 4, 5, 6]
    with sleb.skipping(model, [1, 4]):
        assert model.config.experts_per_token_per_block == [1, 3, 4, 6]
    assert model.config.experts_per_token_per_block == [1, 2, 3, 4, 5, 6]  # whole again
    sleb.remove_blocks(model, [1, 4])
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["experts_per_token_per_block"] == [1, 3, 4, 6]
