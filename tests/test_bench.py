"""The benchmark scripts' own contracts (their figures are measured by running them, never in a test)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from clitools import OFFLINE, ROOT
import sleb


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is present")
def test_gpu_bench_refuses_in_one_line_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, env=dict(OFFLINE, PYTHON=sys.executable), timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], out.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_bench_needs_an_output_directory():
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage: bash bench/gpu.sh OUT_DIR" in out.stderr


def test_metric_bench_times_every_metric_and_counts_block_forwards():
    import json

    out = subprocess.run([sys.executable, "-m", "bench.metric_speed", "--model_name", "random",
                          "--layers", "6", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--vocab", "300",
                          "--windows", "4", "--seqlen", "32", "--num_remove_blocks", "2",
                          "--metrics", "sleb,evopress,cosine", "--evo_generations", "2"],
                         capture_output=True, text=True, env=OFFLINE, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    runs = {(run["metric"], run["objective"]): run for run in json.loads(lines[0])["runs"]}
    assert set(runs) == {("sleb", "ce"), ("sleb", "kl"), ("evopress", "ce"), ("evopress", "kl"), ("cosine", None)}
    sleb_run = runs[("sleb", "ce")]
    # The hook sees what the engine ran and the short probes before it (can the engine follow this model?)
    assert 0 < sleb_run["engine_block_forwards"] < sleb_run["block_forwards"] < 2 * sleb_run["engine_block_forwards"]
    assert runs[("cosine", None)]["block_forwards"] == 6 * 4  # one dense pass over the windows
    evo = runs[("evopress", "kl")]
    assert evo["generations"] == 2 and evo["loss"] <= evo["greedy_loss"] and evo["kl_vocabulary"] == "full"
    assert evo["block_forwards"] > runs[("sleb", "kl")]["block_forwards"]  # the greedy list, then the generations


def test_benchmarks_are_modules_without_path_preludes():
    """`python -m bench.NAME` from a checkout finds sleb and its sibling benchmarks by package: no benchmark
    edits sys.path when it is imported."""
    import ast

    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, "bench"))):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "bench", name)).read())
            found += [f"bench/{name}:{node.lineno}" for node in tree.body  # module level only
                      if isinstance(node, ast.Expr) and "sys.path" in ast.unparse(node)]
    assert not found
    out = subprocess.run([sys.executable, "-m", "bench.random_model", "--help"], capture_output=True, text=True,
                         env=OFFLINE, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "DIRECTORY" in out.stdout + out.stderr, out.stderr


def test_real_model_study_reads_counts_and_rows_as_fire_hands_them_over():
    from bench.real_model import METHODS, select

    assert select(3, None) == ([3], list(METHODS))  # fire turns a lone "3" into an int
    assert select("3,6,9", None)[0] == select((3, 6, 9), None)[0] == [3, 6, 9]
    counts, methods = select(9, "sleb ce / self + LoRA KL (self),sleb_compensated / demo")
    assert counts == [9] and [m[0] for m in methods] == ["sleb_compensated / demo", "sleb ce / self + LoRA KL (self)"]
    assert [m[0] for m in select(6, ("angular / demo",))[1]] == ["angular / demo"]


def test_recovery_curve_runs_the_cheapest_level_everywhere_first_on_the_best_untrained_lists(tmp_path):
    from bench import recovery_curve

    plan = recovery_curve.plan("3,6", "lora_kl,local", "1,2")
    assert plan[:2] == [(3, "none", 0), (6, "none", 0)]  # plain removal: each curve's 0-minute point
    assert plan[2:6] == [(3, "lora_kl", 25), (3, "local", 100), (6, "lora_kl", 25), (6, "local", 100)]
    assert plan[6:] == [(3, "lora_kl", 100), (3, "local", 400), (6, "lora_kl", 100), (6, "local", 400)]
    with pytest.raises(sleb.UsageError, match="--methods: 'lora' is not one of"):
        recovery_curve.plan(3, "lora", 1)
    key = {"model_sha256": "m"}
    rows = [{"key": key, "removed": 3, "recovery": "none", "answers_kept": 0.4, "removal_list": [5, 17, 16]},
            {"key": key, "removed": 3, "recovery": "local", "answers_kept": 0.5, "removal_list": [1, 2, 3]},
            {"key": key, "removed": 3, "recovery": "linear", "answers_kept": 0.45, "removal_list": [5, 14, 13]},
            {"key": {"model_sha256": "other"}, "removed": 6, "recovery": "none", "answers_kept": 0.9,
             "removal_list": [1, 2, 3, 4, 5, 6]},
            {"key": key, "removed": 6, "recovery": "none", "answers_kept": 0.1, "removal_list": [7, 8, 9, 10, 11, 12]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # trained rows and rows of another model are not the lists the curve trains from
    assert recovery_curve.best_lists(str(tmp_path), key) == {3: [5, 14, 13], 6: [7, 8, 9, 10, 11, 12]}


@pytest.mark.parametrize("flags, message", [
    (["--rows", "sleb ce / dmeo"], "--rows: no row named 'sleb ce / dmeo'; the rows are: sleb ce / demo"),
    (["--counts", "3,x"], "--counts must be block counts between 1 and 29"),
    (["--counts", "30"], "--counts must be block counts between 1 and 29"),
    (["--gguf", "missing.gguf"], "no GGUF file at 'missing.gguf'"),
    (["--table_only", "True"], "nothing measured in"),
])
def test_real_model_study_refuses_bad_flags_in_one_line_before_writing(tmp_path, flags, message):
    out_dir = tmp_path / "study"
    args = ["--gguf", "missing.gguf", "--out", str(out_dir)]
    out = subprocess.run([sys.executable, "-m", "bench.real_model", *args, *flags], capture_output=True, text=True,
                         env=OFFLINE, timeout=300, cwd=ROOT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert not out_dir.exists()


def test_real_model_study_continues_an_interrupted_evopress_search_from_its_last_generation(model_dirs, text_file,
                                                                                            tmp_path, monkeypatch):
    import sleb
    from bench import real_model

    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, open(text_file).read().splitlines(), nsamples=300, seqlen=32)[:4]
    whole = real_model.Searches(str(tmp_path / "whole"), 2, "test-model")
    os.makedirs(tmp_path / "whole")
    expected = whole.removal_list(model, windows, 2, "evopress", "kl", "demo")

    os.makedirs(tmp_path / "cut")
    cut = real_model.Searches(str(tmp_path / "cut"), 2, "test-model")
    write, saved = real_model.results.write_json, []

    def write_then_stop(path, record):
        write(path, record)
        if "generations" not in record:
            return  # the search's timing, written as the search stops
        saved.append(len(record["generations"]))
        if len(saved) == 3:
            raise KeyboardInterrupt  # the session ends after generation 2
    monkeypatch.setattr(real_model.results, "write_json", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cut.removal_list(model, windows, 2, "evopress", "kl", "demo")
    monkeypatch.undo()

    search, resumed_from = sleb.search, []

    def recording(*args, resume=None, **kwargs):
        resumed_from.append(len(resume.generations) if resume is not None else 0)
        return search(*args, resume=resume, **kwargs)
    monkeypatch.setattr(real_model.sleb, "search", recording)
    again = real_model.Searches(str(tmp_path / "cut"), 2, "test-model").removal_list(model, windows, 2, "evopress", "kl", "demo")
    assert saved == [1, 2, 3] and resumed_from == [3]  # generations 0 to 2 kept, the greedy start not redone
    assert again[0] == expected[0] and again[1]["seconds"] > 0 and again[1]["sessions"] == 2
    done = real_model.Searches(str(tmp_path / "cut"), 2, "test-model").removal_list(model, windows, 2, "evopress", "kl", "demo")
    assert done == again and resumed_from == [3]  # a finished search is read back, not run again


def test_a_timing_beside_a_busy_process_is_marked_shared():
    """bench/cores.py: other processes' CPU time over the span, from /proc/stat less this process's own."""
    import time

    from bench import cores

    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)
        with cores.Watch() as watch:
            time.sleep(1.5)  # this process idles; the other one spins a core
    finally:
        busy.wait()
    found = watch.record()
    assert found["cores"] == "shared" and found["others_share"] >= 0.3, found
    with cores.Watch() as own:
        end = time.time() + 1.0
        while time.time() < end:  # this process's own work is not counted as another's
            pass
    assert own.record()["others_share"] < found["others_share"], own.record()
