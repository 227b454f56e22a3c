"""Save a random Llama of a given shape (weights from a config, nothing downloaded) with a small tokenizer,
so `python -m latency` can load it like any checkpoint. Skips the work when DIR already holds one.

    python -m bench.random_model DIR [--layers 32 --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000]
"""

import os

import fire
import torch

from sleb.models import DEMO_MODEL_DIR


def random_llama(layers: int, hidden: int, intermediate: int, heads: int, vocab: int, dtype, device, seed: int = 0,
                 **config_fields):
    """A random Llama of this shape in memory, in eval mode (initialised in `dtype`, on `device`); other
    LlamaConfig fields as keywords."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads,
                         **{"num_key_value_heads": heads, "max_position_embeddings": 4096, **config_fields})
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of a large model's weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def main(directory: str, layers: int = 32, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
         vocab: int = 32000, dtype: str = "float16", seed: int = 0) -> None:
    if os.path.isfile(os.path.join(directory, "config.json")):
        print(f"{directory} holds a model already; kept")
        return
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(layers, hidden, intermediate, heads, vocab, getattr(torch, dtype), device, seed,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    # the demo model's tokenizer: latency feeds random token ids, so any small tokenizer will do
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(directory)
    print(f"random {layers}-block Llama ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters) "
          f"saved to {directory}")


if __name__ == "__main__":
    fire.Fire(main)
