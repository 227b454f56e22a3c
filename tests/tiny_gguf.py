"""Tiny random models with a SentencePiece tokenizer, for llama.cpp: its converter takes a SentencePiece
`tokenizer.model` as it is, while a locally trained BPE tokenizer.json is refused (its hash is in no
table). The tokenizer is trained here in well under a second on the demo corpus; nothing is downloaded."""

import json
import os
import shutil

import torch

import tiny

# Llama-style pieces with byte fallback (256 byte pieces + 3 specials + learnt merges).
SPM_VOCAB = 384
GGUF_FAMILIES = ("llama", "qwen2", "mixtral", "gemma3")


def engine_missing(tree) -> str:
    """Why the llama.cpp engine tests cannot run here ("" when they can): llama-cpp-python and a llama.cpp
    source tree (with its converter) are both needed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install '.[llama-cpp]')"
    if not tree or not os.path.isfile(os.path.join(tree, "convert_hf_to_gguf.py")):
        return "SLEB_LLAMA_CPP does not name a llama.cpp source tree"
    return ""


def train_sentencepiece(folder, vocab: int = SPM_VOCAB) -> str:
    """tokenizer.model of `vocab` pieces trained on the demo corpus's train split; returns its path."""
    import sentencepiece

    from sleb import demo_corpus

    os.makedirs(folder, exist_ok=True)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as handle:
        handle.write("\n".join(demo_corpus.texts("train")[:2000]))
    prefix = os.path.join(folder, "spm")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=20000, minloglevel=2)
    return prefix + ".model"


def _config(arch: str, layers: int):
    import transformers as t

    common = dict(vocab_size=SPM_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "mixtral":
        return t.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=None, **common)
    config = tiny.make_config(arch, layers)
    for name, value in common.items():
        setattr(config, name, value)
    if arch == "gemma3":
        # As Gemma 3 1B-12B have it (256 = head_dim): llama.cpp scales attention by head_dim at any depth but 62.
        config.query_pre_attn_scalar = config.head_dim
    return config


def make_model_dir(path, arch: str, spm_model: str, layers: int = 6, seed: int = 0, init_std: float = 0.2,
                   **fields) -> str:
    """A random `arch` (config `fields` set on top) saved with the SentencePiece tokenizer (tokenizer.model
    beside tokenizer.json)."""
    from transformers import AutoModelForCausalLM

    config = _config(arch, layers)
    for name, value in fields.items():
        setattr(config, name, value)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    add_sentencepiece_tokenizer(path, spm_model)
    return str(path)


def add_sentencepiece_tokenizer(path, spm_model: str) -> None:
    """tokenizer.model into a saved model's folder, with the tokenizer.json transformers makes of it (as hub
    checkpoints have both)."""
    from transformers import AutoTokenizer

    shutil.copy(spm_model, os.path.join(path, "tokenizer.model"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True}, handle)
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
