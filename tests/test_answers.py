"""The answers task (sleb/questions.py through lm-eval's generate_until) and agreement with the dense model."""

import json

from clitools import invoke, run
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


def test_a_pruned_checkpoint_is_not_compared_with_itself_as_if_dense(model_dirs, text_file, tmp_path):
    """KL, agreement and answers kept compare with the dense model; a checkpoint sleb pruned is not it (they
    read 0, 100% and all kept against itself)."""
    saved = tmp_path / "pruned"
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[4, 1]", "--eval_ppl", "False",
                 "--save_model", str(saved), "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr[-1500:]
    for flags in (["--eval_kl", "True", "--ppl_datasets", f"file:{text_file}", "--seqlen", "32"],
                  ["--eval_agreement", "2", "--eval_ppl", "False"]):
        refused = run("eval", "--model_name", str(saved), *flags, "--result_folder", str(tmp_path / "no"))
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            f"error: {flags[0]} compares with the dense model, and {str(saved)!r} is already pruned; evaluate from "
            f"the dense one: --model_name {model_dirs['llama']} --removal_list '[4, 1]'"]
        assert not (tmp_path / "no").exists()
    answered = invoke("eval", "--model_name", str(saved), "--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks",
                      "answers", "--limit", "4", "--result_folder", str(tmp_path), "--result_file", "answers.json")
    assert answered.returncode == 0, answered.stderr[-1500:]
    record = json.loads((tmp_path / "answers.json").read_text())
    assert record["zeroshot"]["tasks"]["answers"]["acc"] is not None and "answers_kept" not in record
