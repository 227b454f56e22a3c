"""Candidate-parallel search under torchrun (gloo, CPU) and a model split by an accelerate device_map."""

import json
import os
import subprocess
import sys

import pytest

from clitools import ROOT, run


def _search_args(model_dir, text_file, folder, name):
    return ["--model_name", model_dir, "--dataset", f"file:{text_file}", "--nsamples", "100", "--seqlen", "32",
            "--num_remove_blocks", "3", "--ppl_datasets", f"file:{text_file}", "--result_folder", str(folder),
            "--result_file", name]


def test_torchrun_two_ranks_equals_single_process(model_dirs, text_file, tmp_path):
    single = run("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "single.json"))
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29533", "-m", "sleb",
                               *_search_args(model_dirs["llama"], text_file, tmp_path, "ranks.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert launched.returncode == 0, launched.stderr[-2000:]
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ranks.json").read_text())
    assert two["search"]["engine"] == "fast x2 ranks"
    assert two["search"]["removal_list"] == one["search"]["removal_list"]
    for row_one, row_two in zip(one["search"]["losses"], two["search"]["losses"]):
        for a, b in zip(row_one, row_two):
            assert a is None or b is None or abs(a - b) <= 1e-6 * abs(a)
    assert launched.stdout.count("results written to") == 1  # only rank 0 writes


def test_device_map_gives_the_same_list_perplexity_and_accuracy(model_dirs, text_file, tmp_path):
    zeroshot = ["--eval_zeroshot", "True", "--tasks", "demo_order", "--limit", "12"]
    plain = run("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "plain.json"), *zeroshot)
    device_map = json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                             "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "cpu",
                             "model.layers.4": "cpu", "model.layers.5": "cpu", "model.norm": "cpu",
                             "lm_head": "cpu"})
    mapped = run("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "mapped.json"),
                 "--device_map", device_map, *zeroshot)
    assert plain.returncode == 0 and mapped.returncode == 0, mapped.stderr
    a = json.loads((tmp_path / "plain.json").read_text())
    b = json.loads((tmp_path / "mapped.json").read_text())
    assert b["search"]["removal_list"] == a["search"]["removal_list"]
    name = f"file:{text_file}"
    assert abs(b["ppl"][name]["ppl"] - a["ppl"][name]["ppl"]) <= 1e-5 * a["ppl"][name]["ppl"]
    assert b["zeroshot"]["tasks"]["demo_order"] == pytest.approx(a["zeroshot"]["tasks"]["demo_order"], rel=1e-6)
