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


class _Built(dict):
    """{arch: saved model directory}, each built the first time a test asks for it."""

    def __init__(self, root, known):
        super().__init__()
        self.root, self.known = root, known

    def __missing__(self, arch):
        if arch not in self.known:
            raise KeyError(arch)
        self[arch] = tiny.make_model_dir(self.root / arch, arch)
        return self[arch]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """One saved tiny model per family of the architectures table, built once per test session."""
    return _Built(tmp_path_factory.mktemp("families"), tiny.FAMILIES + tuple(tiny.REFUSED_FAMILIES) + tiny.COMPENSATION_FAMILIES)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    return tiny.write_text(tmp_path_factory.mktemp("data") / "tiny.txt", lines=300)
