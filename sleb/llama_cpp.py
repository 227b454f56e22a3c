"""llama.cpp (GGUF): a saved checkpoint converted by llama.cpp's own converter, run in llama-cpp-python.

`convert` runs `convert_hf_to_gguf.py` of a llama.cpp source tree (the llama-cpp-python sdist vendors one)
as a script, as llama.cpp's docs do, under the Python of an environment that meets its requirements
(`converter_python`; they pin transformers below 5, so not necessarily ours). Where the converter writes
a layout the engine reads otherwise than transformers (see sleb/serving.py), `layout_keys` says which GGUF
keys express the pruned layout and `convert` writes them with gguf-py (sleb/gguf_layout.py).

`load` and `logits` read what the engine computes (with `float32_cache`, the KV cache in float32, so that
a comparison with transformers is not limited by the cache's precision); `runner` hands sleb/latency.py
prompt processing and generation to time in the engine itself, as users run it (its default float16 cache).
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from sleb import serving
from sleb.errors import UsageError, first_line

CONVERTER = "convert_hf_to_gguf.py"
GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for float32, for the KV cache


def check_installed() -> None:
    _engine()


def _engine():
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("llama-cpp-python is not installed; pip install 'sleb[llama-cpp]' (it builds llama.cpp "
                         "with cmake and a C++ compiler)") from None
    return llama_cpp


def converter_script(tree: str) -> Path:
    script = Path(tree).expanduser() / CONVERTER
    if not script.is_file():
        raise UsageError(f"--llama_cpp {tree}: no {CONVERTER} there; give a llama.cpp source tree (the "
                         "llama-cpp-python sdist has one under vendor/llama.cpp)")
    return script


def _converter_env(tree: Path) -> dict:
    """The tree's own gguf-py first, as its converter expects (PyPI's gguf may be older than the tree)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "gguf-py"), env.get("PYTHONPATH")]))
    return env


def layout_keys(config: dict) -> dict:
    """GGUF keys (without the architecture prefix) that tell llama.cpp the layout transformers builds from
    this config.json, where the converter writes none: Gemma 3's per-block sliding pattern, which the
    engine otherwise takes as every 6th block full (a pruned model's layer_types rarely is)."""
    text = config.get("text_config") or config
    kinds = text.get("layer_types")
    if text.get("model_type") in ("gemma3", "gemma3_text") and kinds:
        if list(kinds) != serving.llama_cpp_gemma3_kinds(len(kinds)):
            return {"attention.sliding_window_pattern": [kind == "sliding_attention" for kind in kinds]}
    return {}


def _tail(text: str, lines: int = 1) -> str:
    found = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(found[-lines:])[:300] if found else "no output"


def convert(checkpoint: str, outfile: str, tree: str, converter_python: Optional[str] = None,
            outtype: str = "f32", write_layout: bool = True, log=print) -> str:
    """Convert a saved checkpoint to GGUF with the tree's converter; write the layout keys it leaves out
    (unless `write_layout` is False: the file as the converter alone makes it). Returns `outfile`, which
    appears only complete."""
    script = converter_script(tree)
    python = converter_python or sys.executable
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{checkpoint} is not a saved checkpoint (no config.json)")
    outfile = str(outfile)
    Path(outfile).parent.mkdir(parents=True, exist_ok=True)
    env = _converter_env(script.parent)
    with tempfile.TemporaryDirectory(dir=Path(outfile).parent) as scratch:
        converted = os.path.join(scratch, "converted.gguf")
        done = subprocess.run([python, str(script), str(checkpoint), "--outfile", converted, "--outtype", outtype],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(converted):
            raise UsageError(f"llama.cpp's converter failed on {checkpoint}: {_tail(done.stderr + done.stdout)}")
        keys = layout_keys(json.loads(config_file.read_text())) if write_layout else {}
        if keys:
            laid_out = os.path.join(scratch, "laid_out.gguf")
            done = subprocess.run([python, str(Path(__file__).with_name("gguf_layout.py")), converted, laid_out,
                                   json.dumps(keys)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise UsageError(f"writing {sorted(keys)} into the GGUF failed: {_tail(done.stderr + done.stdout)}")
            log(f"wrote {', '.join(sorted(keys))} into {outfile} (llama.cpp's converter leaves them out)")
            converted = laid_out
        os.replace(converted, outfile)
    return outfile


def load(path: str, n_ctx: int = 512, threads: Optional[int] = None, logits_all: bool = False,
         float32_cache: bool = False):
    """A llama-cpp-python model on the CPU; the KV cache in the engine's default type (float16), or in float32
    for comparing logits."""
    llama_cpp = _engine()
    if not os.path.isfile(path):
        raise UsageError(f"no GGUF file at {path}")
    threads = threads or default_threads()
    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if float32_cache else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all, verbose=False, **cache)
    except ValueError as error:  # llama-cpp-python's "Failed to load model from file": not GGUF, truncated, ...
        raise UsageError(f"llama.cpp cannot load {path} ({first_line(error)}): is it a complete GGUF file?") from None


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def logits(llm, token_ids: list):
    """(len(token_ids), vocab) float32 logits of every position, as a numpy array."""
    import numpy as np

    llm.reset()
    llm.eval(list(token_ids))
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def version() -> str:
    return _engine().__version__


def facts(llm) -> dict:
    """What the GGUF file says of itself: architecture, blocks, context length, vocabulary."""
    meta = llm.metadata
    arch = meta.get("general.architecture", "")
    return {"architecture": arch, "block_count": int(meta.get(f"{arch}.block_count", 0)),
            "context_length": int(meta.get(f"{arch}.context_length", 0)), "vocab": llm.n_vocab()}


def file_facts(path: str) -> dict:
    """`facts` of a GGUF file, read before any timing (the weights are mapped, not read: a quick open)."""
    llm = load(path, n_ctx=16, threads=1)
    try:
        return facts(llm)
    finally:
        llm.close()


@contextlib.contextmanager
def runner(path: str, prompt_len: int, new_tokens: int, threads: int, seed: int = 0):
    """(facts, process, generate) for timing a GGUF file: `process()` runs a prompt of random token ids (the
    same for any file of the vocabulary, given the seed) in one batch from an empty cache; `generate()`
    (None when new_tokens is 0) goes back to the state after the prompt and generates new_tokens greedily,
    one per step, so `process()` must have run at least once before it."""
    import numpy as np

    llama_cpp = _engine()
    llm = load(path, n_ctx=prompt_len + new_tokens + 1, threads=threads)
    try:
        found = facts(llm)
        if found["context_length"] and prompt_len + new_tokens > found["context_length"]:
            raise UsageError(f"--prompt_len {prompt_len} + --new_tokens {new_tokens} exceeds {path}'s "
                             f"{found['context_length']} positions; use smaller sizes")
        prompt = np.random.RandomState(seed).randint(0, found["vocab"], size=prompt_len).tolist()
        after_prompt = {}

        def next_token() -> int:
            return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                       shape=(found["vocab"],))))

        def process():
            llm.reset()
            llm.eval(prompt)
            after_prompt["token"] = next_token()

        def generate():
            llm.n_tokens = prompt_len  # eval clears the cache beyond the prompt
            token = after_prompt["token"]
            for _ in range(new_tokens):
                llm.eval([token])
                token = next_token()

        yield found, process, generate if new_tokens else None
    finally:
        llm.close()


def logit_gap(reference, engine) -> dict:
    """How far the engine's logits are from transformers' on the same positions: the largest and mean absolute
    difference, and the share of positions whose top-1 token agrees."""
    import numpy as np

    reference, engine = np.asarray(reference, dtype=np.float32), np.asarray(engine, dtype=np.float32)
    difference = np.abs(reference - engine)
    return {"max_abs": float(difference.max()), "mean_abs": float(difference.mean()),
            "top1_agreement": float((reference.argmax(-1) == engine.argmax(-1)).mean()),
            "positions": int(reference.shape[0])}


def within_gap(pruned: dict, dense: dict, slack: float = 1.5) -> bool:
    """The pruned file's gap to transformers no wider than the dense file's own (quantized activations make
    even the dense file differ): mean absolute difference within `slack` times dense's, and top-1 agreement at
    most 3 points (or 3 positions, on a short text) below dense's. The largest difference is reported, not
    gated: one position's outlier. A file with other blocks kept misses this by far (mean 9x on SmolLM2)."""
    drop = max(0.03, 3 / max(1, pruned["positions"]))
    return (pruned["mean_abs"] <= slack * dense["mean_abs"] + 1e-5
            and pruned["top1_agreement"] >= dense["top1_agreement"] - drop)
