"""Offline zero-shot tasks built from the held-out (validation and test) splits of the demo corpus.

- demo_cloze: a docstring sentence with its last word cut off, after the sentences before it; pick
  the true word among 4 (the 3 distractors are last words of other held-out sentences, so their
  frequencies match the answers' and only the context tells them apart).
- demo_order: two consecutive sentences of a docstring, in their true order versus swapped.

A next-sentence task (pick a document's second sentence among 4) was tried first and dropped: the
dense demo model scored 0.25 on it, chance, because a generic distractor outscores any specific
true sentence; with mutual-information scoring it reached only 0.35.

- answers: the short questions of sleb/questions.py, answered greedily (lm-eval's generate_until, up to
  ANSWER_TOKENS tokens, through the tokenizer's chat template where it has one); right when an accepted
  answer appears in the reply (sleb.questions.is_right, lm-eval's `process_results` hook).

Each task is a jsonl plus an lm-eval YAML written to a cache folder and registered with
`lm_eval.tasks.TaskManager(include_path=...)`. The items are deterministic for a Python version.
"""

import json
import os
import random
import re
import sys

from sleb import demo_corpus, results

TASKS = ("demo_cloze", "demo_order", "answers")
GENERATIVE = ("answers",)  # answered by generation, through the chat template where the tokenizer has one
ANSWER_TOKENS = 32
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


_ANSWERS_YAML = """task: answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: "{{{{answers[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {tokens}
  do_sample: false
process_results: !function answers_scoring.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
_ANSWERS_SCORING = """from sleb.questions import is_right


def process_results(doc, results):
    return {"acc": float(is_right(results[0], doc["answers"]))}
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


def task_folder() -> str:
    base = os.environ.get("SLEB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sleb"))
    return os.path.join(base, f"lm_eval_tasks-py{sys.version_info.major}.{sys.version_info.minor}")


def write_tasks(folder: str = None) -> str:
    """Write both tasks' jsonl and YAML; return the folder to pass as include_path."""
    folder = folder or task_folder()
    os.makedirs(folder, exist_ok=True)
    paragraphs = held_out_paragraphs()
    for name, items in (("demo_cloze", cloze_items(paragraphs)), ("demo_order", order_items(paragraphs))):
        path = os.path.join(folder, f"{name}.jsonl")
        _write_if_changed(path, "".join(json.dumps(item) + "\n" for item in items))
        _write_if_changed(os.path.join(folder, f"{name}.yaml"), _YAML.format(name=name, path=json.dumps(path)))
    from sleb import questions

    path = os.path.join(folder, "answers.jsonl")
    _write_if_changed(path, "".join(json.dumps(item) + "\n" for item in questions.items()))
    _write_if_changed(os.path.join(folder, "answers.yaml"),
                      _ANSWERS_YAML.format(path=json.dumps(path), tokens=ANSWER_TOKENS))
    _write_if_changed(os.path.join(folder, "answers_scoring.py"), _ANSWERS_SCORING)
    return folder


def _write_if_changed(path: str, text: str) -> None:
    """Atomic write, skipped when the file already holds `text`: an unchanged file keeps its
    modification time, so `datasets` reuses its cached copy instead of adding one per run."""
    try:
        with open(path) as handle:
            if handle.read() == text:
                return
    except OSError:
        pass
    results.write_text(path, text)
