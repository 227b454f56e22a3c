"""The pruned checkpoint in llama.cpp itself: converted by llama.cpp's own converter, run by llama-cpp-python,
its logits compared with transformers' on the same tokens, dense and pruned.

Needs the `llama-cpp` extra and a llama.cpp source tree in SLEB_LLAMA_CPP (the llama-cpp-python sdist's
vendor/llama.cpp; `.ci/run` unpacks one), and optionally SLEB_LLAMA_CPP_PYTHON, a Python whose environment
meets the converter's requirements. Without them these tests skip, unless SLEB_REQUIRE_LLAMA_CPP is set
(CI sets it), where they fail.

Tolerance: float32 GGUF, float32 KV cache, 48 tokens; the largest absolute logit difference (logits of
magnitude ~1-5) must stay under LOGIT_ATOL, and the pruned model's within twice the dense model's (plus 1e-5),
so that pruning is told apart from what the engine always differs by. Measured here: about 1e-5 for Llama,
Qwen2 and Mixtral, dense and pruned alike; 2.7e-3 dense and 2.3e-3 pruned for Gemma 3, whose GELU ggml's CPU
backend reads from a float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h).
"""

import json
import os

import numpy as np
import pytest
import torch

import sleb
import tiny_gguf
from sleb import demo_corpus
from clitools import invoke

TREE = os.environ.get("SLEB_LLAMA_CPP")
CONVERTER_PYTHON = os.environ.get("SLEB_LLAMA_CPP_PYTHON")
LOGIT_ATOL = {"llama": 1e-4, "qwen2": 1e-4, "mixtral": 1e-4, "gemma3": 1e-2}
TOKENS = 48  # past Gemma 3's tiny sliding window (8), so a wrong attention pattern shows


_MISSING = tiny_gguf.engine_missing(TREE)
if _MISSING and os.environ.get("SLEB_REQUIRE_LLAMA_CPP"):
    raise RuntimeError(f"SLEB_REQUIRE_LLAMA_CPP is set but {_MISSING}")
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return tiny_gguf.train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def gguf_dirs(tmp_path_factory, spm_model):
    root = tmp_path_factory.mktemp("gguf_models")
    return {arch: tiny_gguf.make_model_dir(root / arch, arch, spm_model) for arch in tiny_gguf.GGUF_FAMILIES}


def _tokens(folder) -> list:
    tokenizer = sleb.load(folder, device="cpu")[1]
    text = " ".join(demo_corpus.texts("validation")[:20])
    ids = tokenizer(text)["input_ids"][:TOKENS]
    assert len(ids) == TOKENS
    return ids


def _transformers_logits(folder, ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def _engine_logits(gguf, ids) -> np.ndarray:
    from sleb import llama_cpp

    llm = llama_cpp.load(gguf, n_ctx=64, logits_all=True, float32_cache=True)
    try:
        return llama_cpp.logits(llm, ids)
    finally:
        llm.close()


def _convert(folder, out, **kwargs) -> str:
    from sleb import llama_cpp

    return llama_cpp.convert(folder, out, TREE, CONVERTER_PYTHON, "f32", **kwargs)


def _pruned(folder, removal_list, out) -> str:
    model, tokenizer = sleb.load(folder, device="cpu", dtype="float32")
    sleb.remove_blocks(model, removal_list)
    sleb.save_pretrained(model, tokenizer, str(out))
    return str(out)


# Removals that break each family's default layout where it has one: Gemma 3's every-6th full-attention
# block moves from block 5 to block 4 after removing block 2.
REMOVALS = {"llama": [2, 4], "qwen2": [1], "mixtral": [3], "gemma3": [2]}


@pytest.mark.parametrize("arch", tiny_gguf.GGUF_FAMILIES)
def test_dense_and_pruned_logits_in_llama_cpp_match_transformers(arch, gguf_dirs, tmp_path):
    dense_dir = gguf_dirs[arch]
    ids = _tokens(dense_dir)
    pruned_dir = _pruned(dense_dir, REMOVALS[arch], tmp_path / "pruned")
    assert os.path.isfile(os.path.join(pruned_dir, "tokenizer.model"))  # the converter's vocab, carried along
    differences = {}
    for folder, name in ((dense_dir, "dense"), (pruned_dir, "pruned")):
        gguf = _convert(folder, tmp_path / f"{name}.gguf")
        expected = _transformers_logits(folder, ids)
        found = _engine_logits(gguf, ids)
        assert found.shape == expected.shape
        differences[name] = float(np.abs(found - expected).max())
    assert max(differences.values()) < LOGIT_ATOL[arch], differences
    assert differences["pruned"] <= 2 * differences["dense"] + 1e-5, differences


def test_gemma3_pattern_written_so_llama_cpp_computes_the_pruned_model(gguf_dirs, tmp_path):
    """serving.py's Gemma 3 pattern rule, checked in the engine: the converter alone leaves the pattern out,
    and llama.cpp then takes block 4 of the pruned model as sliding (it attends fully in transformers)."""
    from sleb import serving

    pruned_dir = _pruned(gguf_dirs["gemma3"], [2], tmp_path / "pruned")
    config = json.loads(open(os.path.join(pruned_dir, "config.json")).read())
    assert config["layer_types"][4] == "full_attention"
    problems = serving.problems(sleb.load(pruned_dir, device="cpu")[0].config)
    assert any(line.startswith(f"{serving.LLAMA_CPP}: layer_types") for line in problems)
    ids = _tokens(pruned_dir)
    expected = _transformers_logits(pruned_dir, ids)
    plain = _engine_logits(_convert(pruned_dir, tmp_path / "plain.gguf", write_layout=False), ids)
    written = _engine_logits(_convert(pruned_dir, tmp_path / "written.gguf"), ids)
    assert float(np.abs(plain - expected).max()) > 0.1  # another model (measured: 1.68)
    assert float(np.abs(written - expected).max()) < LOGIT_ATOL["gemma3"]


def test_gemma_attention_scale_read_off_the_depth_is_warned_and_is_another_model(spm_model, tmp_path):
    """A pruned Gemma 3 27B (query_pre_attn_scalar = hidden / heads = 168, head_dim 128) is no longer 62 blocks
    deep, and llama.cpp scales its attention by head_dim instead: here the same ratio in miniature (hidden 32,
    4 heads, head_dim 4, query_pre_attn_scalar 8). No GGUF key sets the scale, so the warning stays."""
    from transformers import AutoConfig

    from sleb import serving

    folder = tiny_gguf.make_model_dir(tmp_path / "gemma3", "gemma3", spm_model, head_dim=4, query_pre_attn_scalar=8)
    problems = serving.problems(AutoConfig.from_pretrained(folder))
    assert any(line.startswith(f"{serving.LLAMA_CPP}: query_pre_attn_scalar") for line in problems), problems
    ids = _tokens(folder)
    difference = float(np.abs(_engine_logits(_convert(folder, tmp_path / "g.gguf"), ids)
                              - _transformers_logits(folder, ids)).max())
    assert difference > 0.1  # measured: 1.45


def test_latency_converts_both_and_reports_the_speedup_in_llama_cpp(gguf_dirs, tmp_path):
    args = ["--model_name", gguf_dirs["llama"], "--engine", "llama.cpp", "--llama_cpp", TREE, "--gguf_outtype", "f32",
            "--prompt_len", "32", "--warmup", "1", "--repeats", "3", "--threads", "1", "--generation", "True",
            "--new_tokens", "8", "--result_folder", str(tmp_path), "--result_file", "l.json"]
    if CONVERTER_PYTHON:
        args += ["--converter_python", CONVERTER_PYTHON]
    out = invoke("latency", *args)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "l.json").read_text())
    assert result["engine"]["name"] == "llama.cpp" and result["engine"]["threads"] == 1
    assert result["removal_list"] == [1, 2] and result["ideal_speedup"] == pytest.approx(6 / 4)
    assert result["gguf"]["dense"]["block_count"] == 6 and result["gguf"]["pruned"]["block_count"] == 4
    assert result["speedup"] == pytest.approx(result["dense"]["median_s"] / result["pruned"]["median_s"])
    for side in ("dense", "pruned"):
        assert len(result[side]["times_s"]) == 3 and result[side]["tokens_per_s"] > 0
        assert result[side]["prompt_processing"]["tokens_per_s"] > 0
        assert os.path.isfile(result["gguf"][side]["path"])
    assert "of ideal" in out.stdout

    # The files just written, given directly: the same blocks, measured again.
    again = invoke("latency", "--engine", "llama.cpp", "--gguf_dense", result["gguf"]["dense"]["path"],
                   "--gguf_pruned", result["gguf"]["pruned"]["path"], "--prompt_len", "16", "--repeats", "1",
                   "--warmup", "0", "--result_folder", str(tmp_path), "--result_file", "g.json")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "g.json").read_text())["ideal_speedup"] == pytest.approx(6 / 4)
    swapped = invoke("latency", "--engine", "llama.cpp", "--gguf_dense", result["gguf"]["pruned"]["path"],
                     "--gguf_pruned", result["gguf"]["dense"]["path"], "--result_folder", str(tmp_path / "swapped"))
    assert swapped.returncode == 2 and "fewer blocks than the dense one" in swapped.stderr
    assert "llama.cpp prompt" not in swapped.stdout  # refused before any timing


def test_a_converter_that_fails_is_one_line_and_leaves_no_gguf(gguf_dirs, tmp_path):
    out = invoke("latency", "--model_name", gguf_dirs["llama"], "--engine", "llama.cpp", "--llama_cpp", TREE,
                 "--converter_python", "/bin/false", "--result_folder", str(tmp_path))
    assert out.returncode == 2 and "llama.cpp's converter failed" in out.stderr and "Traceback" not in out.stderr
    assert not [name for name in os.listdir(tmp_path) if not name.startswith(".")]


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)  # a truncated header
    out = invoke("latency", "--engine", "llama.cpp", "--gguf_dense", str(broken), "--gguf_pruned", str(broken),
                 "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2 and "cannot load" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "results").exists() or not os.listdir(tmp_path / "results")
