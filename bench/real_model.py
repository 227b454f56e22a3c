"""The real-model study: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) with 3, 6 and 9 of its
30 blocks removed, one row per method, written to docs/real_model/ (rows.jsonl, README.md's table, plots).

    python -m bench.real_model --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--counts 3,6,9] [--rows a,b] [--out docs/real_model]
    python -m bench.real_model --gguf SmolLM2-135M-Instruct.Q4_1.gguf --speeds True

Everything runs in one process through the public API: the dense model is loaded once, and what every row is
compared with is taken from it once (perplexity, next-token distributions, greedy continuations, the
answers it gets right). Each row is then a copy of the dense model, searched on its calibration windows,
pruned (or compensated, or healed) and measured the same way. A row is appended to rows.jsonl as soon as it
is measured; a rerun skips the rows already there (resumable), and goes on with an EvoPress search from its
last generation (search_*.json); `--table_only True` rewrites the table and plots from rows.jsonl and prints the README's short table.

What a figure was made from is its key: every row, the dense model's answers and every search carry the
GGUF file's sha256, and rows also the question set's digest (sleb.questions.digest), the lm-eval version and
sleb's version; a search the sha256 of its calibration windows and sleb's version. A row or a search under
another key is stale: left out of the table and measured again, never mixed in.

Times are wall seconds, each with whether other processes shared the cores meanwhile (bench/cores.py):
"alone", "shared", or "unknown" for the searches made before that was recorded. The llama.cpp speedup of a
row is measured on that row's own pruned file (its removal list copied from the GGUF, bench/gguf_speed.py)
against the dense file, by `--speeds True`, apart from the rows so that nothing else shares the cores.

Calibration sets: demo (the demo corpus's docstrings), self (text sampled from the dense model through its
chat template, sleb/self_text.py), chat (the same docstrings as conversations, {"messages": [user asks what a
function does, assistant answers with its docstring]}, rendered by the chat template).
"""

import copy
import hashlib
import importlib.metadata
import json
import os
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import sleb
from bench import command, cores
from sleb import agreement, demo_corpus, identity, metrics, questions, results
from sleb.accuracy import answers_kept
from sleb.errors import UsageError
from sleb.version import __version__

SEQLEN = 256
COUNTS = (3, 6, 9)  # blocks removed, of 30
CALIBRATION_ROWS = {"demo": 64, "self": 16, "chat": 64}  # demo: 64 docstrings -> ~25 windows of 256 tokens
AGREEMENT_PROMPTS = 16
# (row name, search metric, objective, calibration, recovery), in the order they are run: the cheap and the
# most asked-for first, so an interrupted study has them.
METHODS = [
    ("sleb ce / demo", "sleb", "ce", "demo", None),
    ("sleb ce / self", "sleb", "ce", "self", None),
    ("sleb ce / demo + linear", "sleb", "ce", "demo", "linear"),
    ("sleb_compensated / demo", "sleb_compensated", "ce", "demo", None),
    ("sleb ce / self + LoRA (self)", "sleb", "ce", "self", "lora"),
    ("sleb ce / self + LoRA KL (self)", "sleb", "ce", "self", "lora_kl"),  # LoRA distilled from the dense model
    ("sleb kl / demo", "sleb", "kl", "demo", None),
    ("sleb kl / self", "sleb", "kl", "self", None),
    ("sleb ce / chat", "sleb", "ce", "chat", None),
    ("BI (cosine) / demo", "cosine", "ce", "demo", None),
    ("angular / demo", "angular", "ce", "demo", None),
    ("sleb ce / self + linear (self)", "sleb", "ce", "self", "linear"),
    ("evopress kl / demo", "evopress", "kl", "demo", None),
    ("sleb ce / demo + local", "sleb", "ce", "demo", "local"),  # the block before each run trained (--compensate local)
]
TASKS = ["demo_cloze", "demo_order", "answers"]
LOCAL = dict(local_steps=200, local_lr=1e-4)  # --compensate local's defaults
LORA = dict(lora_r=8, lora_alpha=16, lr=5e-4, warmup_steps=10, max_steps=60, train_batch_size=4, grad_accum=2,
            logging_steps=10, save_steps=1000)


def chat_file(folder: str) -> str:
    """The demo corpus's training docstrings as conversations (no chat data set is reachable here)."""
    path = os.path.join(folder, "demo_chat.jsonl")
    if not os.path.isfile(path):
        rows = []
        for text in demo_corpus.texts("train"):
            first = text.strip().split("\n", 1)[0][:80]
            rows.append({"messages": [{"role": "user", "content": f"What does this function do? {first}"},
                                      {"role": "assistant", "content": text.strip()}]})
        results.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def study_key(model_sha256: str) -> dict:
    """What every row and the dense answers are keyed by: another model, question set, lm-eval or sleb makes
    them stale."""
    return {"model_sha256": model_sha256, "question_set": questions.digest(),
            "lm_eval": importlib.metadata.version("lm_eval"), "sleb": __version__}


def _cached(path: str, key: dict, compute):
    """compute()'s value, kept in path under key: the dense zero-shot result takes minutes here, and a resumed
    study starts its rows sooner without it. A value under another key is computed again."""
    if os.path.isfile(path):
        saved = results.read_json(path)
        if saved["key"] == key:
            return saved["value"]
    value = results.to_jsonable(compute())
    results.write_json(path, {"key": key, "value": value})
    return value


class Dense:
    """The dense model and what every row is compared with, taken once."""

    def __init__(self, gguf: str, folder: str, key: dict):
        self.gguf, self.key = gguf, key
        self.model, self.tokenizer = sleb.load(gguf, dtype="float32", device="cpu")
        self.eval_windows = sleb.evaluation_windows(self.tokenizer, "demo", SEQLEN, model=self.model)
        started = time.perf_counter()
        self.ppl = sleb.perplexity(self.model, windows=self.eval_windows)
        self.distributions = sleb.dense_distributions(self.model, self.eval_windows)
        self.prompts = agreement.prompts(self.tokenizer, AGREEMENT_PROMPTS)
        self.continuations = agreement.continuations(self.model, self.prompts)
        self.zeroshot = _cached(os.path.join(folder, "dense_zeroshot.json"), {**key, "tasks": TASKS},
                                lambda: sleb.zeroshot(self.model, self.tokenizer, TASKS))
        self.seconds = time.perf_counter() - started
        self.chat = f"file:{chat_file(folder)}"
        self.windows = {}

    def calibration(self, name: str) -> torch.Tensor:
        if name not in self.windows:
            dataset = self.chat if name == "chat" else name
            self.windows[name] = sleb.calibration_windows(self.tokenizer, dataset, CALIBRATION_ROWS[name], SEQLEN,
                                                          model=self.model)
        return self.windows[name]

    def measure(self, model, tasks: list = TASKS) -> tuple:
        """(the row's figures, the replies to the questions); `tasks` leaves out the demo tasks where only the
        answers are wanted (each demo task takes minutes more per row)."""
        zeroshot = sleb.zeroshot(model, self.tokenizer, tasks)
        kept = answers_kept(self.zeroshot, zeroshot)["answers"]
        found = agreement.agreement(self.continuations, agreement.continuations(model, self.prompts))
        return {"ppl_demo": sleb.perplexity(model, windows=self.eval_windows),
                "kl_to_dense": sleb.kl_to_dense(model, self.distributions),
                "demo_cloze": zeroshot["tasks"].get("demo_cloze", {}).get("acc"),
                "demo_order": zeroshot["tasks"].get("demo_order", {}).get("acc"),
                "answers_acc": zeroshot["tasks"]["answers"]["acc"],
                "answers_kept": kept["share"], "answers_kept_count": [kept["kept"], kept["dense_right"]],
                "answers_lost": kept["lost"], "answers_right": zeroshot["right"]["answers"],
                "agreement_prefix": found["prefix_mean"], "agreement_overall": found["overall"]}, \
            zeroshot["replies"]["answers"]


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


class Searches:
    """Greedy searches shared across counts: the paper's loop removes one block a phase, and what phase k
    removes depends only on the phases before it, so one search to the largest count gives the exact list
    (and the time) of every smaller count. Kept in searches.jsonl, keyed by the model file, the calibration
    windows' sha256, the metric, the objective and sleb's version, so a resumed study does not redo them and
    a search under another key is never read back."""

    SHARED = ("sleb",)  # sleb_compensated folds maps into the model as it goes: searched per count

    def __init__(self, folder: str, largest: int, model_sha256: str):
        self.path, self.largest, self.model_sha256 = os.path.join(folder, "searches.jsonl"), largest, model_sha256
        self.found = {}
        if os.path.isfile(self.path):
            for line in open(self.path):
                entry = json.loads(line)
                if isinstance(entry["key"], dict):  # written before searches were keyed: never read back
                    self.found[key_name(entry["key"])] = entry

    def key(self, windows, metric: str, objective: str) -> dict:
        return {"model_sha256": self.model_sha256, "windows_sha256": identity.windows_hash(windows),
                "metric": metric, "objective": objective, "sleb": __version__}

    def removal_list(self, model, windows, k: int, metric: str, objective: str, calibration: str):
        """(removal list, {"seconds", "cores", ...} of the search, the maps of a compensated search) for k blocks."""
        key = self.key(windows, metric, objective)
        entry = self.found.get(key_name(key))
        if metric in self.SHARED and entry and len(entry["phases"]) >= k:
            removal_list, seconds = entry["phases"][k - 1]
            return removal_list, {**entry["timing"], "seconds": seconds}, False
        if metric not in self.SHARED:
            return self._one_count(model, windows, k, metric, objective, calibration, key)
        started, phases = time.perf_counter(), []
        with cores.Watch() as watch:
            sleb.search(model, windows, max(k, self.largest), metric, objective=objective, progress=False,
                        on_phase=lambda r: phases.append([list(r.removal_list),
                                                          round(time.perf_counter() - started, 1)]))
        entry = {"key": key, "calibration": calibration, "windows": list(windows.shape), "phases": phases,
                 "timing": watch.record()}
        self.found[key_name(key)] = entry
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        return phases[k - 1][0], {**entry["timing"], "seconds": phases[k - 1][1]}, False

    def _one_count(self, model, windows, k: int, metric: str, objective: str, calibration: str, key: dict):
        """A search for k blocks alone. One that can be continued (EvoPress: a generation at a time) is kept
        in a file after every phase, so an interrupted study goes on from its last generation (its time
        included, each session's share of the cores recorded beside it) and a finished one is not redone;
        sleb_compensated folds maps into the model as it goes and starts again."""
        if metrics.get(metric).changes_weights:
            with cores.Watch() as watch:
                found = sleb.search(model, windows, k, metric, objective=objective, progress=False)
            return found.removal_list, watch.record(), found.fits
        shape = f"{int(windows.shape[0])}x{SEQLEN}"
        base = os.path.join(os.path.dirname(self.path), f"search_{metric}_{objective}_{calibration}_{shape}_{k}_"
                                                        f"{key_name(key)}")
        path, timing_path = base + ".json", base + "_timing.json"
        found = sleb.SearchResult.from_dict(json.load(open(path))) if os.path.isfile(path) else None
        segments = results.read_json(timing_path)["segments"] if os.path.isfile(timing_path) else []
        if found is None or found.status != "done":
            watch = cores.Watch()
            try:
                with watch:
                    found = sleb.search(model, windows, k, metric, objective=objective, progress=False, resume=found,
                                        on_phase=lambda partial: results.write_json(path, partial.to_dict()))
                results.write_json(path, found.to_dict())
            finally:  # an interrupted session's share of the cores is kept too
                segments.append(watch.record())
                results.write_json(timing_path, {"key": key, "segments": segments})
        return found.removal_list, {**combined(segments), "seconds": round(found.total_seconds, 1)}, found.fits


def combined(segments: list) -> dict:
    """One timing from the sessions a resumed search ran in: shared if any was, unknown if any was not recorded."""
    states = {segment["cores"] for segment in segments} or {"unknown"}
    state = "shared" if "shared" in states else "unknown" if "unknown" in states else "alone"
    return {"cores": state, "sessions": len(segments)}


class Speeds:
    """llama.cpp's prompt and generation speed of each row's own pruned file against the dense one, by removal
    list (a row's maps or LoRA change weights, not the tensors or their types). Measured by `--speeds True`
    apart from the rows, so that nothing else runs meanwhile; kept in speeds.jsonl under the GGUF's sha256
    and llama-cpp-python's version. A measurement that shared the cores is measured again by the next
    `--speeds True`; the table marks it until then."""

    def __init__(self, folder: str, model_sha256: str):
        self.path, self.model_sha256 = os.path.join(folder, "speeds.jsonl"), model_sha256
        self.found = {}
        if os.path.isfile(self.path):
            for line in open(self.path):
                entry = json.loads(line)
                self.found[key_name(entry["key"])] = entry

    def key(self, removal_list: list) -> dict:
        return {"model_sha256": self.model_sha256, "removal_list": sorted(int(i) for i in removal_list),
                "llama_cpp_python": importlib.metadata.version("llama_cpp_python"), "sleb": __version__}

    def get(self, removal_list: list):
        try:
            return self.found.get(key_name(self.key(removal_list)))
        except importlib.metadata.PackageNotFoundError:
            return None

    def measure(self, gguf: str, removal_list: list, folder: str) -> dict:
        from bench import gguf_speed

        with tempfile.TemporaryDirectory(dir=folder) as work, cores.Watch() as watch:
            found = gguf_speed.runs(work, model_name=gguf, removal_list=list(removal_list), threads=None, repeats=10,
                                    warmup=3, prompt_len=256, generation_prompt_len=32, new_tokens=128)
        entry = {"key": self.key(removal_list), "timing": watch.record(),
                 **{mode: {"speedup": found[mode]["speedup"], "dense_tokens_per_s": found[mode]["dense_tokens_per_s"],
                           "pruned_tokens_per_s": found[mode]["pruned_tokens_per_s"], "threads": found[mode]["threads"]}
                    for mode in ("prompt", "generation")}}
        self.found[key_name(entry["key"])] = entry
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        return entry


def run_row(dense: Dense, searches: Searches, name: str, metric: str, objective: str, calibration: str, recovery,
            k: int, folder: str) -> tuple:
    """(the row, its replies to the questions)."""
    model = copy.deepcopy(dense.model)
    windows = dense.calibration(calibration)
    removal_list, search_timing, fits = searches.removal_list(model, windows, k, metric, objective, calibration)
    row = {"key": dense.key, "method": name, "removed": k, "removal_list": removal_list, "metric": metric,
           "objective": objective, "calibration": calibration, "calibration_windows": list(windows.shape),
           "recovery": recovery or ("linear, inside the search" if fits else "none"),
           "search_seconds": search_timing["seconds"], "search_timing": search_timing}
    if recovery == "linear":
        sleb.compensate(model, windows, removal_list, progress=False)
    elif recovery == "local":
        with cores.Watch() as watch:
            trained = sleb.compensate(model, windows, removal_list, method="local", progress=False, **LOCAL)
        row["local"] = {**LOCAL, "train_timing": watch.record(), "runs": [t.record() for t in trained.runs]}
    else:
        sleb.remove_blocks(model, removal_list)
    if recovery in ("lora", "lora_kl"):
        distil = {"objective": "kl", "dense": dense.model} if recovery == "lora_kl" else {}
        with cores.Watch() as watch:
            healed = sleb.heal(model, windows=windows, work_dir=os.path.join(folder, "lora_work"), **LORA, **distil)
        model = healed.model
        row["lora"] = {**LORA, "objective": "kl" if distil else "ce", "train_seconds": watch.record()["seconds"],
                       "train_timing": watch.record(), "train_windows": healed.train_windows}
    figures, replies = dense.measure(model)
    row.update(figures)
    return row, replies


def _f(value, digits=3, percent=False):
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.{digits}f}"


def _measured(rows: list) -> set:
    """The (method, blocks removed) pairs that rows.jsonl already holds."""
    return {(row["method"], row["removed"]) for row in rows}


TIMING_MARK = {"alone": "", "shared": "*", "unknown": "?"}


def _seconds(seconds, timing: dict) -> str:
    return f"{seconds}{TIMING_MARK[timing['cores']]}"


def _speed(speeds, row: dict) -> str:
    speed = speeds.get(row["removal_list"]) if speeds else None
    if not speed:
        return "- / -"
    return f"{speed['prompt']['speedup']} / {speed['generation']['speedup']}{TIMING_MARK[speed['timing']['cores']]}"


def write_table(out: str, dense_row: dict, rows: list) -> None:
    speeds = Speeds(out, dense_row["key"]["model_sha256"]) if dense_row.get("key") else None
    lines = ["| blocks removed | method | removal list | ppl demo | KL to dense | demo_cloze % | demo_order % | "
             "answers % | answers kept % | agreement (prefix of 32 / overall %) | search s | llama.cpp speedup "
             "prompt / generation |", "|" + "---|" * 12]
    lines.append(f"| 0 | dense | - | {_f(dense_row['ppl_demo'])} | 0 | {_f(dense_row['demo_cloze'], percent=True)} | "
                 f"{_f(dense_row['demo_order'], percent=True)} | {_f(dense_row['answers_acc'], percent=True)} | "
                 f"100 ({dense_row['answers_right']} right) | 32 / 100 | - | 1 / 1 |")
    for row in sorted(rows, key=lambda r: (r["removed"], [m[0] for m in METHODS].index(r["method"]))):
        lines.append(
            f"| {row['removed']} | {row['method']} | {row['removal_list']} | {_f(row['ppl_demo'])} | "
            f"{_f(row['kl_to_dense'], 4)} | {_f(row['demo_cloze'], percent=True)} | {_f(row['demo_order'], percent=True)} "
            f"| {_f(row['answers_acc'], percent=True)} | {_f(row['answers_kept'], percent=True)} "
            f"({row['answers_kept_count'][0]}/{row['answers_kept_count'][1]}) | {_f(row['agreement_prefix'], 1)} / "
            f"{_f(row['agreement_overall'], percent=True)} | {_seconds(row['search_seconds'], row['search_timing'])} | "
            f"{_speed(speeds, row)} |")
    counts = sorted({row["removed"] for row in rows})
    key = dense_row["key"]
    header = [
        "# SmolLM2-135M-Instruct: 3, 6 and 9 of 30 blocks removed, every method", "",
        "Written by `python -m bench.real_model --gguf SmolLM2-135M-Instruct.Q4_1.gguf` (rows.jsonl holds every "
        "figure, replies.jsonl every reply to the questions; the module's docstring says how each is measured). "
        "The Q4_1 GGUF dequantized to float32, on 2 CPU cores. Calibration: demo "
        f"{CALIBRATION_ROWS['demo']} docstrings, self {CALIBRATION_ROWS['self']} sampled chat replies, chat the "
        f"docstrings as conversations; windows of {SEQLEN} tokens. Answers: the {dense_row['answers_total']} "
        f"questions of sleb/questions/, of which the dense model gets {dense_row['answers_right']} right; \"answers "
        "kept\" is the share of those the pruned model still gets right. Agreement: greedy tokens matched before "
        f"the first divergence from the dense model (of 32) over {AGREEMENT_PROMPTS} held-out prompts, and "
        "overall. The llama.cpp speedup is measured on each row's own pruned Q4_1 file against the dense one "
        "(2 threads, prompt 256 tokens, generation 128). Seconds and speedups marked * were measured while other "
        "processes used more than a tenth of the cores; ? marks searches made before that was recorded.", "",
        f"Every row is keyed by: GGUF sha256 {key['model_sha256'][:16]}..., question set {key['question_set']}, "
        f"lm-eval {key['lm_eval']}, sleb {key['sleb']}.", "",
        "How the scoring changed what counts as right: `python -m bench.answers_rescore` "
        "([answers_rescore.json](answers_rescore.json)). EvoPress checked against its start: "
        "[evopress_check.md](evopress_check.md). Answers won back against minutes of training: "
        "[recovery_curve.md](recovery_curve.md) (`python -m bench.recovery_curve`). Attentions and MLPs removed "
        "instead of blocks: [sublayers.md](sublayers.md) (`python -m bench.sublayer_study`).", "",
        f"Rows measured so far: {len(rows)} (counts {counts}).", ""]
    measured = _measured(rows)
    missing = [f"{name} ({k})" for k in COUNTS for name, *_ in METHODS if (name, k) not in measured]
    footer = ["", f"Not measured yet ({len(missing)} of {len(COUNTS) * len(METHODS)}, as method (blocks removed)): "
                  + ", ".join(missing) + "."] if missing else []
    text = "\n".join(header + lines + footer) + "\n\n![answers kept and perplexity](answers_kept.png)\n"
    with open(os.path.join(out, "README.md"), "w") as handle:
        handle.write(text)
    _plots(out, dense_row, rows)


def _plots(out: str, dense_row: dict, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, *_ in METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["removed"])
        if not mine:
            continue
        ks = [0] + [r["removed"] for r in mine]
        axes[0].plot(ks, [100.0] + [100 * (r["answers_kept"] or 0) for r in mine], marker="o", label=method)
        axes[1].plot(ks, [dense_row["ppl_demo"]] + [r["ppl_demo"] for r in mine], marker="o", label=method)
    axes[0].set(xlabel="blocks removed (of 30)", ylabel="answers kept (%)", title="answers the dense model got right, kept")
    axes[1].set(xlabel="blocks removed (of 30)", ylabel="demo perplexity", title="demo perplexity", yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), CPU")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "answers_kept.png"), dpi=110)
    plt.close(fig)


# What the targets are stated on comes first: 3 blocks with no training, 6 with LoRA.
PRIORITY = [("sleb ce / demo", 3), ("sleb ce / self", 3), ("sleb ce / demo + linear", 3),
            ("sleb ce / self", 6), ("sleb ce / self + LoRA (self)", 6), ("sleb kl / self", 3),
            ("sleb ce / self + linear (self)", 3), ("sleb ce / self", 9), ("sleb kl / self", 6),
            ("BI (cosine) / demo", 3), ("angular / demo", 3), ("sleb ce / self + LoRA (self)", 3),
            ("sleb_compensated / demo", 3), ("sleb ce / chat", 3), ("evopress kl / demo", 3),
            ("sleb ce / self + linear (self)", 6), ("BI (cosine) / demo", 6), ("angular / demo", 6),
            ("sleb kl / self", 9), ("BI (cosine) / demo", 9), ("angular / demo", 9),
            ("sleb ce / self + linear (self)", 9), ("sleb ce / chat", 6), ("sleb ce / chat", 9),
            ("sleb ce / self + LoRA (self)", 9), ("sleb ce / demo", 6), ("sleb ce / demo", 9),
            ("sleb ce / demo + linear", 6), ("sleb ce / demo + linear", 9), ("sleb kl / demo", 3),
            ("sleb kl / demo", 6), ("sleb kl / demo", 9), ("sleb_compensated / demo", 6),
            ("sleb ce / self + LoRA KL (self)", 6), ("evopress kl / demo", 6), ("sleb ce / self + LoRA KL (self)", 3),
            ("sleb ce / self + LoRA KL (self)", 9), ("evopress kl / demo", 9), ("sleb_compensated / demo", 9)]


def _order(wanted: list, counts: list) -> list:
    pairs = [(m, k) for k in counts for m in wanted]
    first = [(m, k) for name, k in PRIORITY for m in wanted if m[0] == name and k in counts]
    return first + [pair for pair in pairs if pair not in first]


def select(counts, rows) -> tuple:
    """--counts and --rows as fire hands them over (3 -> int, "3,6" -> str or tuple) -> (counts, methods).
    A count that is not a number of blocks, or a name that is no row, is refused before anything loads."""
    names = [str(c).strip() for c in (str(counts).split(",") if isinstance(counts, (str, int)) else counts)]
    if not names or not all(name.isdigit() and 0 < int(name) < 30 for name in names):
        raise UsageError(f"--counts must be block counts between 1 and 29, e.g. 3,6,9; got {counts!r}")
    asked = None if rows is None else [name.strip() for name in (rows.split(",") if isinstance(rows, str) else rows)]
    unknown = [name for name in asked or [] if name not in {method[0] for method in METHODS}]
    if unknown:
        raise UsageError(f"--rows: no row named {unknown[0]!r}; the rows are: " + ", ".join(m[0] for m in METHODS))
    return [int(name) for name in names], [method for method in METHODS if asked is None or method[0] in asked]


def summary(dense_row: dict, rows: list) -> str:
    """The README's short table: answers kept (of the dense model's right answers), perplexity, KL, search time."""
    lines = ["| blocks | method | answers kept | ppl demo | KL to dense | search s |", "|---|---|---|---|---|---|",
             f"| 0 | dense | 100% ({dense_row['answers_right']}) | {dense_row['ppl_demo']:.2f} | 0 | - |"]
    for row in sorted(rows, key=lambda r: (r["removed"], -r["answers_kept"])):
        lines.append(f"| {row['removed']} | {row['method']} | {100 * row['answers_kept']:.1f}% "
                     f"({row['answers_kept_count'][0]}) | {row['ppl_demo']:.2f} | {row['kl_to_dense']:.3f} | "
                     f"{_seconds(round(row['search_seconds']), row['search_timing'])} |")
    return "\n".join(lines)


def _read_rows(path: str, key: dict) -> tuple:
    """(the rows measured under `key`, how many under another key): the stale ones are never shown."""
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    current = [row for row in rows if row.get("key") == key]
    return current, len(rows) - len(current)


def measure_speeds(gguf: str, out: str, key: dict) -> None:
    """llama.cpp's speed for every row's removal list that has none measured alone yet (Speeds)."""
    speeds = Speeds(out, key["model_sha256"])
    lists = {tuple(sorted(row["removal_list"])) for row in _read_rows(os.path.join(out, "rows.jsonl"), key)[0]}
    for removal_list in sorted(lists, key=lambda found: (len(found), found)):
        known = speeds.get(list(removal_list))
        if known and known["timing"]["cores"] == "alone":
            continue
        entry = speeds.measure(gguf, list(removal_list), out)
        print(json.dumps(entry), flush=True)


def main(gguf: str, counts=",".join(map(str, COUNTS)), rows=None, out: str = os.path.join(ROOT, "docs", "real_model"),
         table_only: bool = False, speeds: bool = False):
    counts, wanted = select(counts, rows)
    done_file, dense_file = os.path.join(out, "rows.jsonl"), os.path.join(out, "dense.json")
    replies_file = os.path.join(out, "replies.jsonl")
    if table_only and not os.path.isfile(dense_file):
        raise UsageError(f"nothing measured in {out} yet: run without --table_only first")
    if not table_only and not os.path.isfile(gguf):
        raise UsageError(f"no GGUF file at {gguf!r}")
    os.makedirs(out, exist_ok=True)
    if table_only:  # the study's page, and the README's short table printed
        dense_row = json.load(open(dense_file))
        write_table(out, dense_row, _read_rows(done_file, dense_row.get("key"))[0])
        print(summary(dense_row, _read_rows(done_file, dense_row.get("key"))[0]))
        return
    model_sha256 = file_sha256(gguf)
    key = study_key(model_sha256)
    if speeds:  # apart from the rows, so that nothing else shares the cores
        measure_speeds(gguf, out, key)
        write_table(out, json.load(open(dense_file)), _read_rows(done_file, key)[0])
        return
    done, stale = _read_rows(done_file, key)
    if stale:  # measured on another model, question set, lm-eval or sleb: measured again, not mixed in
        print(f"{stale} rows in {done_file} were measured under another key; they are dropped and measured again",
              flush=True)
        results.write_text(done_file, "".join(json.dumps(row) + "\n" for row in done))
        kept = [line for line in open(replies_file) if json.loads(line)["key"] == key] if os.path.isfile(replies_file) else []
        results.write_text(replies_file, "".join(kept))
    dense, searches = Dense(gguf, out, key), Searches(out, max(counts), model_sha256)
    right = len(dense.zeroshot["right"]["answers"])
    dense_row = {"key": key, "ppl_demo": dense.ppl, "demo_cloze": dense.zeroshot["tasks"]["demo_cloze"]["acc"],
                 "demo_order": dense.zeroshot["tasks"]["demo_order"]["acc"],
                 "answers_acc": dense.zeroshot["tasks"]["answers"]["acc"], "answers_right": right,
                 "answers_total": len(questions.items()),
                 "dense_seconds": round(dense.seconds, 1), "environment": results.environment(torch.device("cpu"))}
    results.write_json(dense_file, dense_row)
    print(f"dense: demo ppl {dense.ppl:.3f}, {right} questions right", flush=True)
    for method, k in _order(wanted, counts):
        if (method[0], k) in _measured(done):
            continue
        started = time.perf_counter()
        row, replies = run_row(dense, searches, *method, k, out)
        row["row_seconds"] = round(time.perf_counter() - started, 1)
        done.append(row)
        with open(replies_file, "a") as handle:
            handle.write(json.dumps({"key": key, "method": row["method"], "removed": k, "replies": replies}) + "\n")
        with open(done_file, "a") as handle:
            handle.write(json.dumps(results.to_jsonable(row)) + "\n")
        write_table(out, dense_row, done)
        print(json.dumps(results.to_jsonable(row)), flush=True)


if __name__ == "__main__":
    command(main)
