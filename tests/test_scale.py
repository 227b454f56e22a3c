"""Candidate-parallel search under torchrun (gloo, CPU) and a model split by an accelerate device_map."""

import json
import os
import subprocess
import sys

import pytest

from clitools import ROOT, invoke, run


def _search_args(model_dir, text_file, folder, name):
    return ["--model_name", model_dir, "--dataset", f"file:{text_file}", "--nsamples", "100", "--seqlen", "32",
            "--num_remove_blocks", "3", "--ppl_datasets", f"file:{text_file}", "--result_folder", str(folder),
            "--result_file", name]


def _two_ranks(port: int, *args) -> subprocess.CompletedProcess:
    """`python -m sleb ARGS` under torchrun with two ranks (gloo on CPU); it must succeed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), "-m", "sleb", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert launched.returncode == 0, launched.stderr[-2000:]
    return launched


@pytest.mark.parametrize("metric", ["sleb", "sleb_compensated"])
def test_torchrun_two_ranks_equals_single_process(metric, model_dirs, text_file, tmp_path):
    """Each rank scores its slice of the candidates (a compensated search, each with its own map)."""
    extra = ["--metric", metric]
    single = invoke("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "single.json"), *extra)
    assert single.returncode == 0, single.stderr
    launched = _two_ranks(29533, *_search_args(model_dirs["llama"], text_file, tmp_path, "ranks.json"), *extra)
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ranks.json").read_text())
    assert two["search"]["engine"] == ("fast x2 ranks" if metric == "sleb" else "fast, compensated x2 ranks")
    assert two["search"]["removal_list"] == one["search"]["removal_list"]
    for row_one, row_two in zip(one["search"]["losses"], two["search"]["losses"]):
        for a, b in zip(row_one, row_two):
            assert a is None or b is None or abs(a - b) <= 1e-6 * abs(a)
    assert launched.stdout.count("results written to") == 1  # only rank 0 writes


def test_model_spread_by_accelerate_gives_the_same_list_perplexity_and_accuracy(model_dirs, text_file, tmp_path):
    """A CPU budget too small for the model makes accelerate offload blocks to disk and attach its hooks
    (weights stay on the meta device until a block runs): the path of a model larger than its GPUs."""
    zeroshot = ["--eval_zeroshot", "True", "--tasks", "demo_order", "--limit", "12"]
    plain = invoke("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "plain.json"), *zeroshot)
    spread = invoke("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "spread.json"),
                 "--device_map", "auto", "--max_memory", '{"cpu": "150KB"}', *zeroshot)
    assert plain.returncode == 0 and spread.returncode == 0, spread.stderr
    a = json.loads((tmp_path / "plain.json").read_text())
    b = json.loads((tmp_path / "spread.json").read_text())
    assert set(b["placement"]["devices"]) == {"cpu", "disk"}  # really spread, hooks and all
    assert "placed by accelerate" in spread.stdout.splitlines()[1]
    assert b["search"]["removal_list"] == a["search"]["removal_list"]
    for row_a, row_b in zip(a["search"]["losses"], b["search"]["losses"]):
        for x, y in zip(row_a, row_b):
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-6)
    name = f"file:{text_file}"
    assert abs(b["ppl"][name]["ppl"] - a["ppl"][name]["ppl"]) <= 1e-5 * a["ppl"][name]["ppl"]
    assert b["zeroshot"]["tasks"]["demo_order"] == pytest.approx(a["zeroshot"]["tasks"]["demo_order"], rel=1e-6)


def test_a_model_offloaded_to_disk_saves_after_the_output_guard(model_dirs, tmp_path):
    """The guard's rebuilds take accelerate's hooks with the tensors, so blocks whose weights wait on disk load
    there as they do in the model; the checkpoint equals the one saved from the model in one piece."""
    import torch
    from transformers import AutoModelForCausalLM

    import sleb

    whole, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    spread, _ = sleb.load(model_dirs["llama"], device="cpu", device_map="auto", max_memory={"cpu": "150KB"})
    assert "disk" in set(map(str, spread.hf_device_map.values()))
    for model, name in ((whole, "whole"), (spread, "spread")):
        sleb.remove_blocks(model, [1, 4])
        sleb.save_pretrained(model, tokenizer, str(tmp_path / name))
    ids = torch.arange(2, 40).unsqueeze(0)
    logits = []
    for name in ("whole", "spread"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.inference_mode():
            logits.append(reloaded(ids, use_cache=False).logits)
    torch.testing.assert_close(logits[1], logits[0])


def test_torchrun_splits_evopress_stages_and_finds_the_same_set(model_dirs, text_file, tmp_path):
    """Each rank scores its slice of every selection stage's sets; all ranks take the same parent."""
    extra = ["--metric", "evopress", "--objective", "kl", "--evo_generations", "3", "--evo_offspring", "6",
             "--evo_initial", "6"]
    single = invoke("sleb", *_search_args(model_dirs["llama"], text_file, tmp_path, "single.json"), *extra)
    assert single.returncode == 0, single.stderr
    _two_ranks(29534, *_search_args(model_dirs["llama"], text_file, tmp_path, "ranks.json"), *extra)
    one = json.loads((tmp_path / "single.json").read_text())["search"]
    two = json.loads((tmp_path / "ranks.json").read_text())["search"]
    assert two["engine"] == "fast x2 ranks" and two["removal_list"] == one["removal_list"]
    assert [g["best"] for g in two["generations"]] == [g["best"] for g in one["generations"]]
    for a, b in zip(one["generations"], two["generations"]):
        assert b["value"] == pytest.approx(a["value"], rel=1e-6)


def test_heal_by_distillation_on_two_ranks_trains_as_one_process_with_the_same_global_batch(model_dirs, text_file,
                                                                                          tmp_path):
    """`python -m sleb.heal` under torchrun: the Trainer runs the ranks as one data-parallel job, rank 0 alone
    writes. The distilling loss divides by the Trainer's num_items_in_batch, which the ranks gather: 2 ranks x 2
    windows x 8 accumulated must log and step as 1 process x 2 x 16 (a per-rank count logs twice the KL)."""
    args = ["--model_name", model_dirs["llama"], "--removal_list", "[2, 4]", "--dataset", f"file:{text_file}",
            "--nsamples", "300", "--seqlen", "32", "--ppl_datasets", f"file:{text_file}", "--eval_seqlen", "32",
            "--objective", "kl", "--max_steps", "3", "--warmup_steps", "0", "--lr", "1e-2", "--lora_dropout", "0",
            "--logging_steps", "1", "--train_batch_size", "2", "--result_folder", str(tmp_path)]
    one = invoke("sleb.heal", *args, "--grad_accum", "16", "--output_dir", str(tmp_path / "one"),
                 "--result_file", "one.json")
    assert one.returncode == 0, one.stderr[-2000:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29537", "-m", "sleb.heal", *args, "--grad_accum", "8", "--output_dir", str(tmp_path / "two"),
                          "--result_file", "two.json", "--save_adapter", str(tmp_path / "adapter")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("results written to") == 1  # rank 0 alone reports and writes
    records = [json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json")]
    curves = [[point["loss"] for point in record["loss_curve"]] for record in records]
    assert len(curves[0]) == 3 and curves[0][-1] < curves[0][0]
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    name = f"file:{text_file}"
    assert records[1]["ppl_healed"][name]["ppl"] == pytest.approx(records[0]["ppl_healed"][name]["ppl"], rel=1e-4)
    assert (tmp_path / "two" / "config.json").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()
