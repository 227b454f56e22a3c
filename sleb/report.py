"""`python -m sleb.report FOLDER --out report.md`: every results JSON in FOLDER as tables and plots.

Perplexity, KL to dense and zero-shot by model x blocks removed x metric, each search's list against
the paper's sleb list, latency against the ideal speedup, and
PNGs: perplexity vs blocks removed per metric, each search's candidate-loss heatmap, speedup vs
ideal. Partial folders are fine; a file that is not a sleb result is skipped with a one-line warning.
"""

import json
import os
import statistics
import sys
from collections import defaultdict


from sleb import metrics
from sleb.errors import UsageError
from sleb.model_card import compensated_metric

COMMANDS = ("sleb", "eval", "latency", "heal")


def load_results(folder: str) -> list:
    found = []
    for root, subdirs, files in os.walk(folder):  # subdirs sorted in place: a stable order
        # Saved checkpoints (pruned, healed) sit beside the results; their JSON files are not results.
        subdirs[:] = sorted(d for d in subdirs if not os.path.isfile(os.path.join(root, d, "config.json")))
        for name in sorted(files):
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as handle:
                    record = json.load(handle)
                if not isinstance(record, dict) or record.get("command") not in COMMANDS:
                    raise ValueError("no sleb command")
                if record["command"] == "sleb" and record.get("search", {}).get("status") != "done":
                    raise ValueError("search not finished")
            except (OSError, ValueError, KeyError, AttributeError) as error:
                print(f"warning: skipping {path}: not a finished sleb result ({error})", file=sys.stderr)
                continue
            record["_path"] = path
            found.append(record)
    return found


def _model(record) -> str:
    # A healed run names the model its checkpoint was pruned from.
    name = record.get("base_model") or record["settings"]["model_name"]
    return os.path.basename(str(name).rstrip("/")) or "model"


def _metric(record) -> str:
    if record["command"] == "heal":
        return f"{record.get('source_metric', 'given')} + " + ("blocks trained" if record.get("trained_blocks") else "LoRA")
    if record["command"] == "eval" and not record["removal_list"]:
        return "dense"
    return compensated_metric(record)


def _searched_by(record):
    """The metric record of a search run; None for every other run."""
    return metrics.get(record["settings"].get("metric", metrics.PAPER)) if record["command"] == "sleb" else None


def _calibration(record) -> str:
    settings = record["settings"]
    if record["command"] == "heal":
        steps = (record.get("loss_curve") or [{"step": 0}])[-1]["step"]
        how = f"blocks {record['trained_blocks']}" if record.get("trained_blocks") else "LoRA"
        return f"{how} on {settings['dataset']}, {steps} steps"
    if record["command"] != "sleb" or not _searched_by(record).calibrated:
        return "-"  # given lists and random choices use no calibration data
    return f"{settings['dataset']}, {settings['nsamples']} rows, seed {settings['seed']}"


def _group(record) -> tuple:
    """Runs that are the same experiment: random runs differ only in their seed and are averaged;
    every other run is its own row unless model, list, metric and calibration all agree."""
    metric = _searched_by(record)
    removed = () if metric and metric.seeded_draw else tuple(record["removal_list"])
    return (_model(record), len(record["removal_list"]), _metric(record), _calibration(record), removed)


def quality_rows(records: list):
    """One row per experiment (see _group); random runs averaged over their seeds."""
    groups = defaultdict(list)
    datasets, kl_datasets, tasks = [], [], []
    for record in records:
        if record["command"] == "latency":
            continue
        for name in (record.get("ppl") or {}):
            if name not in datasets:
                datasets.append(name)
        for name in (record.get("kl_to_dense") or {}):
            if name not in kl_datasets:
                kl_datasets.append(name)
        for name in (record.get("zeroshot") or {}).get("tasks", {}):
            if name not in tasks:
                tasks.append(name)
        groups[_group(record)].append(record)
    accuracy_columns = tasks + ["mean"] if tasks else []
    rows = []
    for (model, removed, metric, calibration, _), group in sorted(groups.items()):
        depth = group[0]["num_blocks"]
        runs = "seeds" if any(_searched_by(r) and _searched_by(r).seeded_draw for r in group) else "runs"
        row = [model, f"{removed}/{depth} ({100 * removed / depth:.0f}%)", metric + (
            f" (mean of {len(group)} {runs})" if len(group) > 1 else ""), calibration]
        for name in datasets:
            values = [r["ppl"][name]["ppl"] for r in group if name in (r.get("ppl") or {})]
            row.append(f"{statistics.mean(values):.2f}" if values else "-")
        for name in kl_datasets:
            values = [r["kl_to_dense"][name]["kl"] for r in group if name in (r.get("kl_to_dense") or {})]
            row.append(f"{statistics.mean(values):.4f}" if values else "-")
        for name in accuracy_columns:
            accs = [_accuracy(r["zeroshot"], name) for r in group if r.get("zeroshot")]
            accs = [a for a in accs if a is not None]
            row.append(f"{100 * statistics.mean(accs):.2f}" if accs else "-")
        seconds = [r["times"]["search_s"] for r in group if "search_s" in r.get("times", {})]
        row.append(f"{statistics.mean(seconds):.1f}" if seconds else "-")
        lists = []
        for record in group:
            if record["removal_list"] and record["removal_list"] not in lists:
                lists.append(record["removal_list"])
        row.append("; ".join(str(blocks) for blocks in lists) or "-")
        rows.append(row)
    headers = ["model", "removed", "metric", "calibration"] + [f"ppl {name}" for name in datasets]
    headers += [f"KL to dense {name} (nats/token)" for name in kl_datasets]
    headers += [f"{name} acc (%)" if name != "mean" else "zero-shot mean acc (%)" for name in accuracy_columns]
    headers += ["search (s)", "removed blocks"]
    return headers, rows


def _accuracy(zeroshot: dict, task: str):
    if task == "mean":
        return zeroshot["mean"]["acc"]
    return zeroshot["tasks"].get(task, {}).get("acc")


def _first_value(record, field: str, key: str):
    """The first evaluation set's `key` under `field` (ppl or kl_to_dense), or None."""
    values = record.get(field) or {}
    return next(iter(values.values()))[key] if values else None


def sleb_difference_rows(records: list):
    """Each searched list against the paper's sleb list (cross-entropy, same model, count and
    calibration): whether it differs, by which blocks, and what that did to perplexity and KL to dense
    on the first evaluation set."""
    reference = {}
    for record in records:
        if record["command"] == "sleb" and _metric(record) == metrics.PAPER:
            reference[(_model(record), len(record["removal_list"]), _calibration(record))] = record
    rows = []
    for record in sorted(records, key=lambda r: (_model(r), len(r.get("removal_list") or []), _metric(r))):
        key = (_model(record), len(record.get("removal_list") or []), _calibration(record))
        base = reference.get(key)
        if record["command"] != "sleb" or base is None or record is base or _searched_by(record).seeded_draw:
            continue
        mine, theirs = set(record["removal_list"]), set(base["removal_list"])
        changes = "same set" if mine == theirs else (f"-{sorted(theirs - mine)} +{sorted(mine - theirs)}")
        cells = [key[0], key[1], _metric(record), str(record["removal_list"]), str(base["removal_list"]), changes]
        for field, name, digits in (("ppl", "ppl", 2), ("kl_to_dense", "kl", 4)):
            a, b = _first_value(record, field, name), _first_value(base, field, name)
            cells.append(f"{a - b:+.{digits}f}" if a is not None and b is not None else "-")
        rows.append(cells)
    headers = ["model", "removed", "metric", "removed blocks", "sleb's", "difference", "ppl - sleb's",
               "KL to dense - sleb's"]
    return headers, rows


def latency_rows(records: list):
    rows = []
    for record in records:
        if record["command"] != "latency":
            continue
        sizes = record["sizes"]
        compiled = " compiled" if record["settings"].get("compile") else ""
        rows.append([_model(record), record["mode"] + compiled,
                     f"{sizes['batch_size']}x{sizes['prompt_len']}+{sizes['new_tokens']}",
                     f"{record['dense']['median_s'] * 1e3:.1f}", f"{record['pruned']['median_s'] * 1e3:.1f}",
                     f"{record['speedup']:.3f}x", f"{record['ideal_speedup']:.3f}x",
                     f"{100 * record['speedup_over_ideal']:.1f}%", record["environment"]["device"]])
    headers = ["model", "mode", "batch x prompt + new", "dense (ms)", "pruned (ms)", "speedup", "ideal",
               "of ideal", "device"]
    return headers, rows


def _plots(records: list, out_dir: str, stem: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from sleb.plots import plot_search

    written = []
    quality = [r for r in records if r["command"] != "latency" and r.get("ppl")]
    for model in sorted({_model(r) for r in quality}):
        mine = [r for r in quality if _model(r) == model]
        dataset = next(iter(mine[0]["ppl"]))
        series = defaultdict(lambda: defaultdict(list))
        dense = [r["ppl"][dataset]["ppl"] for r in mine if not r["removal_list"] and dataset in r["ppl"]]
        for r in mine:
            if r["removal_list"] and dataset in r["ppl"]:
                series[_metric(r)][len(r["removal_list"])].append(r["ppl"][dataset]["ppl"])
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for metric, points in sorted(series.items()):
            xs = sorted(points)
            ys = [statistics.mean(points[x]) for x in xs]
            ax.plot(([0] + xs) if dense else xs, ([dense[0]] + ys) if dense else ys, marker="o", label=metric)
        ax.set_xlabel("blocks removed")
        ax.set_ylabel(f"perplexity ({dataset})")
        lows, highs = zip(*[(min(line.get_ydata()), max(line.get_ydata())) for line in ax.get_lines()])
        if max(highs) > 10 * min(lows):  # pruning large fractions can blow perplexity up by orders of magnitude
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(model)
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"{stem}_ppl_{model}.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for record in records:
        if record["command"] == "sleb" and record["settings"].get("metric") == "sleb":
            prefix = os.path.join(out_dir, f"{stem}_{os.path.splitext(os.path.basename(record['_path']))[0]}")
            written += plot_search(record, prefix)
    latency = [r for r in records if r["command"] == "latency"]
    if latency:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(latency)), 4))
        labels = [f"{_model(r)}\n{r['mode']}" for r in latency]
        xs = range(len(latency))
        ax.bar([x - 0.2 for x in xs], [r["speedup"] for r in latency], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r["ideal_speedup"] for r in latency], 0.4, label="ideal N/(N-k)")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("speedup")
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"{stem}_speedup.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def run(settings) -> None:
    """`sleb report`: write `out` (markdown) and PNGs beside it from the results JSONs under `folder`."""
    settings.check()
    folder, out = settings.folder, settings.out
    if not os.path.isdir(folder):
        raise UsageError(f"results folder {folder!r} does not exist")
    records = load_results(folder)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    lines = [f"# sleb report: {folder}", "", f"{len(records)} results.", ""]
    headers, rows = quality_rows(records)
    if rows:
        lines += ["## Perplexity and zero-shot accuracy", "", _markdown(headers, rows), ""]
    headers, rows = sleb_difference_rows(records)
    if rows:
        lines += ["## Against the paper's sleb list", "",
                  "Each search's list beside sleb's (cross-entropy, same model, count and calibration), on the "
                  "first evaluation set. A list can differ in order only: sleb removes in phases, evopress "
                  "returns a set.", "", _markdown(headers, rows), ""]
    headers, rows = latency_rows(records)
    if rows:
        lines += ["## Latency", "", _markdown(headers, rows), ""]
    pngs = _plots(records, out_dir, stem)
    if pngs:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    with open(out, "w") as handle:
        handle.write("\n".join(lines))
    print(f"report written to {out} ({len(records)} results, {len(pngs)} plots)")


def _markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])

