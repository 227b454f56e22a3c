"""Every run's settings: one dataclass per entry module, each field with its help text, each class
owning its checks.

`check()` runs every check that needs no model and fills the defaults that follow the model (the
demo model calibrates and evaluates on the demo corpus, any other on the paper's data sets);
`check_depth(depth)` runs the ones that need the model's depth, read from its config before any
weights load. After these two, no stage re-checks a flag. The same object is stored in the run's
results file.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from sleb import blocks, data, metrics, models
from sleb.checkpoint import check_new_directory
from sleb.cli import flag
from sleb.errors import UsageError, check_at_least, comma_list
from sleb.evopress import Evolution
from sleb.metrics import check_choices, check_objective
from sleb.search_algorithms import check_shape
from sleb.recovery.lora import LoraRecipe

PAPER_PPL_DATASETS = "wikitext2,c4"
PAPER_TASKS = "piqa,winogrande,hellaswag,arc_challenge,arc_easy"
DEMO_TASKS = "demo_cloze,demo_order"


def is_demo(model_name: str) -> bool:
    """The demo model, or a checkpoint sleb saved from it (its model card names the model it came from)."""
    if model_name == "demo":
        return True
    from sleb.model_card import read_card

    path = os.path.expanduser(model_name)
    return os.path.isdir(path) and read_card(path).get("sleb_base_model") == "demo"


def follows_model(model_name: str, demo_value: str, paper_value: str) -> str:
    return demo_value if is_demo(model_name) else paper_value


@dataclass
class ModelFlags:
    model_name: str = flag("demo", "hub id (e.g. facebook/opt-13b), a local model directory, or demo (the shipped model)")
    dtype: str = flag("auto", "auto (on a GPU the checkpoint's own dtype, on CPU float32), float16, bfloat16 or float32")
    device: str = flag("auto", "auto (every visible GPU through accelerate's device_map auto, else cpu), cpu, cuda or "
                               "cuda:N (the whole model on that one device)")
    device_map: object = flag(None, "passed to accelerate to split a model over devices: auto, balanced, or a "
                                     "JSON map of module names to devices")
    max_memory: object = flag(None, "with --device_map: accelerate's budget per device as JSON, e.g. "
                                     "'{\"0\": \"70GiB\", \"cpu\": \"100GiB\"}'")
    trust_remote_code: bool = flag(False, "allow the model's own code from the hub to run")

    def check_model(self) -> None:
        models.resolve_placement(self.dtype, self.device, self.device_map, self.max_memory)


@dataclass
class EvalFlags:
    eval_ppl: bool = flag(True, "measure perplexity on --ppl_datasets")
    ppl_datasets: Optional[str] = flag(None, "comma-separated: wikitext2, c4, ptb, demo, file:PATH (.txt or .jsonl); "
                                             f"default {PAPER_PPL_DATASETS} (demo for the demo model)")
    seqlen: int = flag(2048, "tokens per window (capped at the model's maximum positions)")
    batch_size: int = flag(1, "windows per forward pass when measuring perplexity")
    eval_zeroshot: bool = flag(False, "zero-shot accuracy with lm-eval on --tasks")
    tasks: Optional[str] = flag(None, f"comma-separated lm-eval tasks; default {PAPER_TASKS} "
                                      f"({DEMO_TASKS}, which work offline, for the demo model)")
    num_fewshot: int = flag(0, "few-shot examples per zero-shot item")
    limit: Optional[float] = flag(None, "at most this many items per task (a fraction if below 1)")
    zeroshot_batch_size: int = flag(8, "lm-eval batch size")
    log_samples: bool = flag(False, "keep lm-eval's per-item records in the results JSON")

    def check_eval(self) -> None:
        for name, minimum in (("seqlen", 2), ("batch_size", 1), ("num_fewshot", 0), ("zeroshot_batch_size", 1)):
            check_at_least(name, getattr(self, name), minimum)
        if self.ppl_datasets is None:
            self.ppl_datasets = follows_model(self.model_name, "demo", PAPER_PPL_DATASETS)
        if self.tasks is None:
            self.tasks = follows_model(self.model_name, DEMO_TASKS, PAPER_TASKS)
        for name in self.ppl_dataset_names():
            data.check_dataset_name(name, calibration=False)
        self.task_names()
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--limit must be a positive number of items per task, got {self.limit!r}")
        if self.limit is not None and self.limit >= 1 and float(self.limit).is_integer():
            self.limit = int(self.limit)  # lm-eval reads an integer as a count, a float as a fraction

    def ppl_dataset_names(self) -> list:
        return comma_list(self.ppl_datasets, "ppl_datasets", "wikitext2,c4") if self.eval_ppl else []

    def task_names(self) -> list:
        return comma_list(self.tasks, "tasks", "piqa,arc_easy or demo_cloze") if self.eval_zeroshot else []


@dataclass
class SaveFlags:
    save_model: Optional[str] = flag(None, "directory to write the pruned model, tokenizer and model card to "
                                           "(save_pretrained)")

    def check_save(self) -> None:
        check_new_directory("save_model", self.save_model)


@dataclass
class GgufOutFlags:
    save_gguf: Optional[str] = flag(None, "a .gguf file to write the pruned model to, for llama.cpp: from a GGUF input, a "
                                          "copy of it with the kept blocks' bytes unchanged; else converted by --llama_cpp")
    gguf_type: Optional[str] = flag(None, "with --save_gguf from a transformers checkpoint: quantize with llama.cpp's "
                                          "quantizer to this type (Q8_0, Q4_K_M, ...); default f16")
    llama_cpp: Optional[str] = flag(None, "with --save_gguf from a transformers checkpoint: a llama.cpp source tree whose "
                                          "converter writes the GGUF (the llama-cpp-python sdist's vendor/llama.cpp)")
    converter_python: Optional[str] = flag(None, "the Python that runs llama.cpp's converter (default: this Python)")

    def check_save_gguf(self) -> None:
        """What needs no model: the path, the type, the tools."""
        from sleb import gguf_file

        given = [name for name in ("gguf_type", "llama_cpp", "converter_python") if getattr(self, name) is not None]
        if self.save_gguf is None:
            if given:
                raise UsageError(f"--{given[0]} applies with --save_gguf only; add it or drop the flag")
            return
        if not gguf_file.is_gguf(self.save_gguf):
            raise UsageError(f"--save_gguf {self.save_gguf!r} must name a .gguf file")
        if os.path.exists(self.save_gguf):
            raise UsageError(f"--save_gguf {self.save_gguf!r} exists; choose a new file")
        self.gguf_type = gguf_file.check_type(self.gguf_type)
        if gguf_file.is_gguf(self.model_name):
            if self.gguf_type or self.llama_cpp:
                raise UsageError(f"--{'gguf_type' if self.gguf_type else 'llama_cpp'} applies to a transformers "
                                 "checkpoint; a GGUF input is written in its own types, with no conversion")
        else:
            if self.llama_cpp is None:
                raise UsageError("--save_gguf from a transformers checkpoint converts with llama.cpp's converter; "
                                 "pass --llama_cpp TREE (the llama-cpp-python sdist's vendor/llama.cpp)")
            from sleb.llama_cpp import check_installed, converter_script

            converter_script(self.llama_cpp)
            if self.gguf_type:
                check_installed()

    def check_deci_output(self, removal_list: list) -> None:
        """--save_gguf with sub-layers: a Llama GGUF input, copied in llama.cpp's deci layout; checked before any
        work (sleb/gguf_file.py says what that layout cannot carry)."""
        if self.save_gguf is None:
            return
        from sleb import gguf_file

        if not gguf_file.is_gguf(self.model_name):
            raise UsageError("--save_gguf with sub-layers copies a GGUF input in llama.cpp's deci layout; pass "
                             "--model_name FILE.gguf, or save a checkpoint with --save_model")
        from sleb import sublayers

        gguf_file.check_deci(gguf_file.reader(self.model_name), self.model_name, sublayers.split(removal_list)[1])

    def check_save_gguf_depth(self, config, pruned_depth: int, changes_weights: bool) -> None:
        """Before any search: a layout llama.cpp would read otherwise at the pruned depth, and weights that
        will change in a GGUF whose types gguf-py cannot write back."""
        if self.save_gguf is None:
            return
        from sleb import gguf_file, serving

        found = serving.llama_cpp_problems_at_depth(config, pruned_depth, gguf_file.is_gguf(self.model_name))
        if found:
            raise UsageError(f"--save_gguf: at {pruned_depth} blocks llama.cpp would run another model: {found[0]}")
        if changes_weights and gguf_file.is_gguf(self.model_name):
            gguf_file.check_requantizable(self.model_name)


@dataclass
class KindFlags:
    keep_block_kinds: bool = flag(True, "keep one block of every kind the model cannot generate without (a hybrid "
                                        "model's attention blocks, whose cache stock transformers builds per kind)")


@dataclass
class CalibrationFlags:
    dataset: Optional[str] = flag(None, "calibration data: wikitext2, c4, ptb, demo or file:PATH (.txt/.jsonl); default "
                                        "wikitext2 (demo for the demo model; heal: c4)")
    nsamples: int = flag(128, "calibration rows taken from the shuffled train split")
    seed: int = flag(0, "seed of the calibration shuffle (and of --metric random, and of healing)")

    def check_calibration(self, paper_default: str = "wikitext2") -> None:
        """Fill the data set that follows the model, then check the three flags."""
        check_at_least("nsamples", self.nsamples, 1)
        if self.dataset is None:
            self.dataset = follows_model(self.model_name, "demo", paper_default)
        data.check_dataset_name(self.dataset)


@dataclass
class CompensateFlags:
    compensate: Optional[str] = flag(None, "linear: after removal, fold a least-squares map for each removed run "
                                           "into the block before it (no training, same parameters); local: train "
                                           "that block, all its parameters, to output what the run would have "
                                           "(sleb/recovery/local.py); default none")
    ridge: float = flag(0.0, "with --compensate linear: the ridge penalty ridge x ||T - I||^2 (>= 0), which shrinks the "
                             "map toward plain removal")
    local_steps: int = flag(200, "with --compensate local: AdamW steps per trained block, a calibration batch each")
    local_lr: float = flag(1e-4, "with --compensate local: the learning rate")

    def check_compensate(self) -> None:
        if self.compensate not in (None, "none", "linear", "local"):
            raise UsageError(f"--compensate must be linear or local (or left out), got {self.compensate!r}")
        if self.compensate == "none":
            self.compensate = None
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise UsageError(f"--ridge must be a number >= 0, got {self.ridge!r}")
        if self.ridge and self.compensate != "linear":
            raise UsageError("--ridge applies to --compensate linear only; add it or drop --ridge")
        if (self.local_steps, self.local_lr) != (200, 1e-4) and self.compensate != "local":
            raise UsageError("--local_steps and --local_lr apply to --compensate local only; add it or drop them")
        if self.compensate == "local":
            from sleb.recovery import local

            local.check([], self.local_steps, self.local_lr)


@dataclass
class KLFlags:
    kl_top_k: int = flag(512, "KL's dense distributions where the whole vocabulary does not fit --kl_gb: the top "
                              "log-probabilities kept per token (the rest as one bucket)")
    kl_gb: float = flag(0.0, "memory for KL's dense distributions (0: a quarter of the machine's)")

    def check_kl(self, uses_kl: bool, users: str) -> None:
        from sleb import objectives

        objectives.check("kl", self.kl_top_k, self.kl_gb)
        if not uses_kl and (self.kl_top_k, self.kl_gb) != (objectives.DEFAULT_TOP_K, 0.0):
            raise UsageError(f"--kl_top_k and --kl_gb apply to {users}; add one or drop them")


@dataclass
class DivergenceFlags(KLFlags):
    eval_kl: bool = flag(False, "also measure the mean KL from the dense model's next-token distributions on each "
                                "--ppl_datasets set (nats per token)")

    eval_agreement: int = flag(0, "also compare the first 32 greedy tokens with the dense model's over this many "
                                  "held-out prompts (0: off): tokens matched before the first divergence and overall")

    def check_divergence(self) -> None:
        self.check_kl(self.eval_kl or getattr(self, "objective", "ce") == "kl", "--objective kl or --eval_kl True")
        check_at_least("eval_agreement", self.eval_agreement, 0)
        if self.eval_kl and not self.ppl_dataset_names():
            raise UsageError("--eval_kl True measures KL on the --ppl_datasets sets; name one or drop --eval_kl")


@dataclass
class DenseSourceFlags:
    dense_model: Optional[str] = flag(None, "the dense model a pruned or healed --model_name came from, for answers "
                                            "kept (and heal's --dataset self); default: the one its model card "
                                            "records (a GGUF records none)")


@dataclass
class OutputFlags:
    result_folder: str = flag("sleb_results", "where the results JSON is written")
    result_file: Optional[str] = flag(None, "file name of the results JSON (default: derived from the settings)")
    overwrite: bool = flag(False, "replace an existing results file")

    def check_output(self) -> None:
        if self.result_file is not None and not self.result_file.endswith(".json"):
            raise UsageError(f"--result_file {self.result_file!r} must end in .json")


@dataclass
class EvalSettings(DenseSourceFlags, OutputFlags, GgufOutFlags, SaveFlags, CompensateFlags, DivergenceFlags, CalibrationFlags, KindFlags, EvalFlags,
                   ModelFlags):
    """`python -m eval`: evaluate a model with given blocks removed (calibration flags: --compensate linear)."""

    removal_list: list = flag([], "original indices of the blocks to remove, e.g. '[5, 4, 9]', or of sub-layers "
                                  "beside them, '[\"17.attn\", \"5.mlp\", 14]'; [] = dense")

    def check(self) -> None:
        from sleb import sublayers

        self.removal_list = sublayers.parse_flag(self.removal_list)
        if sublayers.has_sublayers(self.removal_list):
            if self.compensate:
                raise UsageError("the removal list names sub-layers; --compensate does not carry them yet: drop it")
            self.check_deci_output(self.removal_list)
        self.check_compensate()
        if self.compensate is not None:
            self.check_calibration()
            if not self.removal_list:
                raise UsageError(f"--compensate {self.compensate} needs blocks to remove; pass --removal_list '[..]'")
        self.check_eval()
        self.check_divergence()
        self.check_save()
        self.check_save_gguf()
        self.check_model()
        self.check_output()

    def check_depth(self, depth: int, config=None) -> None:
        from sleb import sublayers

        sublayers.check_against(self.removal_list, depth)
        blocks.check_removal_list(sublayers.split(self.removal_list)[0], depth)
        if self.save_model and config is not None and sublayers.has_sublayers(self.removal_list):
            from sleb import decilm

            decilm.check(config)
        if self.compensate == "linear":
            from sleb.recovery.linear import check

            check(self.ridge, self.removal_list, depth)
        elif self.compensate == "local":
            from sleb.recovery import local

            local.check(self.removal_list, self.local_steps, self.local_lr)
        if config is not None:
            self.check_save_gguf_depth(config, depth - len(sublayers.split(self.removal_list)[0]),
                                       self.compensate is not None)


@dataclass
class SearchSettings(OutputFlags, GgufOutFlags, SaveFlags, CompensateFlags, DivergenceFlags, CalibrationFlags, KindFlags, EvalFlags,
                     ModelFlags):
    """`python -m sleb`: find which blocks to remove, then evaluate the pruned model."""

    num_blocks: Optional[int] = flag(None, "the model's depth (default: read from the model); a mismatch is an error")
    num_remove_blocks: Optional[int] = flag(None, "blocks to remove (default: ceil(0.2 x num_blocks))")
    early_barrier: int = flag(1, "the first this-many alive blocks are never candidates")
    latter_barrier: int = flag(1, "the last this-many alive blocks are never candidates")
    metric: str = flag(metrics.PAPER, metrics.described())
    objective: str = flag("ce", "what the loss-scored metrics minimise: ce (the paper's cross-entropy) or kl (mean KL "
                                "from the dense model's next-token distributions)")
    evo_generations: Optional[int] = flag(None, "evopress: generations (default k (n - k) / 1.5, rounded up)")
    evo_offspring: int = flag(32, "evopress: children per generation")
    evo_survivors: int = flag(2, "evopress: children scored on every calibration batch after the first stage")
    evo_first_stage_share: float = flag(1 / 16, "evopress: share of the calibration batches the first stage scores on")
    evo_max_mutations: int = flag(3, "evopress: level-switch swaps per child, 1 to this many")
    evo_initial: int = flag(64, "evopress: random valid sets beside the sleb list in the first population")
    evo_greedy_start: bool = flag(True, "evopress: put the sleb list (same objective) in the first population; False: "
                                        "random sets only, as EvoPress's code starts")
    engine: str = flag("fast", "fast (exact, prefix reuse + abandonment) or reference (the paper's loop)")
    search_batch_size: int = flag(4, "calibration windows per forward in the fast engine")
    cache_gb: float = flag(0.0, "memory for cached hidden states in the fast engine (0: automatic)")
    compensation_gb: float = flag(0.0, "sleb_compensated: memory for the candidates' sums, 2 x hidden^2 float64 each "
                                       "(0: a quarter of the free memory); more statistics passes when it is small")
    resume: bool = flag(False, "continue an interrupted search from its results file")
    plot: bool = flag(False, "write PNGs: candidate-loss heatmap and loss vs blocks removed")
    unit: str = flag("block", "what a phase removes: block (the paper's search), sublayer (an attention or an MLP), "
                              "attention or mlp; with sub-layers --num_remove_blocks is a budget of blocks' weights")

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise UsageError("--resume True continues the results file and --overwrite True replaces it; pass one")
        self.check_unit()
        check_choices(self.metric, self.engine, self.early_barrier, self.latter_barrier)
        self.check_compensate()
        if self.compensate is not None and metrics.get(self.metric).compensates:
            raise UsageError(f"--metric {self.metric} compensates as it searches; drop --compensate {self.compensate}")
        if self.compensate is not None and self.early_barrier < 1:
            raise UsageError(f"--compensate {self.compensate} changes the block before each removed run; keep "
                             "--early_barrier at least 1 so block 0 is never removed")
        for name, minimum in (("search_batch_size", 1), ("cache_gb", 0), ("compensation_gb", 0)):
            check_at_least(name, getattr(self, name), minimum)
        check_objective(self.metric, self.objective, self.kl_top_k, self.kl_gb)
        self.evolution().check()
        if not metrics.get(self.metric).evolves and self.evolution() != Evolution():
            evolving = " or ".join(name for name, metric in metrics.METRICS.items() if metric.evolves)
            raise UsageError(f"the --evo_* flags set {evolving}'s search; add --metric {evolving} or drop them "
                             f"(--metric is {self.metric})")
        if self.num_remove_blocks is not None:
            check_at_least("num_remove_blocks", self.num_remove_blocks, 1)
        self.check_calibration()
        self.check_eval()
        self.check_divergence()
        self.check_save()
        self.check_save_gguf()
        self.check_model()
        self.check_output()

    def check_unit(self) -> None:
        """A sub-layer search runs in one process and evaluates there: what it cannot do (yet) is refused here,
        before anything loads."""
        from sleb.sublayers import UNITS

        if self.unit not in UNITS:
            raise UsageError(f"--unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.unit == "block":
            return
        if self.save_gguf and self.unit != "attention":
            raise UsageError(f"--save_gguf: llama.cpp's deci layers without an MLP skip their residual update, so a "
                             f"--unit {self.unit} search may pick what it cannot serve; use --unit attention or "
                             "--save_model")
        self.check_deci_output([])
        asked = [flag for flag, value in (("--metric " + str(self.metric), metrics.get(self.metric).sublayers is None),
                                          ("--compensate", self.compensate),
                                          ("--resume", self.resume and metrics.get(self.metric).sublayers != "greedy"),
                                          ("--plot", self.plot)) if value]
        if asked:
            raise UsageError(f"--unit {self.unit} runs the greedy sleb search and evaluates in this process; "
                             f"{asked[0]} does not work with sub-layers yet: drop it")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(f"--unit {self.unit} runs in one process; run it without torchrun")
        if self.early_barrier != 1 or self.latter_barrier != 1:
            raise UsageError(f"--unit {self.unit}: the candidates are the sub-layers of every block but the first "
                             "and the last; leave --early_barrier and --latter_barrier at 1")

    def evolution(self) -> Evolution:
        """EvoPress's settings these flags describe."""
        return Evolution(self.evo_generations, self.evo_offspring, self.evo_survivors, self.evo_first_stage_share,
                         self.evo_max_mutations, self.evo_initial, self.evo_greedy_start)

    def check_depth(self, depth: int, config=None) -> None:
        """Fill num_blocks and num_remove_blocks from the depth; check that the search has candidates (and,
        with `config`, what --save_gguf needs of the pruned model)."""
        if self.num_blocks is not None and self.num_blocks != depth:
            raise UsageError(f"--num_blocks {self.num_blocks} but {self.model_name} has {depth} blocks; "
                             f"pass --num_blocks {depth} or leave it out")
        self.num_blocks = depth
        if self.num_remove_blocks is None:
            self.num_remove_blocks = blocks.default_remove_count(depth)
        if self.unit != "block":  # a budget of weights, not a count of blocks: the search says when it runs out
            if self.save_model and config is not None:
                from sleb import decilm

                decilm.check(config)
            return
        check_shape(depth, self.num_remove_blocks, self.early_barrier, self.latter_barrier)
        if config is not None:
            self.check_save_gguf_depth(config, depth - self.num_remove_blocks,
                                       self.compensate is not None or metrics.get(self.metric).changes_weights)


RECIPE = LoraRecipe()  # the recipe's defaults are the flags' defaults


@dataclass
class HealSettings(DenseSourceFlags, OutputFlags, GgufOutFlags, KLFlags, CalibrationFlags, KindFlags, EvalFlags, ModelFlags):
    """`python -m sleb.heal`: LoRA-heal a pruned model and save the merged checkpoint."""

    output_dir: Optional[str] = flag(None, "where the healed (merged) checkpoint is written; must be new or empty")
    removal_list: Optional[list] = flag(None, "blocks to remove first, e.g. '[7, 3, 5]'; leave out for a pruned "
                                              "checkpoint written by --save_model (its model card names them)")
    nsamples: int = flag(20000, "training rows taken from the shuffled train split, then cut into --seqlen windows")
    seqlen: int = flag(256, "tokens per training window (Shortened LLaMA: 256)")
    eval_seqlen: int = flag(2048, "tokens per perplexity window (capped at the model's maximum positions)")
    lora_r: int = flag(RECIPE.lora_r, "LoRA rank")
    lora_alpha: int = flag(RECIPE.lora_alpha, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = flag(RECIPE.lora_dropout, "dropout on the LoRA input")
    lr: float = flag(RECIPE.lr, "peak learning rate of AdamW")
    warmup_steps: int = flag(RECIPE.warmup_steps, "linear warm-up steps, then linear decay")
    epochs: float = flag(RECIPE.epochs, "passes over the training windows (ignored when --max_steps is set)")
    max_steps: int = flag(RECIPE.max_steps, "optimizer steps in all (-1: --epochs decide)")
    train_batch_size: int = flag(RECIPE.train_batch_size, "training windows per device per forward")
    grad_accum: int = flag(RECIPE.grad_accum, "forwards per optimizer step (effective batch: train_batch_size x "
                                              "grad_accum x devices)")
    weight_decay: float = flag(RECIPE.weight_decay, "AdamW weight decay")
    logging_steps: int = flag(RECIPE.logging_steps, "log the training loss every this many steps")
    save_steps: int = flag(RECIPE.save_steps, "write a Trainer checkpoint (for --resume) every this many steps")
    objective: str = flag(RECIPE.objective, "what LoRA minimises: ce (cross-entropy on the training text) or kl "
                                            "(distillation: mean KL from the dense model's next-token distributions "
                                            "on the same windows)")
    train_blocks: Optional[object] = flag(None, "instead of LoRA: train every parameter of these blocks, the rest "
                                                "frozen; original numbers, e.g. '[4, 15]', or before (the kept block "
                                                "in front of each removed run); the lora_* flags then do not apply")
    save_adapter: Optional[str] = flag(None, "also write the LoRA adapter alone (peft format) to this directory")
    load_in_4bit: bool = flag(False, "QLoRA: train on a 4-bit (NF4) base through bitsandbytes; CUDA only")
    resume: bool = flag(False, "continue from the last Trainer checkpoint of an interrupted run with these settings")
    local_steps: int = flag(0, "before LoRA: train the block before each removed run, all its parameters, this many "
                               "steps to output what the run would have (local reconstruction); 0: none")
    local_lr: float = flag(1e-4, "with --local_steps: the learning rate of the local training")

    def check(self) -> None:
        if self.output_dir is None:
            raise UsageError("--output_dir is required: the directory the healed checkpoint goes to")
        check_new_directory("output_dir", self.output_dir)
        check_new_directory("save_adapter", self.save_adapter)
        if self.resume and self.overwrite:
            raise UsageError("--resume True continues the training and --overwrite True starts it again; pass one")
        if self.local_steps != 0:
            from sleb.recovery import local

            local.check([], self.local_steps, self.local_lr)
            if self.load_in_4bit:
                raise UsageError("--local_steps trains full-precision blocks; QLoRA (--load_in_4bit) reloads the "
                                 "model without them: drop one")
        self.recipe().check()
        if self.train_blocks is not None and (self.save_adapter or self.load_in_4bit):
            raise UsageError("--train_blocks trains whole blocks in full precision: there is no adapter to save "
                             "(--save_adapter) and no 4-bit base to train on (--load_in_4bit); drop one")
        self.check_kl(self.objective == "kl", "--objective kl")
        for name, minimum in (("seqlen", 2), ("eval_seqlen", 2)):
            check_at_least(name, getattr(self, name), minimum)
        if self.removal_list is not None:
            self.removal_list = blocks.check_removal_list(self.removal_list)
        if self.load_in_4bit:
            import importlib.util

            import torch

            if not torch.cuda.is_available():
                raise UsageError("--load_in_4bit True needs a CUDA GPU (bitsandbytes); train in full precision on CPU")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UsageError("--load_in_4bit True needs bitsandbytes: pip install bitsandbytes")
        self.check_calibration("c4")
        self.check_eval()
        self.check_save_gguf()
        self.check_model()
        self.check_output()

    def recipe(self) -> LoraRecipe:
        """The LoRA recipe these flags describe."""
        return LoraRecipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraRecipe)})

    def check_depth(self, depth: int, removed_before: Optional[list]) -> list:
        """The removal list to apply on load: the given one (checked against the depth), or none for a
        checkpoint whose card (or a GGUF whose sleb.removal_list) says it is already pruned."""
        if self.removal_list is None:
            if removed_before is None:
                raise UsageError(f"{self.model_name!r} is not a pruned model (no sleb model card or GGUF "
                                 "sleb.removal_list names its removed blocks); pass --removal_list '[..]', or a "
                                 "directory or GGUF written by --save_model / --save_gguf")
            if self.local_steps:
                raise UsageError("--local_steps trains the block before each run against the removed blocks, and "
                                 "this model's are gone: heal the dense model with --removal_list '[..]'")
            if self.train_blocks is not None:
                raise UsageError("--train_blocks names blocks in the dense model's numbering, and this model is "
                                 "already pruned: heal the dense model with --removal_list '[..]'")
            return []
        if not self.removal_list:
            raise UsageError("--removal_list is empty: there is nothing to heal; name the removed blocks")
        removal_list = blocks.check_removal_list(self.removal_list, depth)
        if isinstance(self.train_blocks, (list, tuple)):
            wrong = [i for i in self.train_blocks if i >= depth or i in removal_list]
            if wrong:
                raise UsageError(f"--train_blocks names block {wrong[0]}, which the pruned model does not hold "
                                 f"({depth} blocks, removing {removal_list})")
        if self.train_blocks == "before" and min(removal_list) == 0:
            raise UsageError("--train_blocks before: block 0 is removed and has no block in front; name the blocks")
        if self.local_steps:
            from sleb.recovery import local

            local.check(removal_list, self.local_steps, self.local_lr)
        return removal_list


@dataclass
class ReportSettings:
    """`sleb report`: a markdown report and plots from a folder of results files."""

    folder: str = flag("sleb_results", "the folder of results JSONs to read")
    out: str = flag("report.md", "the markdown file to write (PNGs go beside it)")

    def check(self) -> None:
        if not os.path.isdir(self.folder):
            raise UsageError(f"results folder {self.folder!r} does not exist")


# Latency sizes: the paper's settings on a GPU, and what finishes in about a minute on a small CPU.
GPU_SIZES = {"prompt": {"batch_size": 1, "prompt_len": 2048, "new_tokens": 0},
             "generation": {"batch_size": 64, "prompt_len": 64, "new_tokens": 128}}
CPU_SIZES = {"prompt": {"batch_size": 1, "prompt_len": 256, "new_tokens": 0},
             "generation": {"batch_size": 4, "prompt_len": 32, "new_tokens": 32}}


@dataclass
class LlamaCppFlags:
    engine: str = flag("transformers", "transformers (eager, in this process) or llama.cpp (llama-cpp-python on the "
                                       "CPU: pip install 'sleb[llama-cpp]')")
    gguf_dense: Optional[str] = flag(None, "with --engine llama.cpp: the dense model's GGUF file")
    gguf_pruned: Optional[str] = flag(None, "with --engine llama.cpp: the pruned model's GGUF file")
    llama_cpp: Optional[str] = flag(None, "with --engine llama.cpp: a llama.cpp source tree (e.g. the llama-cpp-python "
                                          "sdist's vendor/llama.cpp) whose converter makes both GGUF files from "
                                          "--model_name, written beside the results")
    converter_python: Optional[str] = flag(None, "the Python that runs llama.cpp's converter, from an environment "
                                                 "meeting its requirements (default: this Python)")
    gguf_outtype: str = flag("f16", "what the converter writes: f32, f16, bf16, q8_0 or auto")
    threads: Optional[int] = flag(None, "llama.cpp threads (default: every core this process may use)")

    def check_llama_cpp(self) -> bool:
        """True when llama.cpp runs; its flags are refused with the other engine."""
        if self.engine not in ("transformers", "llama.cpp"):
            raise UsageError(f"--engine must be transformers or llama.cpp, got {self.engine!r}")
        given = [name for name in ("gguf_dense", "gguf_pruned", "llama_cpp", "converter_python", "threads")
                 if getattr(self, name) is not None]
        if self.engine == "transformers":
            if given:
                raise UsageError(f"--{given[0]} applies to --engine llama.cpp only; add it or drop the flag")
            return False
        files = (self.gguf_dense, self.gguf_pruned)
        from sleb import gguf_file

        if gguf_file.is_gguf(self.model_name):  # the file itself, and a copy of it pruned by --removal_list
            if files != (None, None) or self.llama_cpp is not None:
                raise UsageError("--model_name FILE.gguf is timed against its copy pruned by --removal_list; drop "
                                 "--gguf_dense, --gguf_pruned and --llama_cpp")
            gguf_file.reader(self.model_name)
        elif self.llama_cpp is None and None in files:
            raise UsageError("--engine llama.cpp needs --model_name FILE.gguf, --gguf_dense and --gguf_pruned, or "
                             "--llama_cpp PATH (a llama.cpp source tree) to convert both from --model_name")
        if self.llama_cpp is not None and files != (None, None):
            raise UsageError("give either --gguf_dense and --gguf_pruned, or --llama_cpp, not both")
        for name, path in (("gguf_dense", self.gguf_dense), ("gguf_pruned", self.gguf_pruned)):
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"--{name} {path!r}: no such file")
        if self.llama_cpp is not None:
            from sleb.llama_cpp import converter_script

            converter_script(self.llama_cpp)
        if self.gguf_outtype not in ("f32", "f16", "bf16", "q8_0", "auto"):
            raise UsageError(f"--gguf_outtype must be f32, f16, bf16, q8_0 or auto, got {self.gguf_outtype!r}")
        if self.threads is not None:
            check_at_least("threads", self.threads, 1)
        return True


@dataclass
class LatencySettings(OutputFlags, LlamaCppFlags, ModelFlags):
    """`python -m latency`: prompt or generation latency, dense vs pruned."""

    generation: bool = flag(False, "measure generation (default: prompt processing)")
    removal_list: Optional[list] = flag(None, "blocks to remove (default: ceil(0.2 N) blocks from block 1)")
    batch_size: Optional[int] = flag(None, "sequences per run (default: 1 prompt / 64 generation on GPU; 1 / 4 on CPU)")
    prompt_len: Optional[int] = flag(None, "prompt tokens (default: 2048 prompt / 64 generation on GPU; 256 / 32 on CPU)")
    new_tokens: Optional[int] = flag(None, "generated tokens in --generation (default: 128 on GPU, 32 on CPU)")
    warmup: int = flag(2, "untimed runs before measuring")
    repeats: int = flag(5, "timed runs; median, min and max are reported")
    static_cache: bool = flag(False, "generate with a static KV cache (not compiled unless --compile True)")
    compile: bool = flag(False, "torch.compile: the forward in prompt mode; in --generation, transformers' own "
                                "compiled decoding, which needs --static_cache True")

    def check(self) -> None:
        if not self.generation and (self.new_tokens is not None or self.static_cache):
            raise UsageError("--new_tokens and --static_cache apply to --generation True only; add it or drop them")
        if self.generation and self.compile and not self.static_cache:
            raise UsageError("--compile True in --generation compiles decoding with a static KV cache; "
                             "add --static_cache True")
        check_at_least("warmup", self.warmup, 0)
        check_at_least("repeats", self.repeats, 1)
        if self.check_llama_cpp():
            if self.static_cache or self.compile:
                raise UsageError("--static_cache and --compile apply to --engine transformers only")
            if self.batch_size not in (None, 1):
                raise UsageError(f"--engine llama.cpp runs one sequence; --batch_size must be 1, got {self.batch_size}")
            self.batch_size = 1
            from sleb.llama_cpp import check_installed

            check_installed()
        self.check_model()
        # Sizes left out take the device's defaults; the filled-in values are what the results record.
        device = models.resolve_placement(self.dtype, self.device, self.device_map, self.max_memory).device
        mode = "generation" if self.generation else "prompt"
        for name, default in (GPU_SIZES if device.type == "cuda" and self.engine != "llama.cpp" else CPU_SIZES)[mode].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            check_at_least(name, getattr(self, name), 1 if name != "new_tokens" or self.generation else 0)
        if self.removal_list is not None:
            from sleb import sublayers

            self.removal_list = sublayers.parse_flag(self.removal_list)
            if not self.removal_list:
                raise UsageError("--removal_list is empty; name the blocks to remove, e.g. '[1, 2, 3]'")
            if self.engine == "llama.cpp" and sublayers.has_sublayers(self.removal_list):
                raise UsageError("--engine llama.cpp runs whole blocks removed; sub-layers are timed in transformers "
                                 "(drop --engine llama.cpp)")
        if self.compile:
            import torch._dynamo

            if not torch._dynamo.is_dynamo_supported():
                raise UsageError("--compile True but torch.compile is not supported on this Python/platform; "
                                 "run without --compile")
        self.check_output()

    def check_depth(self, depth: int) -> None:
        from sleb import sublayers

        if self.removal_list is None:
            self.removal_list = list(range(1, 1 + blocks.default_remove_count(depth)))
        sublayers.check_against(self.removal_list, depth)
        blocks.check_removal_list(sublayers.split(self.removal_list)[0], depth)
