"""The answers task (sleb/questions.py through lm-eval's generate_until) and agreement with the dense model."""

import json

import pytest

from clitools import invoke, run
from sleb import agreement, questions
from sleb.questions.scoring import tokens


ITEMS = {item["question"]: item for item in questions.items()}

# (question, reply, right?): each a rule of sleb/questions/scoring.py. The first ones the scoring before
# is_right(item, reply) got wrong (it credited the reply, or refused a valid answer).
RULES = [
    # a copy of the question is no answer
    ("Repeat this word exactly: apple", "Repeat this word exactly: apple", False),
    ("What is the first item in this list: red, green, blue?", "red, green, blue", False),
    ("What is the first item in this list: one, two, three?", "One, two, three.", False),
    # case where the question asks for it
    ("Write the word 'cat' in capital letters.", "cat", False),
    ("Write the word 'cat' in capital letters.", "Cat", False),
    # a number is a whole number: not in a decimal, a time, a longer number or a list
    ("What is half of 10?", "2.5", False),
    ("What is 3 times 4?", "12:00", False),
    ("What is 3 times 4?", "1,2", False),
    ("What is 3 times 4?", "112", False),
    ("How many legs does a dog have?", "1, 2, 3, 4", False),
    ("How many legs does a dog have?", "twenty-four", False),
    ("How many meters are in a kilometer?", "ten thousand", False),
    # a letter or a common word only where it stands as the answer
    ("What is the first letter of the English alphabet?", "A dog is a friend.", False),
    ("What is the opposite of 'yes'?", "There is no opposite.", False),
    ("Complete the saying: Two heads are better than ...", "one of them", False),
    # every valid answer: other opposites, other names, accents, number words for arithmetic
    ("What is the opposite of 'old'?", "new", True),
    ("What is the opposite of 'hard'?", "The opposite of hard is easy.", True),
    ("What is the opposite of 'light'?", "heavy", True),
    ("What is the capital of Ukraine?", "Kiev.", True),
    ("What is the capital of India?", "Delhi", True),
    ("What is the capital of Colombia?", "Bogotá", True),
    ("What is 6 times 7?", "Forty-two.", True),
    ("What is 12 times 12?", "one hundred and forty-four", True),
    ("What is the chemical symbol for water?", "H₂O", True),
    # answers the scoring before got right too
    ("Repeat this word exactly: apple", "apple", True),
    ("Repeat this word exactly: apple", "Sure: apple", True),
    ("What is the first item in this list: red, green, blue?", "The first item is red.", True),
    ("Write the word 'cat' in capital letters.", "Here it is: 'CAT'.", True),
    ("What is half of 10?", "Half of 10 is 5.", True),
    ("What is 3 times 4?", "3 times 4 is 12", True),
    ("How many meters are in a kilometer?", "There are 1,000 meters in a kilometer.", True),
    ("What is the first letter of the English alphabet?", "The first letter is A.", True),
    ("What is the first letter of the English alphabet?", "A is the first letter.", True),
    ("What is the opposite of 'yes'?", "The opposite of 'yes' is 'no'.", True),
    ("What is the capital of Colombia?", "Bogota", True),
    ("What is the capital of France?", "Parisian food", False),
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City.", True),
    ("What is the capital of Mexico?", "Mexico", False),
    ("Which season comes after summer?", "The season after summer is the fall season.", True),
]


@pytest.mark.parametrize("question, reply, right", RULES)
def test_each_scoring_rule(question, reply, right):
    assert questions.is_right(ITEMS[question], reply) is right


def test_the_question_set_is_large_and_no_question_holds_its_own_answer_but_the_copy_instructions():
    items = questions.items()
    assert len(items) >= 300 and len({item["question"] for item in items}) == len(items)
    assert {item["kind"] for item in items} >= {"capital", "arithmetic", "unit", "opposite", "saying", "instruction"}
    holding = [item["question"] for item in items
               if any(set(tokens(answer, item["case"])) <= set(tokens(item["question"], item["case"]))
                      for answer in item["answers"])]
    assert holding and all(q.startswith(("Repeat this word", "What is the first item")) for q in holding), holding
    assert questions.digest() == questions.digest() and len(questions.digest()) == 16


def test_every_accepted_answer_is_right_alone_and_in_a_sentence():
    for item in questions.items():
        for answer in item["answers"]:
            assert questions.is_right(item, answer), (item["question"], answer)
            assert questions.is_right(item, f"The answer is {answer}."), (item["question"], answer)


DEGENERATE = {
    "echoes the question": lambda item: item["question"],
    "echoes it twice": lambda item: f"{item['question']} {item['question']}",
    "counts to 4000": lambda item: ", ".join(str(i) for i in range(4000)),
    "says halves": lambda item: " ".join(f"{i}.5" for i in range(4000)),
    "tells times": lambda item: " ".join(f"{i}:00" for i in range(4000)),
    "answers in lower case": lambda item: " ".join(answer.lower() for answer in item["answers"]),
    "talks without answering": lambda item: "There is no simple answer; a good one needs a lot of thought.",
}


@pytest.mark.parametrize("replier", DEGENERATE)
def test_a_degenerate_model_gets_nothing_right(replier):
    items = questions.items()
    if replier == "answers in lower case":
        items = [item for item in items if item["case"]]
    right = [item["question"] for item in items if questions.is_right(item, DEGENERATE[replier](item))]
    assert right == []


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
    # nothing removed: the same replies, word for word, as the dense reference gave (greedy, same prompts)
    assert record["zeroshot"]["replies"] == record["answers_dense"]["replies"] and len(record["zeroshot"]["replies"]["answers"]) == 4
    assert _rescored(record) == record["answers_kept"]["answers"]["kept"]
    pruned = invoke("eval", *args, "--removal_list", "[1, 2, 3]", "--result_file", "pruned.json")
    assert pruned.returncode == 0, pruned.stderr[-1500:]
    record = json.loads((tmp_path / "pruned.json").read_text())
    assert record["agreement"]["overall"] < 1.0 and record["zeroshot"]["replies"] != record["answers_dense"]["replies"]
    assert _rescored(record) == record["answers_kept"]["answers"]["kept"]
    assert record["zeroshot"]["question_set"] == questions.digest()


def _rescored(record: dict) -> int:
    """Answers kept counted again from the record's own replies: right for the dense model and for this one."""
    items = questions.items()

    def right(replies):
        return {i for i, reply in replies["answers"].items() if questions.is_right(items[int(i)], reply)}
    return len(right(record["answers_dense"]["replies"]) & right(record["zeroshot"]["replies"]))


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
    # compared with the dense model its card names, which answered first: the same replies as eval from it gives
    assert "loading the dense model" in answered.stdout and _rescored(record) == record["answers_kept"]["answers"]["kept"]
    unreadable = run("eval", "--model_name", str(saved), "--dense_model", str(tmp_path / "nowhere"), "--eval_ppl",
                     "False", "--eval_zeroshot", "True", "--tasks", "answers", "--result_folder", str(tmp_path / "no"))
    assert unreadable.returncode == 2 and len(unreadable.stderr.strip().splitlines()) == 1
    assert "cannot be read" in unreadable.stderr and not (tmp_path / "no").exists()
    direct = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[4, 1]", "--eval_ppl", "False",
                    "--eval_zeroshot", "True", "--tasks", "answers", "--limit", "4", "--result_folder", str(tmp_path),
                    "--result_file", "direct.json")
    assert direct.returncode == 0, direct.stderr[-1500:]
    direct = json.loads((tmp_path / "direct.json").read_text())
    for key in ("answers_dense", "zeroshot"):
        assert record[key]["replies"] == direct[key]["replies"]
