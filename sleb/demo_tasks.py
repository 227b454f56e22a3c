"""Offline zero-shot tasks built from the held-out (validation and test) splits of the demo corpus.

- demo_cloze: given a docstring's first sentence, pick its true next sentence among 4 (the 3
  distractors are second sentences of other documents).
- demo_order: given two consecutive sentences of a docstring, prefer them in their true order over
  swapped.

Each task is a jsonl plus an lm-eval YAML written to a cache folder and registered with
`lm_eval.tasks.TaskManager(include_path=...)`. The items are deterministic for a Python version.
"""

import json
import os
import random
import re
import sys

from sleb import demo_corpus

TASKS = ("demo_cloze", "demo_order")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

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
  version: 1.0
"""


def sentence_pairs() -> list:
    """(first sentence, second sentence) of each held-out document whose opening has two plain sentences.

    The demo model never trained on these splits."""
    pairs = []
    for text in demo_corpus.texts("validation") + demo_corpus.texts("test"):
        paragraph = " ".join(text.split("\n\n")[0].split())
        sentences = _SENTENCE_END.split(paragraph)
        if len(sentences) >= 2 and all(15 <= len(s) <= 250 for s in sentences[:2]):
            pairs.append((sentences[0], sentences[1]))
    return pairs


def cloze_items(pairs: list, seed: int = 0) -> list:
    rng = random.Random(seed)
    items = []
    for index, (first, second) in enumerate(pairs):
        others = [pairs[i][1] for i in rng.sample(range(len(pairs)), 4) if i != index][:3]
        choices = others + [second]
        rng.shuffle(choices)
        items.append({"context": first, "choices": choices, "label": choices.index(second)})
    return items


def order_items(pairs: list, seed: int = 0) -> list:
    rng = random.Random(seed)
    items = []
    for first, second in pairs:
        choices = [f"{first} {second}", f"{second} {first}"]
        label = rng.randrange(2)
        if label:
            choices.reverse()
        items.append({"context": "Text:", "choices": choices, "label": label})
    return items


def task_folder() -> str:
    base = os.environ.get("SLEB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sleb"))
    return os.path.join(base, f"lm_eval_tasks-py{sys.version_info.major}.{sys.version_info.minor}")


def write_tasks(folder: str = None) -> str:
    """Write both tasks' jsonl and YAML; return the folder to pass as include_path."""
    folder = folder or task_folder()
    os.makedirs(folder, exist_ok=True)
    pairs = sentence_pairs()
    for name, items in (("demo_cloze", cloze_items(pairs)), ("demo_order", order_items(pairs))):
        path = os.path.join(folder, f"{name}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in items)
        os.replace(tmp, path)
        with open(os.path.join(folder, f"{name}.yaml"), "w") as handle:
            handle.write(_YAML.format(name=name, path=json.dumps(path)))
    return folder
