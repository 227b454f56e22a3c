"""What goes wrong on the path users take: half precision, broken checkpoints, two runs on one results
file, resuming every metric, the hub behind a proxy, a model spread by accelerate."""

import dataclasses
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import tiny
from clitools import ROOT, invoke, run, start
from sleb import blocks, data, metrics, search_algorithms
from sleb.engines import ReferenceEngine
from sleb.errors import UsageError
from sleb.fast_search import FastEngine
from sleb.models import load_model
from sleb.search_algorithms import SearchJob, SearchState


def _one_line(out, *fragments):
    """Exit 2 with one error line, the last thing on stderr (progress bars of work done before may precede it)."""
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --- non-finite values -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    return tiny.make_overflowing_model_dir(tmp_path_factory.mktemp("overflow") / "llama")


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_nan_search_stops_with_one_line(engine, overflowing, text_file, tmp_path):
    out = run("sleb", "--model_name", overflowing, "--dtype", "float16", "--device", "cpu", "--engine", engine,
              "--dataset", f"file:{text_file}", "--nsamples", "40", "--seqlen", "32", "--num_remove_blocks", "2",
              "--ppl_datasets", f"file:{text_file}", "--result_folder", str(tmp_path), "--result_file", "n.json")
    line = _one_line(out, "nan", "float16", "--dtype bfloat16", overflowing)
    if engine == "reference":
        assert "with block 1 removed" in line  # the first candidate, which keeps the overflowing block 2
    assert not (tmp_path / "n.json").exists() or json.loads((tmp_path / "n.json").read_text())["search"]["status"] != "done"
    # The same checkpoint in bfloat16 (its range is float32's) searches to the end.
    fine = invoke("sleb", "--model_name", overflowing, "--dtype", "bfloat16", "--device", "cpu", "--engine", engine,
               "--dataset", f"file:{text_file}", "--nsamples", "40", "--seqlen", "32", "--num_remove_blocks", "2",
               "--eval_ppl", "False", "--result_folder", str(tmp_path), "--result_file", "b.json")
    assert fine.returncode == 0, fine.stderr


def test_nan_perplexity_writes_no_result(overflowing, text_file, tmp_path):
    out = run("eval", "--model_name", overflowing, "--dtype", "float16", "--removal_list", "[]",
              "--ppl_datasets", f"file:{text_file}", "--seqlen", "32", "--result_folder", str(tmp_path))
    _one_line(out, "nan", "float16", "--dtype bfloat16")
    assert not list(tmp_path.glob("*.json"))


def test_nan_in_a_later_phase_keeps_the_finished_phases(model_dirs, text_file, tmp_path, monkeypatch):
    from sleb import run_search as pipeline
    from sleb.settings import SearchSettings

    real = metrics.METRICS["sleb"].run

    def poison_after_first_phase(job, state):
        save = job.on_phase

        def on_phase(current):
            save(current)
            with torch.no_grad():  # a block that now overflows, as half precision can mid-search
                blocks.get_blocks(job.model)[3].mlp.down_proj.weight.fill_(float("nan"))
        job.on_phase = on_phase
        return real(job, state)

    monkeypatch.setitem(metrics.METRICS, "sleb", dataclasses.replace(metrics.METRICS["sleb"],
                                                                      run=poison_after_first_phase))
    # The reference engine: the fast one would reuse states it cached before the weights were poisoned.
    settings = SearchSettings(model_name=model_dirs["llama"], dataset=f"file:{text_file}", nsamples=60, seqlen=32,
                              num_remove_blocks=3, eval_ppl=False, engine="reference", result_folder=str(tmp_path), result_file="p.json")
    with pytest.raises(UsageError, match="nan"):
        pipeline.run(settings)
    saved = json.loads((tmp_path / "p.json").read_text())["search"]
    assert saved["status"] == "searching" and len(saved["removal_list"]) == 1 and len(saved["losses"]) == 1


# --- exact in half precision; ties at the cut; engines keep their blocks ------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_fast_equals_reference_in_half_precision(arch, dtype, model_dirs, text_file):
    model, tokenizer = load_model(model_dirs[arch], dtype=dtype, device="cpu")
    windows = data.load_calibration_windows(f"file:{text_file}", tokenizer, nsamples=200, seed=0, seqlen=32)[:6]
    if arch == "gemma3":
        assert model.config.sliding_window < windows.shape[1]  # the local layers' mask matters
    for metric in ("sleb", "sleb_oneshot"):
        lists = []
        for engine in (ReferenceEngine(model, windows), FastEngine(model, windows, 4)):
            job = SearchJob(model, windows, 3, 1, 1, build_engine=lambda: engine, log=lambda *a: None)
            state = metrics.get(metric).run(job, SearchState(6))
            lists.append(state.removal_list)
            if state.max_rescore_gap is not None:
                assert state.max_rescore_gap < engine.tie_margin / 10  # the margin is not too small
        assert lists[0] == lists[1], (metric, lists)


def test_near_ties_cover_the_cut_and_its_chain():
    losses = {1: 10.0, 2: 20.0, 3: 20.0 + 1e-8, 4: 20.0 + 2e-8, 5: 30.0, 6: None}
    assert search_algorithms.near_ties(losses, 1, 1e-6) == []  # the best stands alone
    assert search_algorithms.near_ties(losses, 2, 1e-6) == [2, 3, 4]  # the cut after rank 2 falls inside a chain
    assert search_algorithms.near_ties({1: 10.0, 2: 10.0, 3: 11.0}, 1, 1e-6) == [1, 2]
    assert search_algorithms.near_ties(losses, 2, 0.0) == []  # the reference engine settles nothing


def test_engine_keeps_running_its_own_blocks_after_a_removal_elsewhere(model_dirs, text_file):
    model, tokenizer = load_model(model_dirs["llama"], device="cpu")
    windows = data.load_calibration_windows(f"file:{text_file}", tokenizer, nsamples=200, seed=0, seqlen=32)[:4]
    fast = FastEngine(model, windows, 2, abandon=False)
    reference = ReferenceEngine(model, windows)
    before = fast.phase([], [1, 2, 3, 4]).losses
    blocks.remove_blocks(model, [1])  # the model's list is now 5 blocks long
    fast.changed(range(fast.num_blocks))  # nothing cached: every state is recomputed with its own blocks
    assert fast.phase([], [1, 2, 3, 4]).losses == pytest.approx(before, rel=1e-6)
    with pytest.raises(RuntimeError, match="blocks changed"):
        reference.loss([2])


# --- broken checkpoints, in all three entry modules ----------------------------------------------------

def _broken(kind, source, target):
    shutil.copytree(source, target)
    if kind == "truncated weights":
        weights = os.path.join(target, "model.safetensors")
        with open(weights, "rb") as handle:
            content = handle.read()
        with open(weights, "wb") as handle:
            handle.write(content[: len(content) // 2])
        return weights
    if kind == "invalid config":
        with open(os.path.join(target, "config.json"), "a") as handle:
            handle.write("{ not json")
        return os.path.join(target, "config.json")
    for name in os.listdir(target):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.remove(os.path.join(target, name))
    return str(target)


@pytest.mark.parametrize("module", ["sleb", "eval", "latency"])
@pytest.mark.parametrize("kind", ["truncated weights", "invalid config", "no tokenizer"])
def test_broken_checkpoint_is_one_line_naming_the_file(kind, module, model_dirs, text_file, tmp_path):
    named = _broken(kind, model_dirs["llama"], tmp_path / "model")
    args = ["--model_name", str(tmp_path / "model"), "--result_folder", str(tmp_path / "results")]
    if module != "latency":
        args += ["--ppl_datasets", f"file:{text_file}", "--seqlen", "32"]
    if module == "sleb":
        args += ["--dataset", f"file:{text_file}", "--nsamples", "20"]
    line = _one_line(run(module, *args), named)
    assert {"truncated weights": "truncated", "invalid config": "not valid JSON",
            "no tokenizer": "save_pretrained"}[kind] in line
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


# --- one results file, one run; resume for every metric ---------------------------------------------

def test_second_run_on_the_same_results_file_stops_at_once(model_dirs, text_file, tmp_path):
    # Many short windows on the reference engine: the first run must outlast the second one's start-up.
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "300",
            "--seqlen", "8", "--num_remove_blocks", "3", "--engine", "reference", "--eval_ppl", "False",
            "--result_folder", str(tmp_path), "--result_file", "same.json"]
    first = start("sleb", *args)
    try:
        lock = tmp_path / ".same.json.lock"
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.05)
        started = time.time()
        second = run("sleb", *args)
        assert time.time() - started < 60
        _one_line(second, "being written by another run", f"pid {first.pid}")
        assert first.poll() is None, "the first run ended before it could be killed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 left the lock file behind, but not the lock: the next run goes ahead, and tidies up.
    assert lock.exists()
    shorter = args.copy()
    shorter[shorter.index("--nsamples") + 1] = "20"  # the lock is what is checked here, not the long search
    again = invoke("sleb", *shorter, "--overwrite", "True")
    assert again.returncode == 0, again.stderr
    assert not lock.exists()


@pytest.mark.parametrize("metric", ["sleb", "sleb_oneshot", "cosine", "angular", "random"])
def test_resume_of_a_finished_search_works_for_every_metric(metric, model_dirs, text_file, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "40",
            "--seqlen", "32", "--num_remove_blocks", "2", "--metric", metric, "--eval_ppl", "False",
            "--result_folder", str(tmp_path), "--result_file", "r.json"]
    assert invoke("sleb", *args).returncode == 0
    first = json.loads((tmp_path / "r.json").read_text())["search"]
    resumed = invoke("sleb", *args, "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads((tmp_path / "r.json").read_text())["search"]
    assert again["removal_list"] == first["removal_list"] and again["losses"] == first["losses"]
    assert again["status"] == "done"


def test_resume_of_an_unfinished_one_shot_result_says_why_not(model_dirs, text_file, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "40",
            "--seqlen", "32", "--num_remove_blocks", "2", "--metric", "cosine", "--eval_ppl", "False",
            "--result_folder", str(tmp_path), "--result_file", "c.json"]
    assert invoke("sleb", *args).returncode == 0
    record = json.loads((tmp_path / "c.json").read_text())
    record["search"]["status"] = "searching"
    (tmp_path / "c.json").write_text(json.dumps(record))
    _one_line(run("sleb", *args, "--resume", "True"), "one pass", "--overwrite True")


# --- the hub through huggingface_hub's own session -----------------------------------------------------

class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself with 404, and remembers what it was asked."""

    seen = []

    def _answer(self):
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def test_hub_is_reached_through_the_proxy_and_fails_in_one_line(tmp_path, text_file):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "NO_PROXY",
                                                              "no_proxy")}
    proxy = f"http://127.0.0.1:{server.server_port}"
    env.update(HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=proxy, http_proxy=proxy, HF_HOME=str(tmp_path / "hf"))
    try:
        started = time.time()
        out = subprocess.run([sys.executable, "-m", "eval", "--model_name", "someorg/somemodel", "--ppl_datasets",
                              f"file:{text_file}", "--result_folder", str(tmp_path / "results")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.shutdown()
    _one_line(out, "someorg/somemodel")
    assert time.time() - started < 60
    # The old raw-socket probe resolved hub.invalid itself, failed, and never asked the proxy.
    assert any("hub.invalid" in line for line in _Proxy.seen), _Proxy.seen


def test_a_local_model_and_file_never_touch_the_network(model_dirs, text_file, tmp_path):
    script = f"""
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[1:] or args)
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
sys.argv = ["eval", "--model_name", {model_dirs["llama"]!r}, "--removal_list", "[1]", "--ppl_datasets",
            "file:{text_file}", "--seqlen", "32", "--result_folder", {str(tmp_path)!r}]
try:
    from sleb.commands import cli
    cli("eval")
finally:
    print("NETWORK", attempts)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NETWORK []" in out.stdout, out.stdout[-2000:]
