"""Every run's settings: one dataclass per entry module, each field with its help text.

The same object is stored in the run's results file.
"""

from dataclasses import dataclass
from typing import Optional

from sleb.cli import flag


@dataclass
class ModelFlags:
    model_name: str = flag("demo", "hub id (e.g. facebook/opt-13b), a local model directory, or demo (the shipped model)")
    dtype: str = flag("auto", "auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    device_map: object = flag(None, "passed to accelerate to split a model over devices: auto, balanced, or a "
                                     "JSON map of module names to devices")
    trust_remote_code: bool = flag(False, "allow the model's own code from the hub to run")


@dataclass
class EvalFlags:
    eval_ppl: bool = flag(True, "measure perplexity on --ppl_datasets")
    ppl_datasets: str = flag("wikitext2,c4", "comma-separated: wikitext2, c4, ptb, demo, file:PATH (.txt or .jsonl)")
    seqlen: int = flag(2048, "tokens per window (capped at the model's maximum positions)")
    batch_size: int = flag(1, "windows per forward pass when measuring perplexity")
    save_model: Optional[str] = flag(None, "directory to write the pruned model and tokenizer to (save_pretrained)")
    eval_zeroshot: bool = flag(False, "zero-shot accuracy with lm-eval on --tasks")
    tasks: str = flag("piqa,winogrande,hellaswag,arc_challenge,arc_easy",
                      "comma-separated lm-eval tasks; offline: demo_cloze,demo_order")
    num_fewshot: int = flag(0, "few-shot examples per zero-shot item")
    limit: Optional[float] = flag(None, "at most this many items per task (a fraction if below 1)")
    zeroshot_batch_size: int = flag(8, "lm-eval batch size")
    log_samples: bool = flag(False, "keep lm-eval's per-item records in the results JSON")


@dataclass
class OutputFlags:
    result_folder: str = flag("sleb_results", "where the results JSON is written")
    result_file: Optional[str] = flag(None, "file name of the results JSON (default: derived from the settings)")
    overwrite: bool = flag(False, "replace an existing results file")


@dataclass
class EvalSettings(OutputFlags, EvalFlags, ModelFlags):
    """`python -m eval`: evaluate a model with given blocks removed."""

    removal_list: list = flag([], "original indices of the blocks to remove, e.g. '[5, 4, 9]'; [] = dense")


@dataclass
class SearchSettings(OutputFlags, EvalFlags, ModelFlags):
    """`python -m sleb`: find which blocks to remove, then evaluate the pruned model."""

    num_blocks: Optional[int] = flag(None, "the model's depth (default: read from the model); a mismatch is an error")
    num_remove_blocks: Optional[int] = flag(None, "blocks to remove (default: ceil(0.2 x num_blocks))")
    early_barrier: int = flag(1, "the first this-many alive blocks are never candidates")
    latter_barrier: int = flag(1, "the last this-many alive blocks are never candidates")
    dataset: str = flag("wikitext2", "calibration data: wikitext2, c4, ptb, demo or file:PATH")
    nsamples: int = flag(128, "calibration rows taken from the shuffled train split")
    seed: int = flag(0, "seed of the calibration shuffle (and of --metric random)")
    metric: str = flag("sleb", "sleb (iterative, metric 3), sleb_oneshot (metric 2), cosine, angular or random")
    engine: str = flag("fast", "fast (exact, prefix reuse + abandonment) or reference (the paper's loop)")
    search_batch_size: int = flag(4, "calibration windows per forward in the fast engine")
    cache_gb: float = flag(0.0, "memory for cached hidden states in the fast engine (0: automatic)")
    resume: bool = flag(False, "continue an interrupted search from its results file")
    plot: bool = flag(False, "write PNGs: candidate-loss heatmap and loss vs blocks removed")


@dataclass
class LatencySettings(OutputFlags, ModelFlags):
    """`python -m latency`: prompt or generation latency, dense vs pruned."""

    generation: bool = flag(False, "measure generation (default: prompt processing)")
    removal_list: Optional[list] = flag(None, "blocks to remove (default: ceil(0.2 N) blocks from block 1)")
    batch_size: Optional[int] = flag(None, "sequences per run (default: 1 prompt / 64 generation on GPU; 1 / 4 on CPU)")
    prompt_len: Optional[int] = flag(None, "prompt tokens (default: 2048 prompt / 64 generation on GPU; 256 / 32 on CPU)")
    new_tokens: Optional[int] = flag(None, "generated tokens in --generation (default: 128 on GPU, 32 on CPU)")
    warmup: int = flag(2, "untimed runs before measuring")
    repeats: int = flag(5, "timed runs; median, min and max are reported")
    static_cache: bool = flag(False, "generate with a static KV cache")
    compile: bool = flag(False, "torch.compile the forward (mode reduce-overhead); pair with --static_cache")
