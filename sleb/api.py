"""The public Python API: the whole pipeline on a model the user already holds.

load -> calibration_windows -> search -> remove_blocks (or skipping) -> perplexity / zeroshot -> heal ->
save_pretrained. Every function takes plain values (a model, a tokenizer, token windows, a removal
list), raises `UsageError` (a ValueError) with the message the commands print, and leaves the model
as it found it (training mode, `use_cache`, hooks) unless changing it is its purpose
(`remove_blocks`, `heal`). The commands call the same functions.
"""

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from sleb import blocks, checkpoint, data, models
from sleb.errors import UsageError, check_at_least

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


def calibration_windows(tokenizer, dataset: Data = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """(windows, seqlen) token ids built exactly as `python -m sleb` builds them: the train split shuffled
    with `Dataset.shuffle(seed)`, the first `nsamples` rows joined, tokenized once, cut into windows."""
    check_at_least("nsamples", nsamples, 1)
    check_at_least("seqlen", seqlen, 2)
    if isinstance(dataset, str):
        data.check_dataset_name(dataset)
        return data.load_calibration_windows(dataset, tokenizer, nsamples, seed, seqlen)
    from datasets import Dataset

    rows = Dataset.from_dict({"text": _given_texts(dataset)}).shuffle(seed=seed)  # shuffled as file:PATH rows are
    return data.token_windows(tokenizer, "\n\n".join(rows[:nsamples]["text"]), seqlen)


@dataclass
class SearchResult:
    """A search's answer and how it got there; `to_dict()` is the `search` record of a results file."""

    removal_list: list
    losses: list = field(default_factory=list)  # per phase, one score per original block (None: not a candidate)
    lower_bounds: list = field(default_factory=list)  # per phase: partial losses of abandoned candidates
    phase_seconds: list = field(default_factory=list)
    total_seconds: float = 0.0
    engine: Optional[str] = None
    status: str = "done"
    rescored: int = 0
    max_rescore_gap: Optional[float] = None
    stats: dict = field(default_factory=dict)  # the engine's counters (block forwards, cache, peak memory)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        return {**{k: v for k, v in record.items() if k != "stats"}, **self.stats}

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


def _build_engine(model, windows, name: str, batch_size: int, cache_gb: float):
    """The fast engine where it can follow the model, else the reference engine (with a note); spread over
    the ranks of an initialised torch.distributed group."""
    import sys

    from sleb import distributed
    from sleb.engines import ReferenceEngine
    from sleb.fast_search import FastEngine

    reason = FastEngine.cannot_follow(model) if name == "fast" else None
    if name == "fast" and reason is None:
        engine = FastEngine(model, windows, batch_size, cache_gb)
    else:
        if reason is not None:
            print(f"note: {reason}; using the reference engine", file=sys.stderr)
        engine = ReferenceEngine(model, windows)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if world > 1:
            return distributed.CandidateParallel(engine, rank, world)
    return engine


def search(model, windows: torch.Tensor, num_remove_blocks: Optional[int] = None, metric: str = "sleb",
           engine: str = "fast", *, early_barrier: int = 1, latter_barrier: int = 1, batch_size: int = 4,
           cache_gb: float = 0.0, seed: int = 0, progress: bool = True, resume: Optional[SearchResult] = None,
           on_phase=None, log=None) -> SearchResult:
    """Which blocks to remove: `metric` sleb (the paper's greedy metric 3), sleb_oneshot, cosine, angular or
    random; `engine` fast (exact, same list as reference) or reference. `num_remove_blocks` defaults to
    20% of the blocks, rounded up. `resume` continues an unfinished sleb search; `on_phase(result)` is
    called after each finished phase (the commands save it)."""
    from sleb.metrics import METRICS, SearchJob, SearchState, check_choices, check_shape

    check_choices(metric, engine, early_barrier, latter_barrier)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise UsageError("windows must be a (windows, seqlen) tensor of token ids, as calibration_windows returns")
    depth = blocks.num_blocks(model)
    k = blocks.default_remove_count(depth) if num_remove_blocks is None else num_remove_blocks
    check_at_least("num_remove_blocks", k, 1)
    check_shape(depth, k, early_barrier, latter_barrier)
    log = log or (print if progress else (lambda *args, **kwargs: None))
    state = SearchState(depth)
    if resume is not None:
        state = SearchState(depth, list(resume.removal_list), list(resume.losses), list(resume.lower_bounds),
                            list(resume.phase_seconds), resume.rescored, resume.max_rescore_gap)
    started = time.perf_counter()

    def result(current, status: str) -> SearchResult:
        used = job.engine
        return SearchResult(current.removal_list, current.scores, current.lower_bounds, current.phase_seconds,
                            round(time.perf_counter() - started, 3), used.name if used else None, status,
                            current.rescored, current.max_rescore_gap,
                            used.stats() if used and status == "done" else {})

    job = SearchJob(model, windows, k, early_barrier, latter_barrier, seed, batch_size, log=log, progress=progress,
                    on_phase=lambda current: on_phase(result(current, "searching")) if on_phase else None,
                    build_engine=lambda: _build_engine(model, windows, engine, batch_size, cache_gb))
    with _evaluating(model):
        if len(state.removal_list) < k:  # a finished search handed back in is returned as it is
            state = METRICS[metric](job, state)
    return result(state, "done")


def remove_blocks(model, removal_list: Sequence[int]) -> None:
    """Delete the blocks (original indices) in place; the model is then a normal checkpoint of fewer blocks."""
    blocks.remove_blocks(model, list(removal_list))


def skipping(model, skipped: Sequence[int]):
    """A context manager: inside it the model runs as if `skipped` were removed; after it, whole again."""
    blocks.check_removal_list(list(skipped), blocks.num_blocks(model), "skipped blocks")
    return blocks.skipping(model, skipped)


def perplexity(model, tokenizer, dataset: Data = "wikitext2", seqlen: int = 2048, batch_size: int = 1,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) on a data set's evaluation split (or given texts, joined), in windows of
    `seqlen` tokens (capped at the model's maximum positions), the loss in float32."""
    from sleb.ppl import perplexity as measure

    check_at_least("batch_size", batch_size, 1)
    seqlen = models.effective_seqlen(model, seqlen)
    if isinstance(dataset, str):
        data.check_dataset_name(dataset)
        windows = data.load_eval_windows(dataset, tokenizer, seqlen)
    else:
        windows = data.token_windows(tokenizer, "\n\n".join(_given_texts(dataset)), seqlen)
    with _evaluating(model):
        return measure(model, windows, batch_size, progress=progress)


def zeroshot(model, tokenizer, tasks: Union[str, Sequence[str]], num_fewshot: int = 0, limit=None,
             batch_size: int = 8) -> dict:
    """lm-eval's accuracy (`HFLM(pretrained=model)` + `simple_evaluate`) on `tasks` (names, or one
    comma-separated string; the offline demo_cloze and demo_order included)."""
    from sleb import accuracy as lm_eval_tasks
    from sleb.settings import comma_list

    names = comma_list(tasks, "tasks", "piqa,arc_easy or demo_cloze") if isinstance(tasks, str) else list(tasks)
    manager = lm_eval_tasks.task_manager(names)
    lm_eval_tasks.check_tasks(names, manager)
    with _evaluating(model):
        return lm_eval_tasks.evaluate_zeroshot(model, tokenizer, names, manager, num_fewshot, limit, batch_size)


def heal(model, tokenizer, dataset: Data = "c4", *, nsamples: int = 20000, seqlen: int = 256, lora_r: int = 8,
         lora_alpha: int = 16, lora_dropout: float = 0.05, lr: float = 1e-4, warmup_steps: int = 100,
         epochs: float = 2.0, max_steps: int = -1, train_batch_size: int = 4, grad_accum: int = 16,
         weight_decay: float = 0.0, seed: int = 0, logging_steps: int = 10, work_dir: Optional[str] = None):
    """LoRA-heal a (pruned) model with transformers' Trainer and return the merged model; the defaults are
    Shortened LLaMA's recipe (`python -m sleb.heal` documents each). The Trainer's checkpoints go to
    `work_dir` (a temporary folder, removed after, by default)."""
    import shutil
    import tempfile

    from sleb.healing import HealSettings, _train, training_dataset

    settings = HealSettings(nsamples=nsamples, seqlen=seqlen, lora_r=lora_r, lora_alpha=lora_alpha,
                            lora_dropout=lora_dropout, lr=lr, warmup_steps=warmup_steps, epochs=epochs,
                            max_steps=max_steps, train_batch_size=train_batch_size, grad_accum=grad_accum,
                            weight_decay=weight_decay, seed=seed, logging_steps=logging_steps)
    settings.check_training()
    use_cache = model.config.get_text_config().use_cache  # training turns it off; the merged model gets it back
    train_data = training_dataset(calibration_windows(tokenizer, dataset, nsamples, seqlen, seed))
    folder = work_dir or tempfile.mkdtemp(prefix="sleb-heal-")
    try:
        peft_model, _, _, _ = _train(model, train_data, settings, folder)
        merged = peft_model.merge_and_unload()
    finally:
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    merged.config.get_text_config().use_cache = use_cache
    return merged


def save_pretrained(model, tokenizer, directory: str, card=None) -> None:
    """Write the model, tokenizer (and a vision-language model's processor) with `save_pretrained`,
    atomically, after checking that the saved config rebuilds exactly this model; `card` (a
    huggingface_hub ModelCard) becomes README.md."""
    from sleb.settings import check_new_directory

    check_new_directory("save_model", directory)
    checkpoint.save(model, tokenizer, directory, card)
