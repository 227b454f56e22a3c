"""The public Python API: the whole pipeline on a model the user already holds.

load -> calibration_windows -> search -> remove_blocks (or skipping, or compensate) -> evaluation_windows /
perplexity / zeroshot -> heal -> save_pretrained. Every function takes plain values (a model, a tokenizer, token
windows, a removal list), raises `UsageError` (a ValueError) with the message the commands print, and
leaves the model as it found it (training mode, `use_cache`, hooks) unless changing it is its purpose
(`remove_blocks`, `heal`). The commands (`python -m sleb`, `eval`, `latency`, `sleb.heal`) run each of
these stages through these functions and no other path; they add flags, results files and tables.
"""

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from sleb import blocks, checkpoint, data, guard, identity, models
from sleb.errors import UsageError, check_at_least, comma_list

Data = Union[str, Sequence[str]]  # a data set name (wikitext2, c4, ptb, demo, file:PATH) or texts


def load(model_name: str, dtype: str = "auto", device: str = "auto", device_map=None, max_memory=None,
         trust_remote_code: bool = False, quantization_config=None):
    """`(model, tokenizer)` loaded as the commands load them: a hub id, a local directory or "demo"; on
    a GPU the checkpoint's dtype spread by accelerate, on CPU float32; a broken checkpoint is one
    UsageError naming the file. `quantization_config` (e.g. bitsandbytes' 4-bit) goes to from_pretrained."""
    return models.load_model(model_name, dtype, device, device_map, trust_remote_code, max_memory,
                             quantization_config)


def _given_texts(texts: Sequence[str]) -> list:
    texts = list(texts)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise UsageError("give a data set name (wikitext2, c4, ptb, demo, file:PATH) or a non-empty list of texts")
    return texts


def _capped(seqlen: int, model, tokenizer) -> int:
    """`seqlen` capped at the model's maximum positions (the tokenizer's, where it knows them and no
    model is given), as the commands cap it."""
    if model is not None:
        return models.effective_seqlen(model, seqlen)
    known = getattr(tokenizer, "model_max_length", None)
    return min(seqlen, known) if isinstance(known, int) and 1 < known < 10**9 else seqlen


def calibration_windows(tokenizer, dataset: Data = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0, *, model=None) -> torch.Tensor:
    """(windows, seqlen) token ids built exactly as `python -m sleb` builds them: the train split shuffled
    with `Dataset.shuffle(seed)`, the first `nsamples` rows joined, tokenized once, cut into windows of
    `seqlen` tokens capped at `model`'s maximum positions."""
    check_at_least("nsamples", nsamples, 1)
    check_at_least("seqlen", seqlen, 2)
    seqlen = _capped(seqlen, model, tokenizer)
    if dataset == data.SELF:
        from sleb import self_text

        if model is None:
            raise UsageError("--dataset self samples its text from the model: pass model=")
        dataset = self_text.texts(model, tokenizer, nsamples, seed)
    if isinstance(dataset, str):
        data.check_dataset_name(dataset)
        return data.load_calibration_windows(dataset, tokenizer, nsamples, seed, seqlen)
    from datasets import Dataset

    rows = Dataset.from_dict({"text": _given_texts(dataset)}).shuffle(seed=seed)  # shuffled as file:PATH rows are
    return data.token_windows(tokenizer, "\n\n".join(rows[:nsamples]["text"]), seqlen)


def evaluation_windows(tokenizer, dataset: Data = "wikitext2", seqlen: int = 2048, *, model=None) -> torch.Tensor:
    """(windows, seqlen) token ids of a data set's evaluation split (or given texts, joined), as the
    commands measure perplexity on: tokenized once, non-overlapping windows of `seqlen` capped at
    `model`'s maximum positions, the remainder dropped (C4: its first 256 windows)."""
    check_at_least("seqlen", seqlen, 2)
    seqlen = _capped(seqlen, model, tokenizer)
    if isinstance(dataset, str):
        data.check_dataset_name(dataset, calibration=False)
        return data.load_eval_windows(dataset, tokenizer, seqlen)
    return data.token_windows(tokenizer, "\n\n".join(_given_texts(dataset)), seqlen)


@dataclass
class SearchResult:
    """A search's answer and how it got there; `to_dict()` is the `search` record of a results file."""

    removal_list: list
    losses: list = field(default_factory=list)  # per phase, one score per original block (None: not a candidate)
    lower_bounds: list = field(default_factory=list)  # per phase: partial losses of abandoned candidates
    phase_seconds: list = field(default_factory=list)
    total_seconds: float = 0.0  # seconds searched, those of the runs it resumed included
    engine: Optional[str] = None
    status: str = "done"
    rescored: int = 0
    max_rescore_gap: Optional[float] = None
    stats: dict = field(default_factory=dict)  # the engine's counters (block forwards, cache, peak memory)
    fits: list = field(default_factory=list)  # sleb_compensated: each chosen block's map (where it went, residuals)
    generations: list = field(default_factory=list)  # evopress: each generation's best set and value
    objective: dict = field(default_factory=dict)  # what was minimised (kl: the vocabulary kept, its memory)
    identity: dict = field(default_factory=dict)  # what it ran on (identity.of_run): a resume must match it

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        return {**{k: v for k, v in record.items() if k not in ("stats", "fits", "generations") or v}, **self.stats}

    @classmethod
    def from_dict(cls, record: dict) -> "SearchResult":
        names = {f.name for f in dataclasses.fields(cls)} - {"stats"}
        return cls(**{k: v for k, v in record.items() if k in names},
                   stats={k: v for k, v in record.items() if k not in names})


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode with the KV cache off for the duration; the model's own settings put back after."""
    training = model.training
    model.eval()
    try:
        with models.use_cache(model, False):
            yield model
    finally:
        model.train(training)


def _build_engine(model, windows, name: str, batch_size: int, cache_gb: float, compensated=None, objective=None):
    """The fast engine where it can follow the model, else the reference engine (with a note); wrapped to score
    each candidate with its compensation map when `compensated` (its settings) is given; spread over the
    ranks of an initialised torch.distributed group."""
    import sys

    from sleb import distributed
    from sleb.engines import ReferenceEngine
    from sleb.fast_search import FastEngine

    reason = FastEngine.cannot_follow(model) if name == "fast" else None
    if name == "fast" and reason is None:
        engine = FastEngine(model, windows, batch_size, cache_gb, objective=objective)
    else:
        if reason is not None:
            print(f"note: {reason}; using the reference engine", file=sys.stderr)
        engine = ReferenceEngine(model, windows, objective)
    if compensated is not None:
        from sleb.recovery.compensated import CompensatedEngine

        engine = CompensatedEngine(engine, model, windows, batch_size=batch_size, **compensated)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if world > 1:
            return distributed.CandidateParallel(engine, rank, world)
    return engine


def check_compensable(model, windows: torch.Tensor, early_barrier: int = 1, latter_barrier: int = 1) -> None:
    """Prove, on a 16-token probe, that every block which could stand before a removed candidate takes a
    folded map exactly; else one UsageError naming the block and the cause (a norm after its last
    sub-layer, a residual multiplier, an in-place add, offloaded or shared weights). Seconds, before any
    long work; `search(metric="sleb_compensated")` and the commands' `--compensate linear` run it first."""
    from sleb.recovery.compensated import prove_all

    prove_all(model, windows, early_barrier, latter_barrier)


def search(model, windows: torch.Tensor, num_remove_blocks: Optional[int] = None, metric: str = "sleb",
           engine: str = "fast", *, early_barrier: int = 1, latter_barrier: int = 1, batch_size: int = 4,
           cache_gb: float = 0.0, seed: int = 0, progress: bool = True, resume: Optional[SearchResult] = None,
           on_phase=None, log=None, keep_block_kinds: bool = True, compensation_gb: float = 0.0,
           objective: str = "ce", kl_top_k: int = 512, kl_gb: float = 0.0, evolution=None) -> SearchResult:
    """Which blocks to remove: `metric` sleb (the paper's greedy metric 3), sleb_compensated (the same loop,
    each candidate scored with its linear map folded in: it leaves the chosen maps folded into the model,
    so `remove_blocks` then gives the compensated model), sleb_oneshot, cosine, angular or random;
    `engine` fast (exact, same list as reference) or reference. `num_remove_blocks` defaults to 20% of
    the blocks, rounded up. `resume` continues an unfinished sleb search; `on_phase(result)` is
    called after each finished phase (the commands save it). `keep_block_kinds`: a hybrid model (its
    config's per-block type list names several kinds: attention, Mamba, convolution, ...) keeps at
    least one block of each kind, which stock transformers' hybrid caches need to generate.
    `compensation_gb`: sleb_compensated's memory for the candidates' sums (2 x hidden² float64 each; 0:
    a quarter of the free memory); it makes more statistics passes when that holds fewer than a phase.
    `objective`: ce (the paper's loss) or kl (mean KL from the dense model's next-token distributions,
    kept whole within `kl_gb`, else their top `kl_top_k` and the rest; sleb/objectives.py), for every
    metric that scores by calibration loss (sleb, sleb_oneshot, sleb_compensated, evopress). `metric`
    evopress is EvoPress's evolutionary search; `evolution` (a sleb.Evolution) its settings."""
    from sleb import metrics, objectives
    from sleb.evopress import Evolution
    from sleb.metrics import check_choices, check_objective
    from sleb.search_algorithms import SearchJob, check_shape

    check_choices(metric, engine, early_barrier, latter_barrier)
    chosen = metrics.get(metric)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise UsageError("windows must be a (windows, seqlen) tensor of token ids, as calibration_windows returns")
    depth = blocks.num_blocks(model)
    k = blocks.default_remove_count(depth) if num_remove_blocks is None else num_remove_blocks
    check_at_least("num_remove_blocks", k, 1)
    check_at_least("compensation_gb", compensation_gb, 0)
    check_objective(metric, objective, kl_top_k, kl_gb)
    evolution = evolution or Evolution()
    evolution.check()
    check_shape(depth, k, early_barrier, latter_barrier)
    guard.check_removable(model)
    log = log or (print if progress else (lambda *args, **kwargs: None))
    ran_on = identity.of_run(model, windows, num_remove_blocks=k, metric=metric, early_barrier=early_barrier,
                             latter_barrier=latter_barrier, seed=seed, keep_block_kinds=keep_block_kinds,
                             objective=objective, kl_top_k=kl_top_k if objective == "kl" else None,
                             evolution=evolution.record() if chosen.evolves else None)
    compensated = None
    if chosen.compensates:
        compensated = dict(early_barrier=early_barrier, latter_barrier=latter_barrier, budget_gb=compensation_gb,
                           progress=progress, log=log)
    state = _resumed_state(resume, ran_on, metric, depth)
    started = time.perf_counter() - (resume.total_seconds if resume is not None else 0.0)  # the resumed run's time counts

    def result(current, status: str) -> SearchResult:
        used = job.engine
        return SearchResult(current.removal_list, current.scores, current.lower_bounds, current.phase_seconds,
                            round(time.perf_counter() - started, 3), used.name if used else None, status,
                            current.rescored, current.max_rescore_gap,
                            used.stats() if used and status == "done" else {}, list(current.fits),
                            list(current.generations), goal_record, ran_on)

    goal, goal_record = None, {"objective": objective}

    def build():
        nonlocal goal, goal_record
        with _evaluating(model):
            goal = objectives.build(objective, model, windows, kl_top_k, kl_gb, batch_size, progress)
        goal_record = goal.record() if goal is not None else {"objective": objective}
        if goal is not None:
            log(f"objective kl: dense distributions, {goal_record['kl_vocabulary']}, "
                f"{goal_record['kl_memory_mb']} MB")
        return _build_engine(model, windows, engine, batch_size, cache_gb, compensated, goal)

    job = SearchJob(model, windows, k, early_barrier, latter_barrier, seed, batch_size, log=log, progress=progress,
                    on_phase=lambda current: on_phase(result(current, "searching")) if on_phase else None,
                    build_engine=build, evolution=evolution,
                    kinds=guard.binding_kinds(model) if keep_block_kinds else None)
    with _evaluating(model):
        if len(state.removal_list) < k:  # a finished search handed back in is returned as it is
            state = chosen.run(job, state)
    return result(state, "done")


def search_sublayers(model, windows: torch.Tensor, num_remove_blocks: Optional[int] = None, unit: str = "sublayer",
                     *, metric: str = "sleb", objective: str = "ce", kl_top_k: int = 512, kl_gb: float = 0.0,
                     engine: str = "fast", batch_size: int = 4, progress: bool = True, log=None, on_phase=None,
                     resume=None):
    """SLEB's greedy loop over sub-layers (sleb/sublayers.py): `unit` sublayer (every attention and MLP of the
    blocks but the first and the last), attention or mlp; phases go on while the weights removed are fewer than
    `num_remove_blocks` blocks' worth, by `objective` ce (the paper's loss) or kl (to the dense model).
    `engine` reference scores each candidate with batch-1 forwards of the whole model; fast reuses each
    block's input across the phase's candidates (`batch_size` windows a forward) and re-scores near ties
    the reference way, so both return the same list. `metric` cosine is LLM-Drop's one-shot ranking instead:
    the sub-layers whose output turns the residual stream least (1 - cosine of before and after), taken from
    the least up. Returns a sublayers.SublayerSearch whose removal_list names sub-layers ("17.attn");
    `on_phase(result)` gets it after each phase, and `resume=` (an earlier, unfinished one of the same greedy
    search) goes on from its last phase."""
    from tqdm import tqdm

    from sleb import forward, metrics, objectives, sublayers
    from sleb.engines import ReferenceEngine
    from sleb.metrics import check_choices, check_objective

    how = metrics.get(metric).sublayers
    if how is None:
        takers = [name for name, entry in metrics.METRICS.items() if entry.sublayers]
        raise UsageError(f"sub-layers are searched by --metric {' or '.join(takers)}, not {metric!r}")
    check_choices("sleb", engine, 1, 1)
    check_at_least("batch_size", batch_size, 1)

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise UsageError("windows must be a (windows, seqlen) tensor of token ids, as calibration_windows returns")
    k = blocks.default_remove_count(blocks.num_blocks(model)) if num_remove_blocks is None else num_remove_blocks
    check_at_least("num_remove_blocks", k, 1)
    check_objective(metric, objective, kl_top_k, kl_gb)
    sublayers.check_model(model)
    log = log or (print if progress else (lambda *args, **kwargs: None))
    if how == "similarity":
        if resume is not None:
            raise UsageError("the cosine ranking is one pass: there is nothing to resume; run it again")
        return _sublayers_by_cosine(model, windows, k, unit, batch_size, progress, log)
    with _evaluating(model):
        goal = objectives.build(objective, model, windows, kl_top_k, kl_gb, batch_size, progress)
        reference = ReferenceEngine(model, windows, goal)

        def exact(parts: list) -> float:
            with sublayers.skipping(model, parts):
                return reference.loss([])

        def by_reference(removed: list, options: list) -> dict:
            return {part: exact(removed + [part]) for part in tqdm(options, desc=f"phase {len(removed) + 1}",
                                                                     leave=False, disable=not progress)}
        if engine == "reference" or forward.cannot_follow(model) is not None:
            return sublayers.greedy(model, by_reference, k, unit, log, on_phase, resume=resume)
        scorer = sublayers.PrefixScorer(model, windows, goal, batch_size, progress)
        return sublayers.greedy(model, scorer.phase, k, unit, log, on_phase, exact=exact,
                                tie_margin=scorer.tie_margin, resume=resume)


def _sublayers_by_cosine(model, windows, k: int, unit: str, batch_size: int, progress: bool, log):
    from sleb import sublayers

    if unit not in sublayers.UNITS or unit == "block":
        raise UsageError(f"--unit must be sublayer, attention or mlp for a sub-layer search, got {unit!r}")
    started = time.perf_counter()
    with _evaluating(model):
        scores = sublayers.importance(model, windows, batch_size, progress)
    chosen = sublayers.by_importance(model, scores, k, unit)
    taken = sum(sublayers.weights(model, part) for part in chosen)
    log(f"sub-layer importance (1 - cosine) ranking; removal list {[str(p) for p in chosen]}")
    return sublayers.SublayerSearch([str(p) for p in chosen], [{str(p): v for p, v in scores.items()}], taken,
                                    sublayers.budget_weights(model, k),
                                    [round(time.perf_counter() - started, 3)], round(time.perf_counter() - started, 3))


def _resumed_state(resume: Optional[SearchResult], ran_on: dict, metric: str, depth: int):
    """The search state a resumed search goes on from (a fresh one without `resume`), refused where the run it
    continues was made on another model, data, settings or libraries."""
    from sleb.metrics import check_resumable
    from sleb.search_algorithms import SearchState

    if resume is None:
        return SearchState(depth)
    check_resumable(metric, resume.status == "done", "the search result handed in", "search again without resume=")
    changed = identity.first_difference(resume.identity, ran_on)
    if changed:
        raise UsageError(f"cannot resume this search: {changed}; resume on the same model, data, settings "
                         "and libraries, or start again (--overwrite True)")
    return SearchState(depth, list(resume.removal_list), list(resume.losses), list(resume.lower_bounds),
                       list(resume.phase_seconds), resume.rescored, resume.max_rescore_gap,
                       generations=list(resume.generations))


def _check_kinds_kept(model, removal_list: list, keep_block_kinds: bool) -> None:
    """A removal may not take every block of a kind the model cannot generate without (guard.binding_kinds)."""
    kinds = blocks.block_kinds(model)
    if keep_block_kinds and kinds and not blocks.keeps_every_kind(removal_list, kinds):
        blocks.check_keeps_every_kind(removal_list, guard.binding_kinds(model))


def remove_blocks(model, removal_list: Sequence, *, keep_block_kinds: bool = True) -> None:
    """Delete the blocks (original indices) in place; the model is then a normal checkpoint of fewer blocks.
    A removal that takes every block of a kind the model cannot generate without (a hybrid model's last
    attention block) is a UsageError unless `keep_block_kinds` is False. Entries such as "17.attn" or
    "5.mlp" take out that block's attention or MLP alone (sleb/sublayers.py); `save_pretrained` then writes
    a Llama so pruned as a Nemotron-NAS (DeciLM) checkpoint."""
    from sleb import sublayers

    if sublayers.has_sublayers(removal_list):
        if blocks.origin(model).removed:
            raise UsageError("sub-layers are named in the original numbering: remove them before any whole block")
        sublayers.check_model(model)
        parts = sublayers.check_against(removal_list, blocks.num_blocks(model))
        removal_list = sublayers.split(removal_list)[0]  # the whole blocks, checked below
        blocks.check_removal_list(list(removal_list), blocks.num_blocks(model))  # before anything changes
        sublayers.remove(model, parts)
    removal_list = blocks.check_removal_list(list(removal_list), blocks.num_blocks(model))
    if removal_list:
        guard.check_removable(model)
        _check_kinds_kept(model, removal_list, keep_block_kinds)
    blocks.remove_blocks(model, removal_list)


def serving_problems(model) -> list:
    """'ENGINE: FIELD: why' for each serving engine (vLLM, llama.cpp; sleb/serving.py names the versions
    read) that would build another layout from this model's config than transformers does."""
    from sleb import serving

    return serving.problems(model.config)


def skipping(model, skipped: Sequence[int]):
    """A context manager: inside it the model runs as if `skipped` were removed; after it, whole again."""
    blocks.check_removal_list(list(skipped), blocks.num_blocks(model), "skipped blocks")
    if skipped:
        guard.check_removable(model)
    return blocks.skipping(model, skipped)


def perplexity(model, tokenizer=None, dataset: Data = "wikitext2", seqlen: int = 2048, batch_size: int = 1,
               progress: bool = True, *, windows: Optional[torch.Tensor] = None, label: str = "perplexity") -> float:
    """exp(mean next-token NLL) on `evaluation_windows(tokenizer, dataset, seqlen, model=model)`, or on
    `windows` already tokenized, the loss in float32. `label` names the run in the progress bar and
    in the error a non-finite value gives."""
    from sleb.ppl import perplexity as measure

    check_at_least("batch_size", batch_size, 1)
    if windows is None:
        if tokenizer is None:
            raise UsageError("perplexity needs a tokenizer and a data set, or windows=token ids")
        windows = evaluation_windows(tokenizer, dataset, seqlen, model=model)
    with _evaluating(model):
        return measure(model, windows, batch_size, desc=label, progress=progress)


def dense_distributions(model, windows: torch.Tensor, top_k: int = 512, budget_gb: float = 0.0, batch_size: int = 1,
                        progress: bool = True):
    """The model's next-token distributions on `windows` (token ids), taken now, for `kl_to_dense` after the
    model is pruned: the whole vocabulary where it fits `budget_gb` (0: a quarter of the machine's
    memory), else the top `top_k` log-probabilities per token and the rest as one bucket. Its `record()`
    says which and the memory held."""
    from sleb.objectives import KLToDense

    check_at_least("batch_size", batch_size, 1)
    with _evaluating(model):
        return KLToDense(model, windows, top_k, budget_gb, batch_size, progress)


def kl_to_dense(model, dense, batch_size: int = 1, progress: bool = True, label: str = "KL to dense") -> float:
    """Mean KL(p_dense || p_model) per predicted token, in nats, on the windows `dense`
    (`dense_distributions`, taken before the model was pruned) holds."""
    from sleb.errors import check_finite

    check_at_least("batch_size", batch_size, 1)
    with _evaluating(model):
        value = dense.mean_kl(model, batch_size, desc=label, progress=progress)
    check_finite(value, f"the {label}", model)
    return value


def zeroshot_tasks(tasks: Union[str, Sequence[str]]):
    """The lm-eval tasks, looked up and their data loaded once (unknown names and unreachable data are
    a UsageError here, before any model runs); hand the result to `zeroshot` as `tasks`."""
    from sleb import accuracy

    if isinstance(tasks, accuracy.Tasks):
        return tasks
    names = comma_list(tasks, "tasks", "piqa,arc_easy or demo_cloze") if isinstance(tasks, str) else list(tasks)
    return accuracy.find_tasks(names)


def zeroshot(model, tokenizer, tasks, num_fewshot: int = 0, limit=None, batch_size: int = 8,
             log_samples: bool = False) -> dict:
    """lm-eval's accuracy (`HFLM(pretrained=model)` + `simple_evaluate`) on `tasks`: names, one
    comma-separated string (the offline demo_cloze and demo_order included), or `zeroshot_tasks(...)`.
    `log_samples` keeps lm-eval's per-item records under "samples"."""
    from sleb import accuracy

    found = zeroshot_tasks(tasks)
    with _evaluating(model):
        return accuracy.evaluate_zeroshot(model, tokenizer, found, num_fewshot, limit, batch_size, log_samples)


RUN_FILE = "sleb_run.json"  # in a healing work folder: what the Trainer's checkpoints there were trained on


def _check_same_training(folder: str, model, windows, recipe, resume_from) -> None:
    """Record what this training runs on; a resumed one must run on the same (else one line naming it)."""
    import json
    import os

    from sleb.recovery.lora import quantized

    ran_on = identity.of_run(model, windows, quantized=quantized(model), **dataclasses.asdict(recipe))
    path = os.path.join(os.path.dirname(os.path.abspath(resume_from)) if resume_from else folder, RUN_FILE)
    if resume_from is not None:
        try:
            with open(path) as handle:
                saved = json.load(handle)
        except (OSError, ValueError):
            saved = None
        changed = identity.first_difference(saved, ran_on)
        if changed:
            raise UsageError(f"cannot resume from {resume_from}: {changed}; resume with the same model, data, "
                             "recipe and libraries, or start again without --resume")
        return
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(ran_on, handle)


@dataclass
class HealResult:
    """What `heal` returns: the merged model and how training went."""

    model: object  # the LoRA merged into the weights: an ordinary transformers model, no peft wrapper
    loss_curve: list  # [{"step", "loss"}] as the Trainer logged it
    train_seconds: float
    train_windows: int
    targets: dict  # lora_targets (projection names), lora_expert_parameters (fused expert weights); or
    # trained_blocks (original numbers) for train_blocks


def heal(model, tokenizer=None, dataset: Data = "c4", *, windows: Optional[torch.Tensor] = None,
         nsamples: int = 20000, seqlen: int = 256, recipe=None, work_dir: Optional[str] = None,
         resume_from: Optional[str] = None, adapter_dir: Optional[str] = None, full_precision_base=None,
         dense=None, **recipe_fields) -> HealResult:
    """LoRA-heal a (pruned) model with transformers' Trainer and merge it into the weights.

    Training data: `windows` (token ids), else `calibration_windows(tokenizer, dataset, nsamples,
    seqlen, recipe seed, model=model)`. The recipe is `recipe` (a `sleb.LoraRecipe`) or its fields
    as keywords (lora_r=8, lora_alpha=16, lora_dropout=0.05, lr=1e-4, warmup_steps=100, epochs=2,
    max_steps=-1, train_batch_size=4, grad_accum=16, weight_decay=0, seed=0, logging_steps=10,
    save_steps=100: Shortened LLaMA's). The Trainer's checkpoints go to `work_dir` (a temporary
    folder, removed after, by default); `resume_from` continues from one of them. `adapter_dir` also
    keeps the adapter alone (peft format). A 4-bit model (QLoRA) is merged into
    `full_precision_base()`, the same pruned model unquantized. `objective="kl"` distils instead of
    learning the text: the loss is the mean KL from the dense model's next-token distributions on the
    training windows; `dense` is that model (before its blocks went) or its distributions,
    `sleb.dense_distributions(dense_model, windows)`. `train_blocks` (original block numbers, or "before": the
    block in front of each removed run) trains those blocks' every parameter instead of LoRA."""
    import shutil
    import tempfile

    from sleb.recovery import lora

    if recipe is None:
        unknown = sorted(set(recipe_fields) - {f.name for f in dataclasses.fields(lora.LoraRecipe)})
        if unknown:
            raise UsageError(f"heal got an unknown setting {unknown[0]!r}; the recipe's fields are those of "
                             "sleb.LoraRecipe")
        recipe = lora.LoraRecipe(**recipe_fields)
    elif recipe_fields:
        raise UsageError("pass the recipe as recipe= or as keywords, not both")
    recipe.check()
    if adapter_dir and recipe.train_blocks is not None:
        raise UsageError("train_blocks trains whole blocks: there is no LoRA adapter to keep (adapter_dir)")
    if windows is None:
        if tokenizer is None:
            raise UsageError("heal needs a tokenizer and a data set, or windows=token ids")
        windows = calibration_windows(tokenizer, dataset, nsamples, seqlen, recipe.seed, model=model)
    dense = _dense_distributions(dense, windows, recipe.objective)
    use_cache = model.config.get_text_config().use_cache  # training turns it off; the merged model gets it back
    folder = work_dir or tempfile.mkdtemp(prefix="sleb-heal-")
    _check_same_training(folder, model, windows, recipe, resume_from)
    try:
        trained = lora.train(model, windows, recipe, folder, resume_from, dense=dense)
        if adapter_dir:
            from sleb import distributed

            trained.peft_model.save_pretrained(adapter_dir, is_main_process=distributed.rank() == 0)  # one writer
        merged = lora.merge(trained.peft_model, full_precision_base)
    finally:
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    merged.config.get_text_config().use_cache = use_cache
    return HealResult(merged, trained.loss_curve, round(trained.seconds, 3), len(windows), trained.targets.record())


def _dense_distributions(dense, windows: torch.Tensor, objective: str):
    """What healing with `objective` distils from: the dense model's distributions of `windows` (None for ce)."""
    from sleb import objectives

    if objective != "kl":
        if dense is not None:
            raise UsageError("dense= is what objective='kl' distils from; the cross-entropy heals on the text alone")
        return None
    if dense is None:
        raise UsageError("objective='kl' distils from the dense model: pass dense= (the model before its blocks "
                         "went, or sleb.dense_distributions(it, windows))")
    if not isinstance(dense, objectives.KLToDense):
        return dense_distributions(dense, windows, batch_size=4)
    if not torch.equal(dense.windows, windows):
        raise UsageError("the dense distributions were taken on other windows than the training windows; build "
                         "them on the same windows")
    return dense


@dataclass
class CompensationResult:
    """What `compensate` did: one fit (linear) or one trained block (local) per removed run, in depth order."""

    ridge: float
    runs: list  # linear: sleb.recovery.linear.RunFit; local: sleb.recovery.local.RunTraining
    seconds: float
    method: str = "linear"
    settings: Optional[dict] = None  # local: steps, lr, seed

    def to_dict(self) -> dict:
        return {"method": self.method, "ridge": self.ridge, "runs": [fit.record() for fit in self.runs],
                "seconds": self.seconds, **({"settings": self.settings} if self.settings else {})}


def compensate(model, windows: torch.Tensor, removal_list: Sequence[int], ridge: float = 0.0, *,
               batch_size: int = 4, progress: bool = True, keep_block_kinds: bool = True, method: str = "linear",
               local_steps: int = 200, local_lr: float = 1e-4, seed: int = 0) -> CompensationResult:
    """Remove the blocks and win back what that cost with no training: for each maximal run of removed
    blocks, the least-squares map T = argmin ||M T - (H - Y)||^2 + ridge ||T||^2 from the calibration
    `windows` (M: what the block before the run adds last, Y: the stream it is added to, H: the run's
    output) folded into that block's output projection(s), then the run deleted. The model is then
    what `remove_blocks` leaves, with the same parameters, maps folded in. One line (UsageError) where
    the fold could not be exact (a norm after the sub-layer, post-norm, a run starting at block 0,
    shared weights), before anything changes.

    `method="local"` trains the block before each run instead, all of its parameters, to output what the run
    would have (`local_steps` AdamW steps at `local_lr`, sleb/recovery/local.py), then deletes the runs."""
    from sleb.recovery import linear, local

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise UsageError("windows must be a (windows, seqlen) tensor of token ids, as calibration_windows returns")
    check_at_least("batch_size", batch_size, 1)
    removal_list = blocks.check_removal_list(list(removal_list), blocks.num_blocks(model))
    guard.check_removable(model)
    _check_kinds_kept(model, removal_list, keep_block_kinds)
    if method not in ("linear", "local"):
        raise UsageError(f"compensate's method must be linear or local, got {method!r}")
    started = time.perf_counter()
    with _evaluating(model):
        if method == "linear":
            fits = linear.compensate(model, windows, removal_list, ridge, batch_size, progress)
            return CompensationResult(float(ridge), fits, round(time.perf_counter() - started, 3))
        with torch.inference_mode(False):
            trained = local.reconstruct(model, windows, removal_list, local_steps, local_lr, batch_size, seed, progress)
        remove_blocks(model, removal_list, keep_block_kinds=keep_block_kinds)
    return CompensationResult(0.0, trained, round(time.perf_counter() - started, 3), "local",
                              {"steps": local_steps, "lr": local_lr, "seed": seed, "batch_size": batch_size})


def save_pretrained(model, tokenizer, directory: str, card=None) -> list:
    """Write the model, tokenizer (and a vision-language model's processor) with `save_pretrained`,
    atomically, after proving that the saved config rebuilds a model that computes what this one was
    scored as (sleb/guard.py); `card` (a huggingface_hub ModelCard, or a function of the guard's warning
    lines that returns one) becomes README.md. Returns the guard's warning lines (config fields changed
    since load that the outputs do not show)."""
    from sleb import sublayers

    checkpoint.check_new_directory("save_model", directory)
    if sublayers.removed_in(model):  # no transformers class lacks a sub-layer: the Nemotron-NAS layout
        from sleb import decilm

        decilm.save(model, tokenizer, directory, card([]) if callable(card) else card)
        return []
    return checkpoint.save(model, tokenizer, directory, card).warnings


def save_gguf(model, tokenizer, path: str, *, gguf_type: Optional[str] = None, llama_cpp_tree: Optional[str] = None,
              converter_python: Optional[str] = None, removal_list: Optional[Sequence[int]] = None, log=print) -> dict:
    """Write the pruned model as a GGUF file that llama.cpp runs as this model.

    A model read from a GGUF file: a copy of that file with only the kept blocks, their tensors' bytes
    unchanged, tensors whose weights changed (a folded map, LoRA merged) quantized again to their source type
    (sleb/gguf_file.py). Any other model: saved through the reload guard, converted by the llama.cpp tree's
    converter (`llama_cpp_tree`), then quantized to `gguf_type` (Q8_0, Q4_K_M, ...) by llama.cpp's quantizer.
    A layout llama.cpp would read otherwise (sleb/serving.py) is one UsageError before anything is written.
    Returns what was written ({"path", "block_count", ...})."""
    import os
    import shutil
    import tempfile

    from sleb import gguf_file, llama_cpp, serving

    gguf_type = gguf_file.check_type(gguf_type)
    source = gguf_file.source_of(model)
    found = serving.llama_cpp_problems(model.config, blocks.origin(model).config if source else None)
    if found:
        raise UsageError(f"--save_gguf: llama.cpp would run another model: {found[0]}; nothing was written")
    from sleb import sublayers

    if sublayers.has_sublayers(removal_list):
        if source is None:
            raise UsageError("--save_gguf with sub-layers copies a GGUF input in llama.cpp's deci layout; read the "
                             "model from its .gguf file, or save a checkpoint with --save_model")
        return gguf_file.write_deci(source, path, *sublayers.split(removal_list), log=log)
    if source is not None:
        if gguf_type is not None:
            raise UsageError("--gguf_type applies to a transformers checkpoint; a GGUF input keeps its own types")
        return gguf_file.write_pruned(source, path, blocks.origin(model).kept, model, None, removal_list, log)
    if llama_cpp_tree is None:
        raise UsageError("--save_gguf from a transformers checkpoint converts with llama.cpp's converter; pass "
                         "--llama_cpp TREE (a llama.cpp source tree, e.g. the llama-cpp-python sdist's vendor/llama.cpp)")
    target = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".sleb-gguf-") as scratch:
        folder = os.path.join(scratch, "checkpoint")
        checkpoint.save(model, tokenizer, folder)
        converted = llama_cpp.convert(folder, os.path.join(scratch, "converted.gguf"), llama_cpp_tree,
                                      converter_python, "f32" if gguf_type else "f16", log=log)
        origin = blocks.origin(model)
        removed = origin.removed
        if removal_list is not None and sorted(removal_list) == removed:
            removed = [int(i) for i in removal_list]  # the order they were chosen in
        if removed:  # what a copied GGUF records too: the file is not the dense model
            gguf_file.mark_removed(converted, removed, len(removed) + blocks.num_blocks(model))
        if gguf_type is not None:
            gguf_file.quantize(converted, target, gguf_type)
        else:
            shutil.move(converted, target)
    log(f"GGUF written to {target}" + (f" ({gguf_type}, llama.cpp's quantizer)" if gguf_type else " (f16)"))
    return {"path": target, "block_count": blocks.num_blocks(model), "type": gguf_type or "F16",
            "removal_list": removed}

