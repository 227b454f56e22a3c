"""llama.cpp (GGUF): a saved checkpoint converted by llama.cpp's own converter, run in llama-cpp-python.

`convert` runs `convert_hf_to_gguf.py` of a llama.cpp source tree (the llama-cpp-python sdist vendors one)
as a script, as llama.cpp's docs do, under the Python of an environment that meets its requirements
(`converter_python`; they pin transformers below 5, so not necessarily ours). Where the converter writes
a layout the engine reads otherwise than transformers (see sleb/serving.py), `layout_keys` says which GGUF
keys express the pruned layout and `convert` writes them with gguf-py (sleb/gguf_layout.py).

`load` and `logits` read what the engine computes (with `float32_cache`, the KV cache in float32, so that
a comparison with transformers is not limited by the cache's precision); `speed` times prompt processing
and generation in the engine itself, as users run it (its default float16 cache).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from sleb.errors import UsageError, first_line

CONVERTER = "convert_hf_to_gguf.py"
GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for float32, for the KV cache
GEMMA3_FULL_EVERY = 6  # llama.cpp's Gemma 3 default: blocks i with (i + 1) % 6 == 0 attend fully


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
        default = ["full_attention" if (i + 1) % GEMMA3_FULL_EVERY == 0 else "sliding_attention"
                   for i in range(len(kinds))]
        if list(kinds) != default:
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


def _timed(run, warmup: int, repeats: int) -> list:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def _summary(times: list, tokens: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "times_s": times,
            "tokens_per_s": tokens / median}


FACTS = ("architecture", "block_count", "context_length", "vocab")


def version() -> str:
    return _engine().__version__


def facts(llm) -> dict:
    """What the GGUF file says of itself: architecture, blocks, context length, vocabulary."""
    meta = llm.metadata
    arch = meta.get("general.architecture", "")
    return {"architecture": arch, "block_count": int(meta.get(f"{arch}.block_count", 0)),
            "context_length": int(meta.get(f"{arch}.context_length", 0)), "vocab": llm.n_vocab()}


def speed(path: str, prompt_len: int, new_tokens: int, warmup: int, repeats: int, threads: int, seed: int = 0) -> dict:
    """Prompt processing (a prompt of random token ids in one batch, from an empty cache) and, when
    new_tokens > 0, greedy generation after it (one token per step), each timed on its own: median, min,
    max, tokens/s; with the file's facts. The same seed gives the same prompt for any file of that vocabulary."""
    import numpy as np

    llama_cpp = _engine()
    llm = load(path, n_ctx=prompt_len + new_tokens + 1, threads=threads)
    try:
        out = facts(llm)
        if out["context_length"] and prompt_len + new_tokens > out["context_length"]:
            raise UsageError(f"--prompt_len {prompt_len} + --new_tokens {new_tokens} exceeds {path}'s "
                             f"{out['context_length']} positions; use smaller sizes")
        prompt = np.random.RandomState(seed).randint(0, out["vocab"], size=prompt_len).tolist()

        def process():
            llm.reset()
            llm.eval(prompt)

        out["prompt"] = _summary(_timed(process, warmup, repeats), prompt_len)
        if new_tokens:
            def last_logits():
                return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(out["vocab"],))

            def generate():
                llm.n_tokens = prompt_len  # back to the state after the prompt: eval clears the cache beyond it
                token = first
                for _ in range(new_tokens):
                    llm.eval([token])
                    token = int(np.argmax(last_logits()))

            process()
            first = int(np.argmax(last_logits()))
            out["generation"] = _summary(_timed(generate, warmup, repeats), new_tokens)
    finally:
        llm.close()
    return out
