"""What only a GPU can show: half precision on CUDA kernels, the pinned-CPU cache, accelerate's placement,
peak GPU memory, bf16 training. Skipped without CUDA; `bash bench/gpu.sh OUT_DIR` runs them (`-m cuda`)."""

import json

import pytest
import torch

import tiny
from clitools import run
from sleb import blocks, models
from sleb.engines import ReferenceEngine
from sleb.fast_search import FastEngine
from sleb.search_algorithms import SearchJob, SearchState, sleb_iterative

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_models")
    return {arch: tiny.make_model_dir(root / arch, arch) for arch in ("llama", "gemma3", "qwen3_moe")}


def _windows(tokenizer):
    return tokenizer(tiny.sample_text(80, seed=1), return_tensors="pt").input_ids[:, :512].view(4, 128)


def _search(model, windows, build):
    job = SearchJob(model, windows, 3, 1, 1, build_engine=build, log=lambda *a: None)
    with models.use_cache(model, False):
        return sleb_iterative(job, SearchState(blocks.num_blocks(model)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_moe"])
def test_fast_equals_reference_on_gpu(arch, dtype, gpu_model_dirs):
    model, tokenizer = models.load_model(gpu_model_dirs[arch], dtype=dtype, device="cuda")
    windows = _windows(tokenizer)
    reference = _search(model, windows, lambda: ReferenceEngine(model, windows))
    fast = _search(model, windows, lambda: FastEngine(model, windows, batch_size=4))
    assert fast.removal_list == reference.removal_list


def test_pinned_cpu_cache_gives_the_same_list(gpu_model_dirs):
    model, tokenizer = models.load_model(gpu_model_dirs["llama"], dtype="float16", device="cuda")
    windows = _windows(tokenizer)
    engines = []

    def build():
        engines.append(FastEngine(model, windows, batch_size=2, cache_gb=1e-6))  # too small for the device
        return engines[-1]

    fast = _search(model, windows, build)
    assert engines[0].storage.where == "cpu"
    assert fast.removal_list == _search(model, windows, lambda: ReferenceEngine(model, windows)).removal_list


def test_device_map_auto_puts_the_weights_on_the_gpu(gpu_model_dirs, tmp_path):
    model, _ = models.load_model(gpu_model_dirs["llama"])  # the paper's loading: device_map auto on CUDA
    assert all(p.device.type == "cuda" for p in model.parameters())
    out = run("eval", "--model_name", gpu_model_dirs["llama"], "--removal_list", "[1]", "--eval_ppl", "False",
              "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = tmp_path.glob("*.json")
    placement = json.loads(result.read_text())["placement"]
    assert placement["input_device"].startswith("cuda") and placement["devices"]


def test_latency_peak_memory_is_each_models_own(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(tmp_path / "model")
    tiny.make_tokenizer().save_pretrained(tmp_path / "model")
    out = run("latency", "--model_name", str(tmp_path / "model"), "--removal_list", "[1, 2, 3, 4]",
              "--prompt_len", "256", "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = (tmp_path / "results").glob("*.json")
    record = json.loads(result.read_text())
    # Half the blocks (about 40% of the weights here) are gone: the pruned peak must show it.
    assert record["pruned"]["peak_mem_mb"] < 0.8 * record["dense"]["peak_mem_mb"]


def test_bf16_lora_healing_lowers_the_loss(gpu_model_dirs, text_file, tmp_path):
    out = run("sleb.heal", "--model_name", gpu_model_dirs["llama"], "--removal_list", "[2, 4]", "--dataset",
              f"file:{text_file}", "--nsamples", "300", "--seqlen", "32", "--ppl_datasets", f"file:{text_file}",
              "--eval_seqlen", "32", "--lr", "1e-2", "--warmup_steps", "2", "--train_batch_size", "4",
              "--grad_accum", "1", "--max_steps", "20", "--logging_steps", "2", "--dtype", "bfloat16",
              "--output_dir", str(tmp_path / "healed"), "--result_folder", str(tmp_path), "--result_file", "h.json")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["placement"]["dtype"] == "bfloat16" and record["placement"]["input_device"].startswith("cuda")
    assert record["loss_curve"][-1]["loss"] < record["loss_curve"][0]["loss"]
    name = f"file:{text_file}"
    assert record["ppl_healed"][name]["ppl"] < record["ppl_pruned"][name]["ppl"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_compensation_of_a_model_split_over_two_gpus_equals_one_gpu(gpu_model_dirs):
    """Block l on one GPU, the run's last block on the other: every tensor of the fit meets on M's device."""
    import sleb

    one, tokenizer = sleb.load(gpu_model_dirs["llama"], dtype="float32", device="cuda:0")
    windows = _windows(tokenizer)
    sleb.compensate(one, windows, [2, 3], progress=False)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
             **{f"model.layers.{i}": 0 if i < 3 else 1 for i in range(6)}}
    two, _ = sleb.load(gpu_model_dirs["llama"], dtype="float32", device_map=split)
    sleb.compensate(two, windows, [2, 3], progress=False)
    ids = windows[:2].to("cuda:0")
    with torch.inference_mode():
        torch.testing.assert_close(two(input_ids=ids).logits.to("cuda:0"), one(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
