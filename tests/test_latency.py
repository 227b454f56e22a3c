"""`python -m latency` on a tiny model with tiny sizes, and its bad inputs."""

import json

import pytest

from clitools import invoke
from sleb.errors import UsageError


@pytest.mark.parametrize("mode", ["prompt", "generation"])
def test_latency_reports_dense_pruned_and_speedup(mode, model_dirs, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--batch_size", "2", "--prompt_len", "16", "--warmup", "1",
            "--repeats", "3", "--result_folder", str(tmp_path), "--result_file", "l.json"]
    if mode == "generation":
        args += ["--generation", "True", "--new_tokens", "5"]
    out = invoke("latency", *args)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "l.json").read_text())
    assert result["mode"] == mode and result["removal_list"] == [1, 2]  # ceil(0.2 x 6) from block 1
    assert result["speedup"] == pytest.approx(result["dense"]["median_s"] / result["pruned"]["median_s"])
    assert result["ideal_speedup"] == pytest.approx(6 / 4)
    for side in ("dense", "pruned"):
        assert len(result[side]["times_s"]) == 3 and result[side]["tokens_per_s"] > 0
        if mode == "generation":
            assert result[side]["new_tokens_generated"] == 5
    assert "speedup" in out.stdout and "of ideal" in out.stdout


def test_latency_takes_sublayers_and_counts_them_by_their_share_of_a_blocks_weights(model_dirs, tmp_path):
    import sleb
    from sleb import sublayers

    out = invoke("latency", "--model_name", model_dirs["llama"], "--removal_list", '["2.attn", "3.mlp", 4]',
                 "--generation", "True", "--batch_size", "1", "--prompt_len", "8", "--new_tokens", "4", "--warmup",
                 "0", "--repeats", "1", "--result_folder", str(tmp_path), "--result_file", "l.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "l.json").read_text())
    model, _ = sleb.load(model_dirs["llama"], device="cpu")
    worth = sublayers.blocks_worth(model, ["2.attn", "3.mlp", 4])
    assert 1 < worth < 3 and result["removal_list"] == ["2.attn", "3.mlp", 4]
    assert result["ideal_speedup"] == pytest.approx(6 / (6 - worth))
    assert result["pruned"]["new_tokens_generated"] == 4


def test_compile_refused_where_torch_cannot(monkeypatch):
    import torch._dynamo

    from sleb.settings import LatencySettings

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(UsageError, match="--compile"):
        LatencySettings(compile=True).check()


@pytest.mark.parametrize("args, message", [
    (["--engine", "llama.cpp"], "needs --model_name FILE.gguf, --gguf_dense and --gguf_pruned, or --llama_cpp"),
    (["--engine", "llama.cpp", "--llama_cpp", "/nonexistent"], "no convert_hf_to_gguf.py there"),
    (["--engine", "llama.cpp", "--gguf_dense", "/nonexistent.gguf", "--gguf_pruned", "GGUF"], "no such file"),
    (["--engine", "llama.cpp", "--gguf_dense", "GGUF", "--gguf_pruned", "GGUF", "--batch_size", "4"],
     "--batch_size must be 1"),
    (["--engine", "llama.cpp", "--gguf_dense", "GGUF", "--gguf_pruned", "GGUF", "--compile", "True"],
     "apply to --engine transformers only"),
    (["--gguf_dense", "a.gguf"], "applies to --engine llama.cpp only"),
    (["--engine", "vllm"], "--engine must be transformers or llama.cpp"),
    (["--engine", "llama.cpp", "--gguf_dense", "GGUF", "--gguf_pruned", "GGUF", "--removal_list", '["2.attn"]'],
     "sub-layers are timed in transformers"),
])
def test_bad_llama_cpp_flags_are_one_line_before_any_work(args, message, tmp_path):
    """Checked before llama-cpp-python is even imported: these hold where it is not installed."""
    existing = tmp_path / "given.gguf"
    existing.write_bytes(b"")
    results = tmp_path / "results"
    out = invoke("latency", *[str(existing) if a == "GGUF" else a for a in args], "--result_folder", str(results))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not results.exists()
