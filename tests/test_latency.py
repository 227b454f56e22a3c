"""`python -m latency` on a tiny model with tiny sizes, and its bad inputs."""

import json

import pytest

from clitools import assert_bad_input, run
from sleb.errors import UsageError


@pytest.mark.parametrize("mode", ["prompt", "generation"])
def test_latency_reports_dense_pruned_and_speedup(mode, model_dirs, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--batch_size", "2", "--prompt_len", "16", "--warmup", "1",
            "--repeats", "3", "--result_folder", str(tmp_path), "--result_file", "l.json"]
    if mode == "generation":
        args += ["--generation", "True", "--new_tokens", "5"]
    out = run("latency", *args)
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


@pytest.mark.parametrize("args, message", [
    (["--removal_list", "[9]"], "index 9"),
    (["--batch_size", "0"], "--batch_size"),
    (["--prompt_len", "-3"], "--prompt_len"),
    (["--generation", "True", "--prompt_len", "250", "--new_tokens", "10"], "positions"),
    (["--repeats", "0"], "--repeats"),
    (["--new_tokens", "5"], "--generation"),
])
def test_latency_bad_input(args, message, model_dirs, tmp_path):
    flags = {"--model_name": model_dirs["llama"], "--result_folder": str(tmp_path / "results")}
    assert_bad_input("latency", flags, args, message, tmp_path / "results")


def test_compile_refused_where_torch_cannot(monkeypatch):
    import torch._dynamo

    from sleb.latency import check_compile
    from sleb.settings import LatencySettings

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(UsageError, match="--compile"):
        check_compile(LatencySettings(compile=True))
