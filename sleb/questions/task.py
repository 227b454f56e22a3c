"""The `answers` lm-eval task: the questions of question_set.py, answered greedily (lm-eval's generate_until,
up to ANSWER_TOKENS tokens, through the tokenizer's chat template where it has one) and scored by scoring.py
through lm-eval's `process_results` hook. Written, with the offline demo tasks, to the folder lm-eval's
TaskManager is given as include_path."""

import json
import os

from sleb import results
from sleb.questions.question_set import items

TASKS = ("answers",)
ANSWER_TOKENS = 32

_YAML = """task: answers
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
  version: 2.0
"""
_SCORING = """from sleb.questions import is_right


def process_results(doc, results):
    return {"acc": float(is_right(doc, results[0]))}
"""


def write_task(folder: str) -> None:
    """The questions' jsonl, the task's YAML and its scoring hook, into `folder`."""
    path = os.path.join(folder, "answers.jsonl")
    results.write_if_changed(path, "".join(json.dumps(item) + "\n" for item in items()))
    results.write_if_changed(os.path.join(folder, "answers.yaml"),
                             _YAML.format(path=json.dumps(path), tokens=ANSWER_TOKENS))
    results.write_if_changed(os.path.join(folder, "answers_scoring.py"), _SCORING)
