"""Agreement with the dense model: does the pruned model say what the dense one said?

Label-free and cheap: the dense model's first NEW_TOKENS greedy tokens after each of N held-out prompts
are taken before any block goes; the pruned model's are compared with them position by position. Reported:
the tokens matched before the first divergence (mean over prompts) and the share of all positions that match.
Prompts are the openings of held-out texts (the demo corpus's test split), through the tokenizer's chat
template where it has one, as a chat model's users send them.
"""

import torch

from sleb import demo_corpus, models

NEW_TOKENS = 32
PROMPT_CHARS = 160


def prompts(tokenizer, count: int) -> list:
    """`count` prompts (token id lists) from the openings of the demo corpus's held-out test texts."""
    texts = [" ".join(text.split())[:PROMPT_CHARS] for text in demo_corpus.texts("test")]
    texts = [text for text in texts if len(text) >= 40][:count]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": f"Continue this text: {text}"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
                for text in texts]
    return [tokenizer(text)["input_ids"] for text in texts]


@torch.inference_mode()
def continuations(model, prompt_ids: list, new_tokens: int = NEW_TOKENS) -> list:
    """The model's greedy continuation of each prompt (token id lists, one prompt at a time: no padding)."""
    device = models.input_device(model)
    out = []
    with models.use_cache(model, True):
        for ids in prompt_ids:
            given = torch.tensor([list(ids)], device=device)
            made = model.generate(given, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)
            out.append(made[0, given.shape[1]:].tolist())
    return out


def agreement(dense: list, pruned: list) -> dict:
    """Matched tokens before the first divergence (mean) and the share of positions that match."""
    prefixes, matched, total = [], 0, 0
    for a, b in zip(dense, pruned):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(prefix)
        matched += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return {"prompts": len(prefixes), "new_tokens": max((len(a) for a in dense), default=0),
            "prefix_mean": sum(prefixes) / len(prefixes) if prefixes else None,
            "overall": matched / total if total else None}
