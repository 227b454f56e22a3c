"""Running the entry modules in a subprocess, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=OFFLINE)


def start(module, *args, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The entry module running in the background (to be killed or interrupted by the test)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=OFFLINE,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def assert_bad_input(module, flags: dict, overrides: list, message: str, result_folder) -> None:
    """The invocation exits 2 with exactly one stderr line containing `message`, and writes nothing."""
    flags = dict(flags)
    for name, value in zip(overrides[::2], overrides[1::2]):
        flags[name] = value
    out = run(module, *[x for pair in flags.items() for x in pair])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not result_folder.exists() or not list(result_folder.iterdir())
