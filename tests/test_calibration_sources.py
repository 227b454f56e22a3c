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
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 3
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
