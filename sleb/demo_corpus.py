"""The `demo` corpus: English text every Python install already carries.

Documents are the standard library's docstrings (read from its source with `ast`, so no module is
imported and nothing runs) and the language-reference topics in `pydoc_data.topics`. Each document
has a qualified name; a stable hash of that name puts it in train, validation or test, so the split
does not depend on file order and a document never moves between splits. The text varies slightly
with the Python version, since it is that version's own standard library.
"""

import ast
import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
# Directories of the standard library that hold tests or third-party code, not documentation.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
# Very short docstrings ("Return self.") are near-duplicates that teach nothing.
_MIN_CHARS = 40


@dataclass(frozen=True)
class Document:
    name: str  # qualified name, e.g. "doc:json.decoder.JSONDecoder.decode" or "topic:assert"
    text: str


def split_of(name: str) -> str:
    """90% train, 5% validation, 5% test, by a hash that is the same on every machine."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _docstrings(module: str, source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    stack = [(module, tree)]
    while stack:
        prefix, node = stack.pop(0)
        text = ast.get_docstring(node, clean=True)
        if text and len(text) >= _MIN_CHARS:
            yield Document("doc:" + prefix, text)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stack.append((f"{prefix}.{child.name}", child))


@functools.lru_cache(maxsize=1)
def all_documents() -> tuple:
    """Every document of the corpus, sorted by name (ties keep source order)."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(directory, file)
            with open(path, encoding="utf-8", errors="replace") as handle:
                docs.extend(_docstrings(_module_name(root, path), handle.read()))
    from pydoc_data.topics import topics

    docs.extend(Document("topic:" + key, text.strip()) for key, text in topics.items())
    docs.sort(key=lambda doc: doc.name)
    return tuple(docs)


def documents(split: str) -> list:
    """The documents of one split, in name order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [doc for doc in all_documents() if split_of(doc.name) == split]


def texts(split: str) -> list:
    return [doc.text for doc in documents(split)]
