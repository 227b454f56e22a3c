"""EvoPress checked on the real model: does its evolution ever improve on where it starts?

    python -m bench.evopress_check --gguf SmolLM2-135M-Instruct.Q4_1.gguf --part neighbours|greedy|random|report

SmolLM2-135M-Instruct, 6 of 30 blocks, KL to the dense model on the study's demo calibration windows (25 x 256
tokens), EvoPress's settings as sleb runs them (sleb.Evolution: 32 offspring, 2 survivors, the first stage on
1/16 of the batches, 1 to 3 swaps, k(n-k)/1.5 = 96 generations). This command's parts:

- neighbours: the calibration KL of the greedy KL list and of every set one swap away from it (a removed block
  swapped with a kept candidate), each scored alone with the public API (sleb.skipping + sleb.kl_to_dense on the
  dense model's distributions over the same windows). If none is lower, the greedy list is a local optimum for
  the one-swap mutations EvoPress makes most; kept in evopress_neighbours.jsonl, a set at a time (resumable).
- greedy: EvoPress from the greedy start, the greedy KL list at 6 taken from the study's searches (the same
  model and windows) rather than searched again (sleb.Evolution(start=...)), kept after every generation
  (resumable).
- random: the same EvoPress search from random sets only (Evolution(greedy_start=False), as EvoPress's own code
  starts), kept after every generation (resumable).
- report: writes evopress_check.md in the study's folder from whatever of the three has been measured.

Every file is keyed by the GGUF's sha256 and the windows' sha256; another key is measured again.
"""

import json
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import sleb
from bench import command, cores, real_model
from sleb import blocks, identity, results
from sleb.errors import UsageError

COUNT = 6
PARTS = ("neighbours", "greedy", "random", "report")


def _setup(gguf: str, out: str):
    model, tokenizer = sleb.load(gguf, dtype="float32", device="cpu")
    windows = sleb.calibration_windows(tokenizer, "demo", real_model.CALIBRATION_ROWS["demo"], real_model.SEQLEN,
                                       model=model)
    key = {"model_sha256": real_model.file_sha256(gguf), "windows_sha256": identity.windows_hash(windows)}
    return model, windows, key


def _greedy(out: str, key: dict) -> list:
    """The greedy KL list at COUNT, from the study's searches (the same model and windows)."""
    for line in open(os.path.join(out, "searches.jsonl")):
        entry = json.loads(line)
        found = entry["key"]
        if (isinstance(found, dict) and found["metric"] == "sleb" and found["objective"] == "kl"
                and found["model_sha256"] == key["model_sha256"] and found["windows_sha256"] == key["windows_sha256"]
                and len(entry["phases"]) >= COUNT):
            return sorted(entry["phases"][COUNT - 1][0])
    raise UsageError(f"no greedy KL search on these windows in {out}/searches.jsonl: run bench.real_model first")


def neighbours(gguf: str, out: str) -> None:
    model, windows, key = _setup(gguf, out)
    greedy = _greedy(out, key)
    depth = blocks.num_blocks(model)
    candidates = range(1, depth - 1)  # the barriers: the first and the last block are never removed
    sets = [greedy] + [sorted(set(greedy) - {out_} | {into}) for out_ in greedy for into in candidates
                       if into not in greedy]
    path = os.path.join(out, "evopress_neighbours.jsonl")
    done = {}
    if os.path.isfile(path):
        for line in open(path):
            entry = json.loads(line)
            if entry["key"] == key:
                done[tuple(entry["removed"])] = entry
    dense = sleb.dense_distributions(model, windows)
    for removed in sets:
        if tuple(removed) in done:
            continue
        with cores.Watch() as watch, sleb.skipping(model, removed):
            kl = sleb.kl_to_dense(model, dense, progress=False)
        entry = {"key": key, "removed": removed, "kl": kl, "greedy": removed == greedy, "timing": watch.record()}
        with open(path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        done[tuple(removed)] = entry
        print(json.dumps(entry), flush=True)


def _evolve(gguf: str, out: str, name: str, greedy_start: bool) -> None:
    """One EvoPress search at COUNT, kept after every generation (resumable)."""
    model, windows, key = _setup(gguf, out)
    path = os.path.join(out, f"evopress_{name}_{COUNT}_{real_model.key_name(key)}.json")
    found = sleb.SearchResult.from_dict(json.load(open(path))) if os.path.isfile(path) else None
    if found is not None and found.status == "done":
        print(f"done: {found.removal_list}")
        return
    evolution = sleb.Evolution(greedy_start=greedy_start, start=tuple(_greedy(out, key)) if greedy_start else None)
    watch = cores.Watch()
    with watch:
        found = sleb.search(model, windows, COUNT, "evopress", objective="kl", progress=True, resume=found,
                            evolution=evolution, on_phase=lambda partial: results.write_json(path, partial.to_dict()))
    results.write_json(path, found.to_dict())
    print(f"done: {found.removal_list} ({watch.record()})")


def greedy_start(gguf: str, out: str) -> None:
    _evolve(gguf, out, "greedy_start", True)


def random_start(gguf: str, out: str) -> None:
    _evolve(gguf, out, "random_start", False)


def main(gguf: str, part: str, out: str = os.path.join(ROOT, "docs", "real_model")):
    if part not in PARTS:
        raise UsageError(f"--part must be one of {', '.join(PARTS)}; got {part!r}")
    if not os.path.isfile(gguf):
        raise UsageError(f"no GGUF file at {gguf!r}")
    {"neighbours": neighbours, "greedy": greedy_start, "random": random_start, "report": report}[part](gguf, out)


def _search_file(out: str, prefix: str, key: dict):
    """The search result kept under `prefix` for this key, or None."""
    for name in sorted(os.listdir(out)):
        if name.startswith(prefix) and name.endswith(".json") and not name.endswith("_timing.json"):
            found = json.load(open(os.path.join(out, name)))
            if found.get("identity", {}).get("windows_sha256") == key["windows_sha256"]:
                return found
    return None


def _run_lines(title: str, found, greedy_value) -> list:
    """What one EvoPress run did: where it started, whether any generation improved, where it ended."""
    if found is None:
        return [f"- {title}: not run yet."]
    generations = found["generations"]
    values = [g["value"] for g in generations]
    improved = [g["generation"] for g, before in zip(generations[1:], values) if g["value"] < before]
    last = generations[-1]
    line = (f"- {title}: {len(generations) - 1} generations ({found['status']}, {found['total_seconds']:.0f} s); "
            f"generation 0 picked {generations[0]['best']} (loss {values[0]:.2f}); "
            + (f"improved in generations {improved[:12]}{' ...' if len(improved) > 12 else ''}; " if improved
               else "no later generation improved on it; ")
            + f"it ends on {last['best']} (loss {last['value']:.2f})")
    if greedy_value is not None:
        line += (", the greedy list's loss" if abs(last["value"] - greedy_value) < 1e-6 else
                 f", {'below' if last['value'] < greedy_value else 'above'} the greedy list's {greedy_value:.2f}")
    return [line + "."]


def report(gguf: str, out: str) -> None:
    _, windows, key = _setup(gguf, out)
    greedy = _greedy(out, key)
    lines = [f"# EvoPress on SmolLM2-135M-Instruct: {COUNT} of 30 blocks, KL to dense, demo calibration", "",
             "Written by `python -m bench.evopress_check --gguf SmolLM2-135M-Instruct.Q4_1.gguf --part report` from "
             "what its other parts and the study measured (the module's docstring says how). Windows: "
             f"{windows.shape[0]} x {windows.shape[1]} tokens, sha256 {key['windows_sha256'][:16]}...; GGUF sha256 "
             f"{key['model_sha256'][:16]}.... EvoPress's loss is the search objective (sum over windows of the mean "
             "KL per token x seqlen); the neighbours' KL is the mean per token.", "",
             f"The greedy KL list at {COUNT}: {greedy}.", ""]
    path = os.path.join(out, "evopress_neighbours.jsonl")
    found = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    found = [entry for entry in found if entry["key"] == key]
    depth, greedy_kl = 30, next((entry["kl"] for entry in found if entry["greedy"]), None)
    total = COUNT * (depth - 2 - COUNT)
    if greedy_kl is None:
        lines.append("- One-swap neighbours: not measured yet.")
    else:
        others = sorted((entry for entry in found if not entry["greedy"]), key=lambda entry: entry["kl"])
        better = [entry for entry in others if entry["kl"] < greedy_kl]
        lines.append(f"- One-swap neighbours: {len(others)} of {total} measured; the greedy list's KL is "
                     f"{greedy_kl:.4f} per token; " + (
                         f"{len(better)} neighbours are lower, the lowest {others[0]['removed']} at "
                         f"{others[0]['kl']:.4f}" if better else
                         f"none is lower (the closest, {others[0]['removed']}, is {others[0]['kl']:.4f})"
                         if others else "none measured") + ".")
    shape = f"{windows.shape[0]}x{windows.shape[1]}"
    study = (_search_file(out, f"evopress_greedy_start_{COUNT}_", key)
             or _search_file(out, f"search_evopress_kl_demo_{shape}_{COUNT}_", key))
    greedy_value = study["generations"][0]["greedy_value"] if study else None
    lines += _run_lines("From the greedy start", study, greedy_value)
    lines += _run_lines("From random sets only", _search_file(out, f"evopress_random_start_{COUNT}_", key), greedy_value)
    lines += ["", "The study's other EvoPress rows, from the greedy start:"]
    for count in (3, 9):
        found = _search_file(out, f"search_evopress_kl_demo_{shape}_{count}_", key)
        lines += _run_lines(f"{count} of 30", found, found["generations"][0]["greedy_value"] if found else None)
    results.write_text(os.path.join(out, "evopress_check.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    command(main)
