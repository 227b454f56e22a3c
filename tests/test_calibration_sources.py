"""Calibration that fits the model: `--dataset self` (text the dense model samples, cached and recorded) and
`file:X.jsonl` conversations in a `messages` field (rendered by the tokenizer's chat template), for the
search, compensation and healing."""

import json
import re

import pytest

import sleb
from clitools import invoke
from sleb import data, demo_corpus, self_text
from sleb.errors import UsageError

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SLEB_CACHE", str(folder))
    return folder


def test_self_text_is_sampled_once_cached_and_recorded_for_search_compensation_and_healing(cache, tmp_path):
    common = ["--model_name", "demo", "--dataset", "self", "--nsamples", "3", "--seqlen", "64",
              "--result_folder", str(tmp_path)]
    searched = invoke("sleb", *common, "--num_remove_blocks", "1", "--eval_ppl", "False", "--compensate", "linear",
                      "--result_file", "s.json")
    assert searched.returncode == 0, searched.stderr[-2000:]
    cached = list((cache / "self_text").iterdir())
    assert len(cached) == 1 and len(self_text._read(str(cached[0]))[0]) == 3
    sampled_at = cached[0].stat().st_mtime_ns
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["settings"]["dataset"] == "self" and record["calibration_windows"] >= 3
    assert record["compensation"]["runs"]  # the map was fitted on the sampled text

    model, tokenizer = sleb.load("demo", dtype="float32", device="cpu")
    texts = self_text.texts(model, tokenizer, 3, seed=0, log=lambda *a: None)
    assert cached[0].stat().st_mtime_ns == sampled_at  # read from the cache, not sampled and written again
    windows = sleb.calibration_windows(tokenizer, "self", 3, 64, model=model)
    assert windows.shape[0] == record["calibration_windows"]  # the search calibrated on exactly this text
    # a base model continues openings of the demo corpus: three distinct texts, each well past its opening
    openings = [" ".join(text.split())[:80] for text in demo_corpus.texts("train")]
    assert len(set(texts)) == 3 and all(any(t.startswith(o) for o in openings) and len(t) > 300 for t in texts)

    healed = invoke("sleb.heal", *common, "--removal_list", "[3]", "--max_steps", "2", "--train_batch_size", "2",
                    "--grad_accum", "1", "--logging_steps", "1", "--eval_ppl", "False",
                    "--output_dir", str(tmp_path / "healed"), "--result_file", "h.json")
    assert healed.returncode == 0, healed.stderr[-2000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["settings"]["dataset"] == "self" and record["train_windows"] == windows.shape[0]
    assert len(list((cache / "self_text").iterdir())) == 1  # healing sampled nothing new


def test_self_text_is_sampled_in_batches_and_a_killed_run_resumes_to_the_same_texts(model_dirs, cache):
    model, tokenizer = sleb.load(model_dirs["llama"], dtype="float32", device="cpu")
    whole = self_text.texts(model, tokenizer, 6, seed=1, log=lambda *a: None, batch=2)
    path = self_text.cache_path(model, tokenizer, 6, 1, batch=2)
    lines = open(path).read().splitlines()
    assert len(whole) == 6 and len(set(whole)) == 6
    assert [json.loads(line)["batch"] for line in lines] == [0, 1, 2]  # one generate call per 2 texts
    with open(path, "w") as handle:  # killed after its first batch
        handle.write(lines[0] + "\n")
    assert self_text.texts(model, tokenizer, 6, seed=1, log=lambda *a: None, batch=2) == whole
    assert open(path).read().splitlines() == lines  # the first batch read back, the other two sampled again
    other = self_text.texts(model, tokenizer, 6, seed=2, log=lambda *a: None, batch=2)
    assert not set(other) & set(whole)  # another seed samples other texts, into another file


def test_a_chat_model_writes_requests_when_the_fixed_ones_run_out(model_dirs, cache):
    """Past the 48 fixed requests the model is asked for lists of questions; a tiny random model writes none
    that pass, so after three fruitless rounds the fixed requests are asked again (with other samples)."""
    from transformers import AutoTokenizer

    model, _ = sleb.load(model_dirs["llama"], dtype="float32", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    tokenizer.chat_template = CHAT_TEMPLATE
    count = len(self_text.REQUESTS) + 4
    made = self_text.texts(model, tokenizer, count, seed=0, log=lambda *a: None, batch=16)
    entries = [json.loads(line) for line in open(self_text.cache_path(model, tokenizer, count, 0, 16))]
    assert [entry["requests"] for entry in entries if "requests" in entry] == [[], [], []]
    assert made[len(self_text.REQUESTS)].startswith(self_text._render(tokenizer, self_text.REQUESTS[0]))
    assert made[len(self_text.REQUESTS)] != made[0]  # the same request, another sample


def test_written_questions_are_read_from_a_numbered_list():
    reply = ("Here are five questions:\n1. How do I bake bread at home?\n2) What is yeast?\n3. Why does dough "
             "rise in a warm room?\nI hope this helps.\n4. Bread\n5. **Which flour makes the softest bread?**")
    assert self_text._listed(reply) == ["How do I bake bread at home?", "Why does dough rise in a warm room?",
                                        "Which flour makes the softest bread?"]  # under 4 words, or no list: no
    asked = ["How do I bake bread at home?", "How do you bake bread at home?",
             "Which vegetables grow well in a small garden?", "Explain how a bicycle works!"]
    # the second nearly repeats the first, the last a fixed request
    assert self_text._novel(asked, list(self_text.REQUESTS)) == ["How do I bake bread at home?",
                                                                 "Which vegetables grow well in a small garden?"]


def test_self_text_is_not_an_evaluation_set(tmp_path):
    out = invoke("eval", "--model_name", "demo", "--ppl_datasets", "self", "--result_folder", str(tmp_path))
    assert out.returncode == 2 and "--dataset self" in out.stderr and "Traceback" not in out.stderr


def _conversations(path, count=40):
    rows = [{"messages": [{"role": "user", "content": f"what is word {i} ?"},
                          {"role": "assistant", "content": f"word {i} is the {i} th word of the list ."}]}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return f"file:{path}"


def test_messages_are_rendered_by_the_chat_template(model_dirs, tmp_path):
    from transformers import AutoTokenizer

    name = _conversations(tmp_path / "chat.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    with pytest.raises(UsageError, match="no chat template"):
        data.calibration_text(name, 10, 0, tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    text = data.calibration_text(name, 10, 0, tokenizer)
    assert text.count("user :") == 10 and text.count("assistant :") == 10 and "messages" not in text
    first = text.split("\n")[0].strip()
    assert re.fullmatch(r"<s> user : what is word (\d+) \? </s>", first), first
    windows = sleb.calibration_windows(tokenizer, name, 10, 16)
    assert windows.shape[1] == 16 and windows.numel() >= len(tokenizer(text).input_ids) - 16


def test_a_search_calibrates_on_conversations(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "chat_model"
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    tokenizer.chat_template = CHAT_TEMPLATE
    AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    name = _conversations(tmp_path / "chat.jsonl")
    out = invoke("sleb", "--model_name", str(folder), "--dataset", name, "--nsamples", "40", "--seqlen", "32",
                 "--num_remove_blocks", "2", "--eval_ppl", "False", "--result_folder", str(tmp_path),
                 "--result_file", "s.json")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "s.json").read_text())
    model, loaded = sleb.load(str(folder), dtype="float32", device="cpu")
    windows = sleb.calibration_windows(loaded, name, 40, 32)
    assert record["calibration_windows"] == len(windows)
    assert sleb.search(model, windows, 2, progress=False).removal_list == record["search"]["removal_list"]
