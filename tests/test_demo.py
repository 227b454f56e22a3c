"""The built-in demo corpus and the shipped demo model: offline, stable, as documented."""

import os
import re

import pytest

from sleb import data, demo_corpus
from sleb.models import DEMO_MODEL_DIR, load_model
from sleb.ppl import perplexity


def test_demo_splits_are_disjoint_and_stable():
    names = {split: {doc.name for doc in demo_corpus.documents(split)} for split in demo_corpus.SPLITS}
    assert not names["train"] & names["validation"] and not names["train"] & names["test"]
    assert not names["validation"] & names["test"]
    assert len(names["train"]) > 10 * len(names["test"]) > 0
    demo_corpus.all_documents.cache_clear()
    rebuilt = {split: {doc.name for doc in demo_corpus.documents(split)} for split in demo_corpus.SPLITS}
    assert rebuilt == names
    assert all(demo_corpus.split_of(name) == "test" for name in names["test"])


def test_demo_model_loads_by_alias_and_path_with_its_card_perplexity():
    from transformers import AutoModelForCausalLM

    card = open(os.path.join(DEMO_MODEL_DIR, "README.md")).read()
    stated = float(re.search(r"Test perplexity.*?\*\*([0-9.]+)\*\*", card, re.S).group(1))
    model, tokenizer = load_model("demo", dtype="float32", device="cpu")
    assert model.config.num_hidden_layers >= 12
    assert AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).config.num_hidden_layers == model.config.num_hidden_layers
    windows = data.load_eval_windows("demo", tokenizer, seqlen=model.config.max_position_embeddings)
    assert perplexity(model, windows, batch_size=4) == pytest.approx(stated, rel=0.01)


def test_demo_tasks_are_stable_and_well_formed():
    from sleb import demo_tasks

    paragraphs = demo_tasks.held_out_paragraphs()
    cloze = demo_tasks.cloze_items(paragraphs)
    order = demo_tasks.order_items(paragraphs)
    assert cloze == demo_tasks.cloze_items(demo_tasks.held_out_paragraphs())
    assert len(cloze) == len(order) == demo_tasks.ITEMS_PER_TASK
    held_out = " ".join(" ".join(text.split()) for split in ("validation", "test") for text in demo_corpus.texts(split))
    for item in cloze:
        answer = item["choices"][item["label"]]
        assert len(set(choice.lower() for choice in item["choices"])) == 4
        assert f"{item['context']} {answer}" in held_out  # the true word completes a held-out sentence
    for item in order:
        first, second = item["choices"][item["label"]], item["choices"][1 - item["label"]]
        assert first != second and f" {first} " in f" {held_out} "
