"""Running the entry modules: in a subprocess, as a user would (where exit codes, one-line stderr,
signals or locks are what a test is about), or in this process through the same `cli(argv)`."""

import contextlib
import functools
import importlib
import io
import os
import signal
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

# `python -m MODULE` -> its command in sleb/commands.py
ENTRY = {"sleb": "search", "eval": "eval", "latency": "latency", "sleb.heal": "heal"}


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=OFFLINE)


def invoke(module, *args, timeout=None) -> subprocess.CompletedProcess:
    """`python -m module args` run in this process: the same flag parsing and pipeline, without
    starting Python, torch and transformers again. Returns what `run` returns; an unexpected
    exception is returncode 1 with its traceback as stderr, as in a subprocess."""
    command = ENTRY[module]
    cli = functools.partial(importlib.import_module("sleb.commands").cli, command)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, cwd = sys.argv, os.getcwd()
    code = 0
    sys.argv = [module, *args]  # model cards record the command line
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli(list(args))
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess([module, *args], code, stdout.getvalue(), stderr.getvalue())


def start(module, *args, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The entry module running in the background (to be killed or interrupted by the test)."""
    # A shell's background job ignores SIGINT, and children inherit that: give this one the default back,
    # so a test's Ctrl-C reaches it however the suite itself was started.
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=OFFLINE,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def assert_bad_input(module, flags: dict, overrides: list, message: str, result_folder, in_process=False) -> None:
    """The invocation exits 2 with exactly one stderr line containing `message`, and writes nothing; in a
    subprocess, as a user runs it, or `in_process` through the same cli(argv) (no interpreter start-up)."""
    flags = dict(flags)
    for name, value in zip(overrides[::2], overrides[1::2]):
        flags[name] = value
    out = (invoke if in_process else run)(module, *[x for pair in flags.items() for x in pair])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not result_folder.exists() or not list(result_folder.iterdir())
