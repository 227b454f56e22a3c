"""Offline zero-shot tasks built from the held-out (validation and test) splits of the demo corpus.

- demo_cloze: a docstring sentence with its last word cut off, after the sentences before it; pick
  the true word among 4 (the 3 distractors are last words of other held-out sentences, so their
  frequencies match the answers' and only the context tells them apart).
- demo_order: two consecutive sentences of a docstring, in their true order versus swapped.

A next-sentence task (pick a document's second sentence among 4) was tried first and dropped: the
dense demo model scored 0.25 on it, chance, because a generic distractor outscores any specific
true sentence; with mutual-information scoring it reached only 0.35.

Each task is a jsonl plus an lm-eval YAML written to a cache folder and registered with
`lm_eval.tasks.TaskManager(include_path=...)`. The items are deterministic for a Python version.
"""

import json
import os
import random
import re

from sleb import demo_corpus, results

TASKS = ("demo_cloze", "demo_order")
ITEMS_PER_TASK = 400
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{2,})([.!?])$")
_PARAGRAPHS_PER_DOCUMENT = 3

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def _usable_length(sentence: str) -> bool:
    return 15 <= len(sentence) <= 250


def held_out_paragraphs() -> list:
    """Sentence lists of the first few paragraphs of every held-out document (never trained on)."""
    paragraphs = []
    for text in demo_corpus.texts("validation") + demo_corpus.texts("test"):
        for paragraph in text.split("\n\n")[:_PARAGRAPHS_PER_DOCUMENT]:
            sentences = _SENTENCE_END.split(" ".join(paragraph.split()))
            if sentences and sentences[0]:
                paragraphs.append(sentences)
    return paragraphs


def cloze_items(paragraphs: list, seed: int = 0, limit: int = ITEMS_PER_TASK) -> list:
    blanks = []  # (context, true word, final punctuation)
    for sentences in paragraphs:
        for index, sentence in enumerate(sentences):
            match = _LAST_WORD.match(sentence)
            if _usable_length(sentence) and match:
                context = " ".join(sentences[max(0, index - 2) : index] + [match.group(1)])
                blanks.append((context, match.group(2), match.group(3)))
    rng = random.Random(seed)
    words = sorted({word for _, word, _ in blanks})
    items = []
    for context, word, stop in rng.sample(blanks, min(limit, len(blanks))):
        distractors = rng.sample([w for w in words if w.lower() != word.lower()], 3)
        choices = [w + stop for w in distractors + [word]]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(word + stop)})
    return items


def order_items(paragraphs: list, seed: int = 0, limit: int = ITEMS_PER_TASK) -> list:
    pairs = [(a, b) for sentences in paragraphs for a, b in zip(sentences, sentences[1:])
             if _usable_length(a) and _usable_length(b)]
    rng = random.Random(seed)
    items = []
    for first, second in rng.sample(pairs, min(limit, len(pairs))):
        choices = [f"{first} {second}", f"{second} {first}"]
        label = rng.randrange(2)
        if label:
            choices.reverse()
        items.append({"context": "Text:", "choices": choices, "label": label})
    return items


def write_tasks(folder: str) -> None:
    """Write both tasks' jsonl and YAML into `folder` (lm-eval's include_path)."""
    paragraphs = held_out_paragraphs()
    for name, items in (("demo_cloze", cloze_items(paragraphs)), ("demo_order", order_items(paragraphs))):
        path = os.path.join(folder, f"{name}.jsonl")
        results.write_if_changed(path, "".join(json.dumps(item) + "\n" for item in items))
        results.write_if_changed(os.path.join(folder, f"{name}.yaml"), _YAML.format(name=name, path=json.dumps(path)))
