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
    device_map: Optional[str] = flag(None, "passed to accelerate to split a model over GPUs, e.g. auto")
    trust_remote_code: bool = flag(False, "allow the model's own code from the hub to run")


@dataclass
class EvalFlags:
    eval_ppl: bool = flag(True, "measure perplexity on --ppl_datasets")
    ppl_datasets: str = flag("wikitext2,c4", "comma-separated: wikitext2, c4, ptb, demo, file:PATH (.txt or .jsonl)")
    seqlen: int = flag(2048, "tokens per window (capped at the model's maximum positions)")
    batch_size: int = flag(1, "windows per forward pass when measuring perplexity")
    save_model: Optional[str] = flag(None, "directory to write the pruned model and tokenizer to (save_pretrained)")
    eval_zeroshot: bool = flag(False, "zero-shot accuracy with lm-eval (not available yet)")


@dataclass
class OutputFlags:
    result_folder: str = flag("sleb_results", "where the results JSON is written")
    result_file: Optional[str] = flag(None, "file name of the results JSON (default: derived from the settings)")
    overwrite: bool = flag(False, "replace an existing results file")


@dataclass
class EvalSettings(OutputFlags, EvalFlags, ModelFlags):
    """`python -m eval`: evaluate a model with given blocks removed."""

    removal_list: list = flag([], "original indices of the blocks to remove, e.g. '[5, 4, 9]'; [] = dense")
