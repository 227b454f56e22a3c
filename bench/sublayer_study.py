"""Sub-layers on the real model: SmolLM2-135M-Instruct with attentions and MLPs removed by the greedy search
(`sleb.search_sublayers`) at the weight budgets of 3 and 6 blocks, each measured as the study's block rows
are, written to docs/real_model/sublayer_rows.jsonl and sublayers.md.

    python -m bench.sublayer_study --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--budgets 3,6] [--units mlp,attention]
    python -m bench.sublayer_study --gguf SmolLM2-135M-Instruct.Q4_1.gguf --table_only True

Calibration: the first WINDOWS of the study's self windows (the dense model's own chat replies, 256 tokens
each), kept few because a sub-layer phase scores 2 candidates per block (56 here) on one thread; objectives
ce and kl. Unit "block" is the
paper's block search on the same windows, so that every row compares like with like. A search to budget 6
is not the search to budget 3 carried on (the last phase may overshoot), so each budget is its own search.
Rows are keyed by the study's key (GGUF sha256, question set, lm-eval, sleb) and the calibration windows'
sha256, appended as they are measured (an interrupted run resumes at the next row); the table sets them
beside the block rows of rows.jsonl at the same count, under the same key.
"""

import copy
import json
import os
import time

import sleb
from bench import choices, command, cores
from bench.real_model import ROOT, Dense, _read_rows, file_sha256, study_key
from sleb import identity, results
from sleb.errors import UsageError

UNITS = ("block", "mlp", "attention", "sublayer")  # the order they run in: the cheapest searches first
WINDOWS = 4


def measure(dense: Dense, windows, budget: int, unit: str, objective: str, key: dict) -> dict:
    model = copy.deepcopy(dense.model)
    with cores.Watch() as watch:
        if unit == "block":
            found = sleb.search(model, windows, budget, "sleb", objective=objective, progress=False)
            weights, budget_weights = budget, budget  # whole blocks: the budget spent exactly
        else:
            found = sleb.search_sublayers(model, windows, budget, unit, objective=objective, progress=False)
            weights, budget_weights = found.weights_removed, found.budget
    sleb.remove_blocks(model, found.removal_list)
    figures, _ = dense.measure(model, ["answers"])
    return {"key": key, "budget_blocks": budget, "unit": unit, "objective": objective,
            "removal_list": found.removal_list,
            "weights_removed": weights, "budget_weights": budget_weights, "losses": found.losses,
            "search_timing": watch.record(), **figures}


def write_page(out: str, rows: list, block_rows: list, dense_right: int) -> str:
    lines = ["| weight budget (blocks) | unit | removal list | weights removed (blocks) | answers kept | ppl demo | "
             "KL to dense | agreement prefix | search min |", "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(block_rows, key=lambda r: (r["removed"], r["method"])):
        if row["recovery"] == "none" and row["removed"] in {r["budget_blocks"] for r in rows}:
            lines.append(f"| {row['removed']} | block, the study's {row['method']} ({row['calibration_windows'][0]} "
                         f"windows) | {row['removal_list']} | {row['removed']} | "
                         f"{100 * row['answers_kept']:.1f}% ({row['answers_kept_count'][0]}) | {row['ppl_demo']:.2f} | "
                         f"{row['kl_to_dense']:.3f} | {row['agreement_prefix']:.1f} | - |")
    for row in sorted(rows, key=lambda r: (r["budget_blocks"], r["objective"], UNITS.index(r["unit"]))):
        mark = {"alone": "", "shared": "*", "unknown": "?"}[row["search_timing"]["cores"]]
        lines.append(f"| {row['budget_blocks']} | {row['unit']}, {row['objective']} ({WINDOWS} self windows) | "
                     f"{', '.join(map(str, row['removal_list']))} | "
                     f"{row['weights_removed'] / row['budget_weights'] * row['budget_blocks']:.2f} | "
                     f"{100 * row['answers_kept']:.1f}% ({row['answers_kept_count'][0]}) | {row['ppl_demo']:.2f} | "
                     f"{row['kl_to_dense']:.3f} | {row['agreement_prefix']:.1f} | "
                     f"{row['search_timing']['seconds'] / 60:.1f}{mark} |")
    table = "\n".join(lines)
    text = "\n".join([
        "# Sub-layers on SmolLM2-135M-Instruct: attentions and MLPs removed, against whole blocks", "",
        "Written by `python -m bench.sublayer_study --gguf SmolLM2-135M-Instruct.Q4_1.gguf` (every figure in "
        "sublayer_rows.jsonl; the module's docstring says how). The greedy search over sub-layers "
        f"(`python -m sleb --unit ...`) on the first {WINDOWS} of the study's self calibration windows, "
        "objectives ce and kl, each budget its own search; measured as the block rows of [README.md](README.md) "
        "are (the demo tasks left out), and set beside the block rows without recovery at the same count. "
        "Answers kept: of the "
        f"{dense_right} questions the dense model gets right. Search minutes are wall time on one thread; * marks "
        "a search that shared the cores with other work.", "", table, ""])
    results.write_text(os.path.join(out, "sublayers.md"), text)
    return table


def main(gguf: str = "", budgets="3,6", units=",".join(UNITS), objectives="ce,kl",
         out: str = os.path.join(ROOT, "docs", "real_model"), table_only: bool = False):
    budgets = [int(b) for b in choices(budgets, [str(b) for b in range(1, 29)], "budgets")]
    units = choices(units, UNITS, "units")
    objectives = choices(objectives, ["ce", "kl"], "objectives")
    path = os.path.join(out, "sublayer_rows.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    if table_only:
        dense_row = results.read_json(os.path.join(out, "dense.json"))
        study = dense_row["key"]
        mine = [r for r in rows if {k: r["key"].get(k) for k in study} == study
                and r["key"].get("calibration") == f"self[:{WINDOWS}]"]
        print(write_page(out, mine, _read_rows(os.path.join(out, "rows.jsonl"), study)[0], dense_row["answers_right"]))
        return
    if not os.path.isfile(gguf):
        raise UsageError(f"no GGUF file at {gguf!r}")
    study = study_key(file_sha256(gguf))
    dense = Dense(gguf, out, study)
    windows = dense.calibration("self")[:WINDOWS]
    windows_key = {**study, "calibration": f"self[:{WINDOWS}]", "windows_sha256": identity.windows_hash(windows)}
    right = len(dense.zeroshot["right"]["answers"])
    for budget, objective, unit in [(b, o, u) for b in budgets for o in objectives for u in units]:
        key = {**windows_key, "budget_blocks": budget, "unit": unit, "objective": objective}
        if any(r["key"] == key for r in rows):
            continue
        started = time.perf_counter()
        row = results.to_jsonable(measure(dense, windows, budget, unit, objective, key))
        row["row_seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        mine = [r for r in rows if r["key"]["windows_sha256"] == windows_key["windows_sha256"]
                and {k: r["key"].get(k) for k in study} == study]
        write_page(out, mine, _read_rows(os.path.join(out, "rows.jsonl"), study)[0], right)
        print(json.dumps({k: row[k] for k in ("budget_blocks", "unit", "objective", "removal_list", "answers_kept",
                                              "ppl_demo", "kl_to_dense")}), flush=True)


if __name__ == "__main__":
    command(main)
