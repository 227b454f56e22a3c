"""How the scoring of sleb/questions/ changes what counts as the dense model's right answers.

    python -m bench.answers_rescore [--study docs/real_model] [--before 80a1079]

Reads the dense model's replies that the real-model study keeps (dense_zeroshot.json: lm-eval's greedy replies
to today's questions), and from git at `--before` (the commit before is_right(item, reply)) the scoring then and
the dense model's right answers then, measured on the same GGUF. For the questions asked in the same words
then and now, the reply is the same (greedy, same prompt): the old rule applied to today's reply must give the
right answers recorded then, which this checks, and every change is the rule's. The questions rewritten (their
answer stood in their own text) are counted apart. Prints one JSON object.
"""

import importlib.util
import json
import os
import subprocess
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import command
from sleb import questions
from sleb.errors import UsageError


def _at(commit: str, path: str) -> str:
    found = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, cwd=ROOT)
    if found.returncode:
        raise UsageError(f"cannot read {path} at {commit}: {found.stderr.strip()}")
    return found.stdout


def _old_scoring(commit: str):
    """The questions module as it was at `commit` (its items() and is_right(reply, answers))."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "questions_before.py")
        with open(path, "w") as handle:
            handle.write(_at(commit, "sleb/questions.py"))
        spec = importlib.util.spec_from_file_location("questions_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def main(study: str = os.path.join(ROOT, "docs", "real_model"), before: str = "80a1079"):
    dense = json.load(open(os.path.join(study, "dense_zeroshot.json")))
    if dense["key"].get("question_set") != questions.digest():
        raise UsageError(f"{study}/dense_zeroshot.json was not measured on today's questions; run bench.real_model")
    replies = {int(i): reply for i, reply in dense["value"]["replies"]["answers"].items()}
    right_now = set(dense["value"]["right"]["answers"])
    old = _old_scoring(before)
    right_then = set(json.loads(_at(before, "docs/real_model/dense_zeroshot.json"))["value"]["right"]["answers"])
    now, then = questions.items(), old.items()
    same = [item for item in now if then[item["id"]]["question"] == item["question"]]
    rewritten = [item for item in now if then[item["id"]]["question"] != item["question"]]
    old_rule = {item["id"] for item in same if old.is_right(replies[item["id"]], then[item["id"]]["answers"])}
    reproduced = old_rule == right_then & {item["id"] for item in same}
    lost = sorted(old_rule - right_now)
    gained = sorted({item["id"] for item in same} & right_now - old_rule)
    report = {
        "question_set": questions.digest(), "before": before, "dense_right_then": len(right_then),
        "dense_right_now": len(right_now), "questions": len(now), "asked_the_same": len(same),
        "old_rule_on_todays_replies_reproduces_then": reproduced,
        "no_longer_credited": [{"id": i, "question": now[i]["question"], "reply": replies[i]} for i in lost],
        "credited_now_not_then": [{"id": i, "question": now[i]["question"], "reply": replies[i]} for i in gained],
        "rewritten": {"count": len(rewritten), "right_then": len(right_then & {item["id"] for item in rewritten}),
                      "right_now": len(right_now & {item["id"] for item in rewritten})}}
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    command(main)
