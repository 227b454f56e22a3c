"""The README and docs/: short enough to read, every relative link resolves, and every flag a command line in
them names is a flag of that command (the README's Python block runs in tests/test_api.py)."""

import dataclasses
import glob
import os
import re
import shlex

import pytest

from clitools import ROOT
from sleb.settings import EvalSettings, HealSettings, LatencySettings, SearchSettings

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
COMMANDS = {"sleb": SearchSettings, "eval": EvalSettings, "latency": LatencySettings, "sleb.heal": HealSettings}


def test_the_readme_is_read_in_minutes():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 12 * 1024


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    text = open(page).read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert os.path.exists(os.path.join(os.path.dirname(page), target)), f"{page}: {target}"


def _command_lines(text: str):
    """Each `python -m CMD ...` line of an indented or fenced block, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        found = re.search(r"python3? -m (sleb\.heal|sleb|eval|latency)\s(.*)$", line.strip())
        if found and line.startswith(("    ", "python")):
            yield found.group(1), found.group(2)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_flag_on_a_command_line_is_a_flag_of_that_command(page):
    checked = 0
    for command, rest in _command_lines(open(page).read()):
        known = {f.name for f in dataclasses.fields(COMMANDS[command])}
        try:
            words = shlex.split(rest.split(" #")[0].split(" &&")[0].split(" |")[0])
        except ValueError:
            continue  # a line that is prose, not a command
        for word in words:
            if word.startswith("--") and not word.startswith("---"):
                name = word[2:].split("=")[0]
                assert name in known, f"{page}: python -m {command} has no --{name}"
                checked += 1
    if page == os.path.join(ROOT, "README.md"):
        assert checked >= 10
