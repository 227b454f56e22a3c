"""Train the shipped demo model: a small Llama on the `demo` corpus, from scratch, on CPU.

    python scripts/train_demo_model.py --out sleb/demo_model

Trains a byte-level BPE tokenizer on the train split, then a 12-block Llama with AdamW over random
512-token windows of the train stream, reporting validation perplexity after each epoch. Finally
saves the weights in float16 (to stay small) with the tokenizer, measures test perplexity of the
saved model exactly as `python -m eval --ppl_datasets demo` does, and writes the model card.
"""

import json
import math
import os
import sys
import time

import fire
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sleb import demo_corpus  # noqa: E402

SEPARATOR = "\n\n"  # documents are joined as WikiText-2 rows are


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizer: every encoded text starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@torch.no_grad()
def mean_loss(model, stream, seqlen, batch_size=8):
    windows = stream[: stream.numel() // seqlen * seqlen].view(-1, seqlen)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        total += model(batch, labels=batch).loss.item() * len(batch)
    return total / len(windows)


def main(
    out: str = "sleb/demo_model",
    vocab_size: int = 8192,
    hidden_size: int = 256,
    num_layers: int = 12,
    num_heads: int = 4,
    intermediate_size: int = 768,
    seqlen: int = 512,
    batch_size: int = 8,
    epochs: int = 5,
    lr: float = 1.5e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    threads: int = 2,
):
    """Train and save the demo model. Every argument is a flag (--epochs 8, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.time()
    train_texts = demo_corpus.texts("train")
    tokenizer = train_tokenizer(train_texts, vocab_size)
    train_stream = tokenizer(SEPARATOR.join(train_texts), return_tensors="pt").input_ids[0]
    valid_stream = tokenizer(SEPARATOR.join(demo_corpus.texts("validation")), return_tensors="pt").input_ids[0]
    print(f"train tokens {train_stream.numel():,}, validation tokens {valid_stream.numel():,}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=seqlen, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    windows_per_epoch = (train_stream.numel() - seqlen) // seqlen
    steps_per_epoch = windows_per_epoch // batch_size
    total_steps = steps_per_epoch * epochs

    def lr_at(step):  # linear warm-up, then cosine decay to 10%
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    history = []
    step = 0
    for epoch in range(epochs):
        model.train()
        # A fresh offset each epoch, so windows do not always start at the same tokens.
        offset = int(torch.randint(0, seqlen, (1,), generator=generator))
        windows = train_stream[offset : offset + windows_per_epoch * seqlen].view(-1, seqlen)
        order = torch.randperm(len(windows), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}")
        for batch_index in bar:
            batch = windows[order[batch_index * batch_size : (batch_index + 1) * batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        valid_ppl = math.exp(mean_loss(model, valid_stream, seqlen))
        history.append({"epoch": epoch + 1, "validation_ppl": round(valid_ppl, 3)})
        print(f"epoch {epoch + 1}: validation perplexity {valid_ppl:.2f}", flush=True)
        # A float16 snapshot after every epoch, so an interrupted run still leaves a usable model.
        save_float16(model, tokenizer, out + ".last_epoch")

    save_float16(model, tokenizer, out)
    minutes = (time.time() - started) / 60
    write_card(out, config, train_stream.numel(), history, minutes, " ".join(sys.argv[1:]))


def save_float16(model, tokenizer, out):
    half = type(model)(model.config).to(torch.float16)
    half.load_state_dict({k: v.to(torch.float16) for k, v in model.state_dict().items()})
    half.config.use_cache = True
    half.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_card(out, config, train_tokens, history, minutes, flags):
    """Measure the saved model's test perplexity the way `python -m eval` does and describe it."""
    from sleb.data import load_eval_windows
    from sleb.models import load_model
    from sleb.ppl import perplexity

    model, tokenizer = load_model(out, dtype="float32", device="cpu")
    windows = load_eval_windows("demo", tokenizer, seqlen=config.max_position_embeddings)
    test_ppl = perplexity(model, windows, batch_size=4)
    facts = {
        "test_ppl": round(test_ppl, 3), "test_windows": len(windows), "seqlen": windows.shape[1],
        "train_tokens": train_tokens, "history": history, "train_minutes": round(minutes, 1),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }
    with open(os.path.join(out, "training.json"), "w") as handle:
        json.dump(facts, handle, indent=2)
    params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, "README.md"), "w") as handle:
        handle.write(
            f"# sleb demo model\n\n"
            f"A {config.num_hidden_layers}-block Llama ({params / 1e6:.1f}M parameters, hidden "
            f"{config.hidden_size}, {config.num_attention_heads} heads, MLP {config.intermediate_size}, "
            f"vocabulary {config.vocab_size}, tied embeddings, context {config.max_position_embeddings}) "
            f"trained from scratch on the train split of sleb's `demo` corpus (Python {facts['python']} "
            f"standard-library docstrings and language-reference topics; {train_tokens:,} tokens), "
            f"with a byte-level BPE tokenizer trained on the same split. Weights are stored in float16.\n\n"
            f"Trained with `python scripts/train_demo_model.py {flags}` in {facts['train_minutes']} "
            f"minutes on CPU (torch {facts['torch']}).\n\n"
            f"Test perplexity (`python -m eval --model_name demo --ppl_datasets demo`, float32, "
            f"{len(windows)} windows of {windows.shape[1]} tokens): **{test_ppl:.3f}**\n\n"
            f"Validation perplexity by epoch: "
            + ", ".join(f"{h['epoch']}: {h['validation_ppl']:.2f}" for h in history)
            + "\n\nIt exists so the quickstart, the tests and the demo table run offline; it is not a useful "
            "language model.\n"
        )
    print(f"test perplexity {test_ppl:.3f}; model card written to {out}/README.md")


if __name__ == "__main__":
    fire.Fire(main)
