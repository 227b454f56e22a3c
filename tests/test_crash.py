"""A search killed with SIGKILL mid-phase resumes to the identical answer."""

import json
import os
import signal
import subprocess
import time

from clitools import invoke, start


def test_sigkill_then_resume_gives_the_same_list_and_losses(model_dirs, text_file, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "200",
            "--seqlen", "64", "--num_remove_blocks", "3", "--engine", "reference", "--eval_ppl", "False",
            "--result_folder", str(tmp_path)]
    whole = invoke("sleb", *args, "--result_file", "whole.json")
    assert whole.returncode == 0, whole.stderr
    expected = json.loads((tmp_path / "whole.json").read_text())["search"]

    partial = tmp_path / "killed.json"
    process = start("sleb", *args, "--result_file", "killed.json")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if partial.exists() and json.loads(partial.read_text())["search"]["removal_list"]:
            break  # the first phase is saved; the second is under way
        time.sleep(0.05)
    assert process.poll() is None, "the search ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = json.loads(partial.read_text())["search"]
    assert saved["status"] == "searching" and 1 <= len(saved["removal_list"]) < 3

    resumed = invoke("sleb", *args, "--result_file", "killed.json", "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(partial.read_text())["search"]
    assert final["removal_list"] == expected["removal_list"]
    assert final["losses"] == expected["losses"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_ctrl_c_says_where_the_partial_result_is(model_dirs, text_file, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "200",
            "--seqlen", "64", "--num_remove_blocks", "3", "--engine", "reference", "--eval_ppl", "False",
            "--result_folder", str(tmp_path), "--result_file", "int.json"]
    process = start("sleb", *args, stderr=subprocess.PIPE)
    partial = tmp_path / "int.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not partial.exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert str(partial) in stderr and "--resume True" in stderr
