import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """One saved tiny random model per architecture, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny.make_model_dir(root / arch, arch) for arch in tiny.ARCHS}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    return tiny.write_text(tmp_path_factory.mktemp("data") / "tiny.txt", lines=300)
