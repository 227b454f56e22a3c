"""Healing with LoRA: training lowers the loss, the merged checkpoint reloads to the peft model's logits,
kill -9 then resume finishes, bad input is one line, and saved checkpoints carry a model card."""

import importlib.util
import json
import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from clitools import invoke, run, start
import sleb
from sleb import blocks, checkpoint
from sleb.recovery import lora
from sleb.settings import HealSettings
from sleb.model_card import read_card
from sleb.models import load_model


def _heal_args(model_dir, text_file, tmp_path, *extra):
    return ["--model_name", model_dir, "--removal_list", "[2, 4]", "--dataset", f"file:{text_file}",
            "--nsamples", "300", "--seqlen", "32", "--ppl_datasets", f"file:{text_file}", "--eval_seqlen", "32",
            "--lr", "1e-2", "--warmup_steps", "2", "--train_batch_size", "4", "--grad_accum", "1",
            "--logging_steps", "2", "--output_dir", str(tmp_path / "healed"), "--result_folder", str(tmp_path),
            "--result_file", "h.json", *extra]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_heal_lowers_the_loss_and_saves_a_checkpoint_stock_transformers_loads(arch, model_dirs, text_file, tmp_path):
    out = invoke("sleb.heal", *_heal_args(model_dirs[arch], text_file, tmp_path, "--max_steps", "30"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    curve = [point["loss"] for point in record["loss_curve"]]
    assert len(curve) == 15 and curve[-1] < curve[0]
    name = f"file:{text_file}"
    assert record["ppl_healed"][name]["ppl"] < record["ppl_pruned"][name]["ppl"]
    assert record["ppl"] == record["ppl_healed"] and record["train_seconds"] > 0
    assert record["ppl_precision"] == "float32, before and after"  # like with like
    assert record["output_dir"] == str(tmp_path / "healed") and record["removal_list"] == [2, 4]
    assert os.path.getsize(record["loss_plot"]) > 1000
    expected = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}}[arch]
    assert set(record["lora_targets"]) == expected
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert healed.config.num_hidden_layers == 4
    card = read_card(str(tmp_path / "healed"))
    assert card["sleb_removal_list"] == [2, 4] and card["sleb_num_blocks"] == 6
    assert "python -m sleb.heal" in (tmp_path / "healed" / "README.md").read_text()
    assert not (tmp_path / "h_trainer").exists()  # the Trainer's checkpoints are gone once the merge is saved


def test_distillation_starts_at_the_mean_kl_to_dense_and_lowers_it(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    texts = open(text_file).read().splitlines()
    windows = sleb.calibration_windows(tokenizer, texts, nsamples=300, seqlen=32)[:4]
    dense = sleb.dense_distributions(model, windows, progress=False)
    sleb.remove_blocks(model, [2, 4])
    before = dense.mean_kl(model, progress=False)
    result = sleb.heal(model, windows=windows, objective="kl", dense=dense, lr=1e-2, warmup_steps=0, max_steps=12,
                       train_batch_size=2, grad_accum=2, logging_steps=1, lora_dropout=0.0)
    # Step 1 sees all 4 windows (2 x 2 accumulated) while the adapter is still zero: its loss is the pruned
    # model's mean KL per token, neither summed over the accumulation nor the cross-entropy.
    assert result.loss_curve[0]["loss"] == pytest.approx(before, rel=1e-3)
    assert dense.mean_kl(result.model, progress=False) < 0.7 * before
    with pytest.raises(sleb.UsageError, match="other windows"):
        sleb.heal(result.model, windows=windows[:2], objective="kl", dense=dense, max_steps=1)
    with pytest.raises(sleb.UsageError, match="pass dense="):
        sleb.heal(result.model, windows=windows, objective="kl", max_steps=1)


def test_full_training_of_the_blocks_before_each_run_changes_only_them_and_lowers_the_kl(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    texts = open(text_file).read().splitlines()
    windows = sleb.calibration_windows(tokenizer, texts, nsamples=300, seqlen=32)[:4]
    dense = sleb.dense_distributions(model, windows, progress=False)
    sleb.remove_blocks(model, [2, 4])  # kept 0, 1, 3, 5: "before" is blocks 1 and 3, positions 1 and 2
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kl_before = dense.mean_kl(model, progress=False)
    result = sleb.heal(model, windows=windows, objective="kl", dense=dense, train_blocks="before", lr=1e-3,
                       warmup_steps=0, max_steps=8, train_batch_size=2, grad_accum=2, logging_steps=1)
    assert result.targets == {"trained_blocks": [1, 3]}
    prefix = blocks.block_path(result.model)
    changed = {name for name, value in result.model.state_dict().items() if not torch.equal(value, before[name])}
    trained = {name for name in before if name.startswith((f"{prefix}.1.", f"{prefix}.2."))}
    assert changed == trained  # every parameter of those two blocks moved, nothing else did
    assert dense.mean_kl(result.model, progress=False) < 0.8 * kl_before
    assert all(p.requires_grad for p in result.model.parameters())
    with pytest.raises(sleb.UsageError, match="does not hold"):
        sleb.heal(result.model, windows=windows, train_blocks=[2], max_steps=1)
    with pytest.raises(sleb.UsageError, match="no LoRA adapter"):
        sleb.heal(result.model, windows=windows, train_blocks=[1], max_steps=1, adapter_dir="unused")


def test_heal_by_distillation_from_the_command_records_it(model_dirs, text_file, tmp_path):
    out = invoke("sleb.heal", *_heal_args(model_dirs["llama"], text_file, tmp_path, "--max_steps", "10",
                                          "--objective", "kl"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss: KL to the dense model" in out.stdout
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["settings"]["objective"] == "kl" and record["distilled_from"]["kl_vocabulary"] == "full"
    curve = [point["loss"] for point in record["loss_curve"]]
    assert curve[-1] < curve[0]
    assert "(distillation)" in (tmp_path / "healed" / "README.md").read_text()


def test_full_training_from_the_command_records_the_blocks_and_the_card_says_so(model_dirs, text_file, tmp_path):
    out = invoke("sleb.heal", *_heal_args(model_dirs["llama"], text_file, tmp_path, "--max_steps", "4",
                                          "--objective", "kl", "--train_blocks", "before", "--lr", "1e-3"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["trained_blocks"] == [1, 3] and "lora_targets" not in record
    card = (tmp_path / "healed" / "README.md").read_text()
    assert "every parameter of blocks [1, 3]" in card and "LoRA (peft)" not in card
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert healed.config.num_hidden_layers == 4


def test_local_reconstruction_then_distillation_records_both_and_refuses_what_it_cannot_do(model_dirs, text_file,
                                                                                            tmp_path):
    """--local_steps trains the block before each removed run first (on the training windows), then LoRA
    distils: the record's pruned perplexity is after the local stage, below plain removal's."""
    plain = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[2, 4]", "--ppl_datasets",
                   f"file:{text_file}", "--seqlen", "32", "--result_folder", str(tmp_path), "--result_file", "e.json")
    assert plain.returncode == 0, plain.stderr[-3000:]
    out = invoke("sleb.heal", *_heal_args(model_dirs["llama"], text_file, tmp_path, "--max_steps", "4",
                                          "--objective", "kl", "--local_steps", "30", "--local_lr", "1e-3"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    runs = record["compensation"]["runs"]
    assert record["compensation"]["method"] == "local" and [(t["run"], t["before"]) for t in runs] == [([2], 1),
                                                                                                     ([4], 3)]
    assert all(t["error_trained"] < t["error_removed"] for t in runs)
    plain_ppl = json.loads((tmp_path / "e.json").read_text())["ppl"]
    key = next(iter(plain_ppl))
    assert record["ppl_pruned"][key]["ppl"] < plain_ppl[key]["ppl"]  # measured after the local stage
    card = (tmp_path / "healed" / "README.md").read_text()
    assert "## Before training" in card and "local reconstruction" in card
    pruned = tmp_path / "pruned"
    assert invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[2]", "--eval_ppl", "False",
                  "--save_model", str(pruned), "--result_folder", str(tmp_path)).returncode == 0
    for model, flags, message in ((str(pruned), [], "this model's are gone"),
                                  (model_dirs["llama"], ["--removal_list", "[0]"], "block 0 has none")):
        refused = invoke("sleb.heal", "--model_name", model, *flags, "--local_steps", "5", "--output_dir",
                         str(tmp_path / "refused"), "--result_folder", str(tmp_path / "refused_results"))
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_merged_checkpoint_reloads_to_the_peft_models_logits(model_dirs, text_file, tmp_path):

    settings = HealSettings(model_name=model_dirs["llama"], removal_list=[1], dataset=f"file:{text_file}",
                                 nsamples=200, seqlen=32, lr=1e-2, max_steps=8, warmup_steps=0, train_batch_size=4,
                                 grad_accum=1, logging_steps=4, output_dir=str(tmp_path / "out"))
    settings.check()
    model, tokenizer = load_model(model_dirs["llama"], device="cpu")
    blocks.remove_blocks(model, [1])
    windows = sleb.calibration_windows(tokenizer, settings.dataset, settings.nsamples, settings.seqlen, model=model)
    peft_model = lora.train(model, windows, settings.recipe(), str(tmp_path / "work")).peft_model
    ids = windows[:1]
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = lora.merge(peft_model)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        checkpoint.save(merged, tokenizer, str(tmp_path / "out"))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        # The LoRA moved the weights: the merged model is not the pruned one.
        pruned, _ = load_model(model_dirs["llama"], device="cpu")
        blocks.remove_blocks(pruned, [1])
        assert not torch.allclose(pruned(input_ids=ids).logits, adapted, atol=1e-3)


def test_kill_then_resume_finishes_with_a_merged_checkpoint(model_dirs, text_file, tmp_path):
    args = _heal_args(model_dirs["llama"], text_file, tmp_path, "--max_steps", "40", "--save_steps", "5",
                      "--eval_ppl", "False")
    process = start("sleb.heal", *args)
    work = tmp_path / "h_trainer"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (work / "checkpoint-10").is_dir():
            break
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "healed").exists() and not (tmp_path / "h.json").exists()

    resumed = invoke("sleb.heal", *args, "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    steps = [point["step"] for point in record["loss_curve"]]
    assert steps[-1] == 40 and steps[0] == 2  # the curve runs from before the kill to the end
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "healed").config.num_hidden_layers == 4


def test_resume_steps_over_a_checkpoint_killed_while_written(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text('{"log_hist')  # cut off mid-write
    assert lora.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert lora.last_complete_checkpoint(str(tmp_path / "none")) is None


BAD = [
    (["--removal_list", None], "not a pruned model"),
    (["--dataset", "nowhere"], "unknown data set"),
    (["--dataset", "file:EMPTY"], "fewer than one window"),
    (["--lr", "0"], "--lr must be positive"),
    (["--output_dir", "FULL"], "not empty"),
    (["--removal_list", "[]"], "nothing to heal"),
    (["--resume", "True"], "no complete Trainer checkpoint"),
    (["--objective", "mse"], "--objective must be ce"),
    (["--kl_top_k", "8"], "apply to --objective kl"),
    (["--train_blocks", "[4]"], "does not hold"),
    (["--train_blocks", "after"], "--train_blocks must be a list"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(override, message, model_dirs, text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    args = _heal_args(model_dirs["llama"], text_file, tmp_path / "results", "--max_steps", "2")
    name, value = override
    index = args.index(name) if name in args else None
    if value is None:
        del args[index : index + 2]
    else:
        value = value.replace("EMPTY", str(empty)).replace("FULL", str(full))
        if index is None:
            args += [name, value]
        else:
            args[index + 1] = value
    out = run("sleb.heal", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], out.stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists() or not [p for p in (tmp_path / "results").iterdir()]
    assert list(full.iterdir()) == [full / "keep.txt"]


def test_a_model_that_is_not_pruned_is_refused_in_exactly_one_line(tmp_path):
    """The demo model's README has no card metadata: reading it must not log a line before the refusal."""
    out = run("sleb.heal", "--model_name", "demo", "--output_dir", str(tmp_path / "healed"), "--result_folder",
              str(tmp_path / "r"))
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: 'demo' is not a pruned model (no sleb model card or GGUF sleb.removal_list names its removed "
        "blocks); pass --removal_list '[..]', or a directory or GGUF written by --save_model / --save_gguf"]
    assert not (tmp_path / "healed").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, expected", [
    ("\n---\nsleb_removal_list: [1, 2]\n---\n# card\n", {"sleb_removal_list": [1, 2]}),  # as huggingface_hub reads it
    ("\ufeff---\nsleb_removal_list: [3]\n---\n", {"sleb_removal_list": [3]}),  # a byte-order mark
    ("# a README, no metadata\n", {}),
    ("---\n: not yaml [\n---\n", {}),
])
def test_a_card_is_read_as_huggingface_hub_reads_it(text, expected, tmp_path):
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    assert read_card(str(tmp_path)) == expected


@pytest.mark.parametrize("arch, expected", [("gpt2", {"c_attn", "c_proj", "c_fc"}),  # Conv1D, c_proj twice
                                            ("gpt_neox", {"query_key_value", "dense", "dense_h_to_4h",
                                                          "dense_4h_to_h"})])
def test_lora_targets_are_found_per_architecture(arch, expected, model_dirs):
    model, _ = load_model(model_dirs[arch], device="cpu")
    names = lora.lora_targets(model).modules
    assert {name.rsplit(".", 1)[-1] for name in names} == expected
    assert len(names) == 6 * 4  # four projections in every block, nothing outside them (no LM head)


def test_pruned_checkpoint_carries_a_card_and_heals_without_a_list(model_dirs, text_file, tmp_path):
    saved = tmp_path / "pruned"
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[4, 1]", "--ppl_datasets",
              f"file:{text_file}", "--seqlen", "32", "--save_model", str(saved), "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = (saved / "README.md").read_text()
    assert text.startswith("---\n") and "depth-pruning" in text and "`[4, 1]`" in text and "python -m eval" in text
    assert read_card(str(saved))["sleb_removal_list"] == [4, 1]
    healed = invoke("sleb.heal", "--model_name", str(saved), "--dataset", f"file:{text_file}", "--nsamples", "100",
                 "--seqlen", "32", "--eval_ppl", "False", "--max_steps", "2", "--warmup_steps", "0",
                 "--output_dir", str(tmp_path / "healed"), "--result_folder", str(tmp_path), "--result_file", "h.json")
    assert healed.returncode == 0, healed.stderr[-2000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["removal_list"] == [4, 1] and record["num_blocks"] == 6 and record["source_metric"] == "given"
    # distillation needs the dense model, which the pruned checkpoint no longer is (it would distil from itself)
    refused = run("sleb.heal", "--model_name", str(saved), "--objective", "kl", "--output_dir", str(tmp_path / "kl"),
                  "--result_folder", str(tmp_path / "kl_results"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --objective kl distils from the dense model, and {str(saved)!r} is already pruned; heal from the "
        f"dense one: --model_name {model_dirs['llama']} --removal_list '[4, 1]'"]
    assert not (tmp_path / "kl").exists() and not (tmp_path / "kl_results").exists()
    refused = run("sleb.heal", "--model_name", str(saved), "--removal_list", "[1]", "--objective", "kl",
                  "--output_dir", str(tmp_path / "kl"), "--result_folder", str(tmp_path / "kl_results"))
    assert refused.returncode == 2 and refused.stderr.strip().endswith("--removal_list '[4, 1, 2]'")  # 1 of 0,2,3,5..


def test_a_pruned_checkpoint_heals_on_the_dense_models_own_text_and_reports_answers_kept(tmp_path, monkeypatch):
    """--dataset self samples the dense model the card names, not the pruned one; the questions are answered by
    the dense model first, and answers kept is reported before and after healing."""
    from sleb import questions, self_text

    monkeypatch.setenv("SLEB_CACHE", str(tmp_path / "cache"))
    saved = tmp_path / "pruned-demo"
    out = invoke("eval", "--model_name", "demo", "--removal_list", "[7]", "--eval_ppl", "False",
                 "--save_model", str(saved), "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr
    healed = invoke("sleb.heal", "--model_name", str(saved), "--dataset", "self", "--nsamples", "2", "--seqlen", "64",
                    "--max_steps", "1", "--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks", "answers",
                    "--limit", "3", "--output_dir", str(tmp_path / "healed"), "--result_folder", str(tmp_path),
                    "--result_file", "h.json")
    assert healed.returncode == 0, healed.stderr[-2000:]
    dense, tokenizer = sleb.load("demo", dtype="float32", device="cpu")
    sampled = [str(path) for path in (tmp_path / "cache" / "self_text").iterdir()]
    assert sampled == [self_text.cache_path(dense, tokenizer, 2, 0)]  # the dense model's text, and only it
    record = json.loads((tmp_path / "h.json").read_text())
    asked = questions.items()[:3]
    dense_replies = sleb.zeroshot(dense, tokenizer, "answers", limit=3)["replies"]["answers"]
    dense_right = [item["id"] for item in asked if questions.is_right(item, dense_replies[item["id"]])]
    for key, zeroshot in (("answers_kept_pruned", "zeroshot_pruned"), ("answers_kept", "zeroshot")):
        kept, replies = record[key]["answers"], record[zeroshot]["replies"]["answers"]
        right = {item["id"] for item in asked if questions.is_right(item, replies[str(item["id"])])}
        assert kept["dense_right"] == len(dense_right) and kept["kept"] == len(right & set(dense_right))


def test_a_checkpoint_pruned_from_the_demo_model_defaults_to_demo_data(tmp_path):
    saved = tmp_path / "pruned-demo"
    out = invoke("eval", "--model_name", "demo", "--removal_list", "[7]", "--eval_ppl", "False",
              "--save_model", str(saved), "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert read_card(str(saved))["sleb_base_model"] == "demo"
    settings = HealSettings(model_name=str(saved), output_dir=str(tmp_path / "healed"))
    settings.check()
    assert (settings.dataset, settings.ppl_datasets, settings.tasks) == ("demo", "demo", "demo_cloze,demo_order")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="QLoRA needs CUDA and bitsandbytes")
def test_qlora_on_gpu(model_dirs, text_file, tmp_path):
    out = run("sleb.heal", *_heal_args(model_dirs["llama"], text_file, tmp_path, "--max_steps", "10",
                                       "--load_in_4bit", "True"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["loss_curve"][-1]["loss"] < record["loss_curve"][0]["loss"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "healed").config.num_hidden_layers == 4
    # Before and after both on the full-precision model: healing is not credited with the 4-bit loss.
    assert record["ppl_precision"].endswith("before and after (training ran on a 4-bit NF4 base)")
    assert record["dtype"] != "torch.uint8"
