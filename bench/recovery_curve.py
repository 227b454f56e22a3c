"""The recovery curve: what a pruned SmolLM2-135M-Instruct wins back against the minutes of training it costs,
written to docs/real_model/recovery_curve.{jsonl,md,png}.

    python -m bench.recovery_curve --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--counts 3,6] [--methods a,b] [--levels 1,2]
    python -m bench.recovery_curve --gguf SmolLM2-135M-Instruct.Q4_1.gguf --table_only True

For each count of blocks removed, the removal list is that of the study's best search at that count without
training (the row of docs/real_model/rows.jsonl, under the same key, with the most answers kept and recovery
none or linear). Each method is run at levels 1..4 of its own step grid (STEPS: each level four times the
steps of the one before, sized for about 2, 8, 30 and 120 minutes on these 2 cores; the x axis is the time
each point's training actually took). Every point starts again from the pruned model, since a learning-rate
schedule that ends at a step is not the same run stopped early. The methods:

- lora_kl: LoRA (rank 8 on every projection) distilled from the dense model's next-token distributions;
- full_kl: the same loss, every parameter of the block in front of each removed run trained, LoRA none;
- local: local reconstruction (--compensate local) of the block in front of each run, steps per block;
- local_kl: local reconstruction (LOCAL_FIRST steps) and then LoRA KL.

Training text: TRAIN_TEXTS chat replies the dense model wrote itself (--dataset self), windows of 256
tokens. Each point is measured as the study's rows are (bench/real_model.py's Dense.measure): answers kept
of the dense model's right answers, demo perplexity, KL to dense, greedy agreement (the demo tasks left out:
minutes each per point). The 0-minute point of
each count is plain removal. The x axis is the training's wall minutes, with the process's CPU seconds and
whether other processes shared the cores (bench/cores.py) kept beside it.

Every point is keyed by the study's key (GGUF sha256, question set, lm-eval, sleb), the removal list, the
method, its steps and settings, and the training windows' sha256; a point under another key is measured
again. Points are appended as they are measured, so an interrupted run resumes; the LoRA and full-parameter
runs also resume from their last Trainer checkpoint.
"""

import copy
import hashlib
import json
import os
import shutil
import time

import torch

import sleb
from bench import choices, command, cores
from bench.real_model import ROOT, SEQLEN, Dense, _read_rows, file_sha256, study_key
from sleb import results
from sleb.errors import UsageError
from sleb.recovery.lora import last_complete_checkpoint

TRAIN_TEXTS = 128
LOCAL_FIRST = 200  # local_kl: the local stage's steps per block, then the LoRA KL steps of the level
STEPS = {"lora_kl": (25, 100, 400, 1600), "full_kl": (25, 100, 400, 1600), "local": (100, 400, 1600, 6400),
         "local_kl": (25, 100, 400, 1600)}
NAMES = {"lora_kl": "LoRA KL", "full_kl": "full-parameter KL (blocks before each run)", "local": "local reconstruction",
         "local_kl": f"local ({LOCAL_FIRST} steps) then LoRA KL"}
# One window a step: a LoRA step over 8 windows took 37 s here on one shared thread, so 25 of them were 15
# minutes, where one window a step makes the levels about 2, 8, 30 and 120 minutes.
TRAINER = dict(warmup_steps=5, train_batch_size=1, grad_accum=1, logging_steps=25, save_steps=100)
SETTINGS = {"lora_kl": dict(TRAINER, lora_r=8, lora_alpha=16, lr=5e-4, objective="kl"),
            "full_kl": dict(TRAINER, lr=5e-5, objective="kl", train_blocks="before"),
            "local": dict(local_lr=1e-4),
            "local_kl": dict(TRAINER, lora_r=8, lora_alpha=16, lr=5e-4, objective="kl", local_lr=1e-4)}
TARGETS = {3: 0.9, 6: 0.7}  # answers kept the issue asks for, within 2 hours of training


def best_lists(out: str, key: dict) -> dict:
    """{count: removal list} of the study's best search without training at each count."""
    rows = [row for row in _read_rows(os.path.join(out, "rows.jsonl"), key)[0]
            if row["recovery"] in ("none", "linear")]
    best = {}
    for row in sorted(rows, key=lambda r: -r["answers_kept"]):
        best.setdefault(row["removed"], row["removal_list"])
    return best


def windows_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def point_key(study: dict, removal_list: list, method: str, steps: int, windows_digest: str) -> dict:
    return {**study, "removal_list": removal_list, "method": method, "steps": steps, "settings": SETTINGS.get(method),
            "local_first": LOCAL_FIRST if method == "local_kl" else None, "train_windows": windows_digest}


def _work_dir(key: dict) -> str:
    """The Trainer's checkpoints of one point (to resume from), outside the repository."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    base = os.environ.get("SLEB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sleb"))
    return os.path.join(base, "recovery_work", name)


def train(model, windows, distributions, removal_list: list, method: str, steps: int, work: str):
    """The pruned `model` trained by `method` for `steps`: (the model, what training reported)."""
    settings = dict(SETTINGS[method])
    local_lr = settings.pop("local_lr", None)
    report = {}
    if method in ("local", "local_kl"):
        local_steps = steps if method == "local" else LOCAL_FIRST
        done = sleb.compensate(model, windows, removal_list, method="local", local_steps=local_steps,
                               local_lr=local_lr, progress=False)
        report["local_runs"] = [run.record() for run in done.runs]
    else:
        sleb.remove_blocks(model, removal_list)
    if method == "local":
        return model, report
    os.makedirs(work, exist_ok=True)
    healed = sleb.heal(model, windows=windows, dense=distributions, max_steps=steps, work_dir=work,
                       resume_from=last_complete_checkpoint(work), **settings)
    report.update(loss_curve=healed.loss_curve, targets=healed.targets)
    return healed.model, report


def measure_point(dense: Dense, windows, distributions, removal_list: list, method: str, steps: int,
                  key: dict) -> dict:
    model, report = copy.deepcopy(dense.model), {}
    with cores.Watch() as watch:
        if method == "none":
            sleb.remove_blocks(model, removal_list)
        else:
            model, report = train(model, windows, distributions, removal_list, method, steps, _work_dir(key))
    timing = watch.record()
    shutil.rmtree(_work_dir(key), ignore_errors=True)  # the point is trained: its checkpoints are spent
    figures, _ = dense.measure(model, ["answers"])
    return {"key": key, "count": len(removal_list), "method": method, "steps": steps,
            "train_minutes": 0.0 if method == "none" else round(timing["seconds"] / 60, 2),
            "train_timing": timing, "threads": torch.get_num_threads(), **report, **figures}


def _read_points(path: str) -> list:
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def _current(point: dict, study: dict) -> bool:
    """Made on this model, question set, lm-eval and sleb, with the settings the grid has now."""
    key = point["key"]
    return ({k: key.get(k) for k in study} == study and key.get("settings") == SETTINGS.get(point["method"])
            and key.get("local_first") == (LOCAL_FIRST if point["method"] == "local_kl" else None))


def plan(counts, methods, levels) -> list:
    """(count, method, steps) in the order they run: the cheapest level of every method and count first, so an
    interrupted run leaves a whole curve at low cost before it spends hours on one point."""
    counts = [int(c) for c in choices(counts, ["3", "6"], "counts")]
    methods = choices(methods, list(STEPS), "methods")
    levels = [int(level) for level in choices(levels, ["1", "2", "3", "4"], "levels")]
    return [(count, "none", 0) for count in counts] + [
        (count, method, STEPS[method][level - 1]) for level in levels for count in counts for method in methods]


def write_page(out: str, points: list, dense_right: int) -> str:
    """recovery_curve.md and .png from the points; returns the table."""
    lines = ["| blocks | method | steps | training min | answers kept | ppl demo | KL to dense | agreement prefix / "
             "overall % |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["count"], p["method"], p["steps"])):
        mark = "" if p["method"] == "none" else {"alone": "", "shared": "*", "unknown": "?"}[p["train_timing"]["cores"]]
        lines.append(f"| {p['count']} | {NAMES.get(p['method'], 'removal alone')} | {p['steps']} | "
                     f"{p['train_minutes']:.1f}{mark} | {100 * p['answers_kept']:.1f}% ({p['answers_kept_count'][0]}/"
                     f"{p['answers_kept_count'][1]}) | {p['ppl_demo']:.2f} | {p['kl_to_dense']:.3f} | "
                     f"{p['agreement_prefix']:.1f} / {100 * p['agreement_overall']:.1f} |")
    table = "\n".join(lines)
    key = points[0]["key"] if points else {}
    text = "\n".join([
        "# Recovery curve: SmolLM2-135M-Instruct, answers kept against minutes of training", "",
        "Written by `python -m bench.recovery_curve --gguf SmolLM2-135M-Instruct.Q4_1.gguf` (every figure in "
        "recovery_curve.jsonl; the module's docstring says how each point is made). Training text: "
        f"{TRAIN_TEXTS} chat replies the dense model wrote itself, windows of {SEQLEN} tokens. Minutes are wall "
        f"time of the training alone, on one thread; * marks a point whose training shared the cores with other "
        f"work. Answers kept: of the {dense_right} questions the dense model gets right. Targets: "
        + ", ".join(f"{int(100 * share)}% at {count} of 30" for count, share in TARGETS.items())
        + " within 2 hours.", "",
        f"Keyed by: GGUF sha256 {key.get('model_sha256', '?')[:16]}..., question set {key.get('question_set')}, "
        f"lm-eval {key.get('lm_eval')}, sleb {key.get('sleb')}.", "", table, "",
        "![answers kept against training minutes](recovery_curve.png)", ""])
    results.write_text(os.path.join(out, "recovery_curve.md"), text)
    _plot(out, points)
    return table


def _plot(out: str, points: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({p["count"] for p in points})
    if not counts:
        return
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
    for ax, count in zip(axes[0], counts):
        base = [p for p in points if p["count"] == count and p["method"] == "none"]
        for p in base:  # plain removal: where every curve of this count starts
            ax.plot([0], [100 * p["answers_kept"]], marker="s", color="black", linestyle="none",
                    label="removal alone")
        for method in STEPS:
            mine = sorted((p for p in points if p["count"] == count and p["method"] == method),
                          key=lambda p: p["steps"])
            if mine:
                line = base + mine
                ax.plot([p["train_minutes"] for p in line], [100 * p["answers_kept"] for p in line], marker="o",
                        label=NAMES[method])
        if count in TARGETS:
            ax.axhline(100 * TARGETS[count], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set(xscale="symlog", xlabel="training minutes (wall, one thread)", ylabel="answers kept (%)",
               title=f"{count} of 30 blocks removed", ylim=(0, 100))
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: answers kept against training")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recovery_curve.png"), dpi=110)
    plt.close(fig)


def main(gguf: str = "", counts="3,6", methods=",".join(STEPS), levels="1,2,3,4",
         out: str = os.path.join(ROOT, "docs", "real_model"), table_only: bool = False):
    todo = plan(counts, methods, levels)  # bad flags are refused before anything loads
    path = os.path.join(out, "recovery_curve.jsonl")
    if table_only:
        dense_row = results.read_json(os.path.join(out, "dense.json"))
        points = [p for p in _read_points(path) if _current(p, dense_row["key"])]
        print(write_page(out, points, dense_row["answers_right"]))
        return
    if not os.path.isfile(gguf):
        raise UsageError(f"no GGUF file at {gguf!r}")
    study = study_key(file_sha256(gguf))
    lists = best_lists(out, study)
    missing = sorted({count for count, _, _ in todo} - set(lists))
    if missing:
        raise UsageError(f"no study row at {missing[0]} blocks under this key: run python -m bench.real_model first")
    dense = Dense(gguf, out, study)
    windows = sleb.calibration_windows(dense.tokenizer, "self", TRAIN_TEXTS, SEQLEN, model=dense.model)
    digest = windows_sha256(windows)
    distributions = sleb.dense_distributions(dense.model, windows, progress=False)
    right = len(dense.zeroshot["right"]["answers"])
    points = _read_points(path)
    for count, method, steps in todo:
        key = point_key(study, lists[count], method, steps, digest)
        if any(p["key"] == key for p in points):
            continue
        started = time.perf_counter()
        point = results.to_jsonable(measure_point(dense, windows, distributions, lists[count], method, steps, key))
        point["point_seconds"] = round(time.perf_counter() - started, 1)
        points.append(point)
        with open(path, "a") as handle:
            handle.write(json.dumps(point) + "\n")
        write_page(out, [p for p in points if _current(p, study) and p["key"]["train_windows"] == digest], right)
        print(json.dumps({k: point[k] for k in ("count", "method", "steps", "train_minutes", "answers_kept",
                                                 "ppl_demo", "kl_to_dense")}), flush=True)


if __name__ == "__main__":
    command(main)
