"""sleb: find and remove redundant transformer blocks (SLEB, ICML 2024) in Hugging Face decoders.

From Python, on a model you already hold:

    import sleb
    model, tokenizer = sleb.load("demo")
    windows = sleb.calibration_windows(tokenizer, "demo", nsamples=128, seqlen=512, model=model)
    result = sleb.search(model, windows, num_remove_blocks=3)
    sleb.remove_blocks(model, result.removal_list)

Importing sleb loads torch, not lm-eval, peft or datasets: each function imports what it needs.
"""

from sleb.version import __version__

from sleb.api import (CompensationResult, HealResult, SearchResult, calibration_windows, check_compensable,  # noqa: E402
                      compensate, dense_distributions, evaluation_windows, heal, kl_to_dense, load,
                      perplexity, remove_blocks, save_gguf, save_pretrained, search, search_sublayers,
                      serving_problems, skipping, zeroshot, zeroshot_tasks)
from sleb.errors import UsageError  # noqa: E402
from sleb.recovery.lora import LoraRecipe  # noqa: E402
from sleb.evopress import Evolution  # noqa: E402

__all__ = ["load", "calibration_windows", "evaluation_windows", "search", "search_sublayers", "SearchResult", "remove_blocks",
           "skipping", "check_compensable", "compensate", "CompensationResult", "serving_problems", "perplexity",
           "dense_distributions", "kl_to_dense", "Evolution",
           "zeroshot_tasks", "zeroshot", "heal", "LoraRecipe", "HealResult", "save_pretrained", "save_gguf", "UsageError", "__version__"]
