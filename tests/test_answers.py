"""The answers task (sleb/questions.py through lm-eval's generate_until) and agreement with the dense model."""

import json

from clitools import invoke
from sleb import agreement, questions


def test_the_question_set_is_large_and_its_matching_is_by_whole_words():
    items = questions.items()
    assert len(items) >= 300 and len({item["question"] for item in items}) == len(items)
    assert {item["kind"] for item in items} >= {"capital", "arithmetic", "unit", "opposite", "saying", "instruction"}
    assert questions.is_right("The capital of France is Paris.", ["Paris"])
    assert questions.is_right("There are 1,000 meters in a kilometer.", ["1000"])
    assert not questions.is_right("Parisian food", ["Paris"]) and not questions.is_right("112", ["12"])


def test_agreement_counts_the_prefix_before_the_first_divergence_and_every_position():
    found = agreement.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert found["prefix_mean"] == (2 + 4) / 2 and found["overall"] == 7 / 8 and found["prompts"] == 2


def test_eval_reports_answers_kept_and_agreement(model_dirs, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks",
            "answers", "--limit", "4", "--eval_agreement", "2", "--result_folder", str(tmp_path)]
    dense = invoke("eval", *args, "--result_file", "dense.json")
    assert dense.returncode == 0, dense.stderr[-1500:]
    record = json.loads((tmp_path / "dense.json").read_text())
    assert record["agreement"]["prefix_mean"] == agreement.NEW_TOKENS and record["agreement"]["overall"] == 1.0
    kept = record["answers_kept"]["answers"]
    assert kept["kept"] == kept["dense_right"] and kept["lost"] == []  # nothing removed, nothing lost
    pruned = invoke("eval", *args, "--removal_list", "[1, 2, 3]", "--result_file", "pruned.json")
    assert pruned.returncode == 0, pruned.stderr[-1500:]
    record = json.loads((tmp_path / "pruned.json").read_text())
    assert record["agreement"]["overall"] < 1.0 and record["zeroshot"]["tasks"]["answers"]["acc"] is not None
