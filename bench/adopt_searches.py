"""Adopt the real-model study's searches made before searches were keyed (sleb 0.4.0), where their inputs can
be proven the same, so hours of search are not run again; the rest are left to be searched again.

    python -m bench.adopt_searches --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--out docs/real_model]

The proof is the EvoPress search file of that study (search_evopress_kl_demo_25x256_9.json): its recorded
identity holds the GGUF's sampled fingerprint and the demo calibration windows' sha256. Where this GGUF and
today's demo windows give the same two, the searches on demo windows are adopted under the file's sha256
(their timings marked "unknown": nobody recorded whether the cores were shared), and so are those on the chat
windows, which are made by the same tokenizer from the same corpus (their sha256 was not recorded, so it is
taken from today's windows). Searches on self-generated text are not adopted: that text is sampled again,
and nothing recorded proves it is the same.
"""

import json
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import sleb
from bench import command, real_model
from sleb import identity, results
from sleb.errors import UsageError

OLD_EVOPRESS = "search_evopress_kl_demo_25x256_9.json"


def main(gguf: str, out: str = os.path.join(ROOT, "docs", "real_model")):
    searches_file, evopress_file = os.path.join(out, "searches.jsonl"), os.path.join(out, OLD_EVOPRESS)
    if not os.path.isfile(gguf):
        raise UsageError(f"no GGUF file at {gguf!r}")
    if not os.path.isfile(evopress_file):
        raise UsageError(f"nothing to adopt: no {evopress_file}")
    old = json.load(open(evopress_file))
    model, tokenizer = sleb.load(gguf, dtype="float32", device="cpu")
    windows = {name: sleb.calibration_windows(tokenizer, f"file:{real_model.chat_file(out)}" if name == "chat" else name,
                                              real_model.CALIBRATION_ROWS[name], real_model.SEQLEN, model=model)
               for name in ("demo", "chat")}
    now = identity.model_identity(model)["weight_files"]
    proven = now == old["identity"]["model"]["weight_files"] and \
        identity.windows_hash(windows["demo"]) == old["identity"]["windows_sha256"]
    print(f"the GGUF's fingerprint {'matches' if now == old['identity']['model']['weight_files'] else 'differs from'} "
          f"the recorded one; demo windows {identity.windows_hash(windows['demo'])[:16]}, recorded "
          f"{old['identity']['windows_sha256'][:16]}")
    if not proven:
        raise UsageError("the old searches were made on another model or other windows: nothing adopted")
    sha = real_model.file_sha256(gguf)
    searches = real_model.Searches(out, 9, sha)
    unknown = {"seconds": None, "others_share": None, "cores": "unknown"}
    lines, adopted = [], []
    for line in open(searches_file):
        entry = json.loads(line)
        if isinstance(entry["key"], dict):
            lines.append(line)
            continue
        metric, objective, calibration, seqlen, count = entry["key"]
        if calibration not in windows or list(windows[calibration].shape) != [count, seqlen]:
            print(f"not adopted: {entry['key']} (its windows cannot be proven the same)")
            continue
        key = searches.key(windows[calibration], metric, objective)
        key["sleb"] = old["identity"]["versions"]["sleb"]  # the version that made it
        lines.append(json.dumps({"key": key, "calibration": calibration, "windows": [count, seqlen],
                                 "phases": entry["phases"], "timing": unknown, "adopted": "sleb 0.4.0 study"}) + "\n")
        adopted.append(entry["key"])
    results.write_text(searches_file, "".join(lines))
    key = searches.key(windows["demo"], "evopress", "kl")
    key["sleb"] = old["identity"]["versions"]["sleb"]
    base = os.path.join(out, f"search_evopress_kl_demo_25x{real_model.SEQLEN}_9_{real_model.key_name(key)}")
    os.replace(evopress_file, base + ".json")
    results.write_json(base + "_timing.json", {"key": key, "segments": [unknown]})
    print(f"adopted {len(adopted)} greedy searches {adopted} and the EvoPress search at 9 ({os.path.basename(base)})")


if __name__ == "__main__":
    command(main)
