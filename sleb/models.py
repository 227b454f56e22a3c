"""Loading a causal language model and its tokenizer, from the hub or a local directory, as the paper does.

Precision and placement follow the official SLEB code (`torch_dtype="auto"`, `device_map="auto"`): on a
GPU the checkpoint's own dtype, spread by accelerate over every visible GPU (and CPU, then disk, if
it must); on CPU float32. `--dtype`, `--device` and `--device_map` override either. A checkpoint that
cannot be read (truncated weights, invalid config.json, no tokenizer) is one line naming the file.
"""

import atexit
import contextlib
import copy
import functools
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass

import torch

from sleb import hub
from sleb.errors import UsageError, first_line

# `--model_name demo` is the small Llama shipped with the project (see scripts/train_demo_model.py).
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class Placement:
    """Where and in what precision the model runs."""

    device: torch.device  # the whole model's device, or where accelerate puts the first module
    dtype: object  # a torch.dtype, or "auto" when a GPU run takes a dtype the config does not name
    device_map: object = None  # passed to accelerate; None keeps the whole model on `device`
    max_memory: dict = None  # accelerate's per-device budget, with device_map

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "") if self.dtype != "auto" else "the checkpoint's dtype"
        if self.device_map is None:
            return f"{dtype} on {self.device}"
        shown = self.device_map if isinstance(self.device_map, str) else "a given map"
        return f"{dtype}, device_map {shown} (accelerate)"


def resolve_model_name(model_name: str) -> str:
    return DEMO_MODEL_DIR if model_name == "demo" else model_name


def parse_json_flag(name: str, value):
    """--device_map and --max_memory take a JSON object; fire hands over a dict or a string."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UsageError(f"--{name} {value!r} is not valid JSON; e.g. '{{\"\": \"cpu\"}}'") from None
    return value


def _max_memory(value):
    value = parse_json_flag("max_memory", value)
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise UsageError(f"--max_memory must be a JSON map of devices to sizes such as "
                         f"'{{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}}', got {value!r}")
    # JSON keys are strings; accelerate wants GPU indices as ints.
    return {int(key) if str(key).isdigit() else key: size for key, size in value.items()}


def _config_dtype(config):
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else "auto"


def resolve_placement(dtype: str = "auto", device: str = "auto", device_map=None, max_memory=None,
                      config=None) -> Placement:
    """The dtype and devices a run uses; `config` (when loaded) supplies the checkpoint's dtype."""
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UsageError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; use auto, float16, bfloat16 or float32")
    device_map = parse_json_flag("device_map", device_map)
    max_memory = _max_memory(max_memory)
    if max_memory is not None and device_map is None:
        raise UsageError("--max_memory applies with --device_map (e.g. --device_map auto); add it or drop --max_memory")
    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device == "auto" and cuda and device_map is None:
        device_map = "auto"  # the paper's loading: a model larger than one GPU spreads over all of them
    resolved = torch.device("cuda" if device == "auto" and cuda else "cpu" if device == "auto" else device)
    if dtype != "auto":
        torch_dtype = DTYPES[dtype]
    elif resolved.type == "cuda":
        torch_dtype = _config_dtype(config) if config is not None else "auto"
    else:
        torch_dtype = torch.float32
    return Placement(resolved, torch_dtype, device_map, max_memory)


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _local_dir(model_name: str):
    """The directory that holds the checkpoint: the given one, or the hub cache's snapshot."""
    path = os.path.expanduser(resolve_model_name(model_name))
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        return None


def _refetch_hint(model_name: str) -> str:
    if os.path.isdir(os.path.expanduser(resolve_model_name(model_name))):
        return "copy or save the checkpoint again"
    return f"download it again with `hf download {model_name} --force-download`"


def _gguf_config(model_name: str):
    """(the file's path, its config) for a GGUF file: transformers reads the config from its metadata."""
    from sleb import gguf_file

    path = os.path.abspath(os.path.expanduser(model_name))
    gguf_file.check_readable(path)
    # a copy: the model built from it owns its config, and pruning edits it
    return path, copy.deepcopy(_gguf_config_of(gguf_file.file_key(path)))


@functools.lru_cache(maxsize=4)
def _gguf_config_of(key: tuple):
    # transformers parses the whole metadata again for each config it reads (seconds on a real model's file)
    from sleb import gguf_file

    _quiet_transformers()
    from transformers import AutoConfig

    path = key[0]
    folder, kwargs = gguf_file.source_args(path)
    try:
        return AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as error:  # a key transformers cannot map, a file it cannot parse
        raise UsageError(f"cannot read the config of {path!r}: {first_line(error)}") from None


def load_config(model_name: str, trust_remote_code: bool = False):
    """(resolved path or hub id, config): cheap, so every check that needs the depth runs before the weights load.
    A GGUF file (FILE.gguf) is read through transformers' GGUF loader."""
    from sleb.gguf_file import is_gguf

    if is_gguf(model_name):
        return _gguf_config(model_name)
    path = resolve_model_name(model_name)
    if model_name == "demo" and not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"the demo model is missing from {path}; train it with scripts/train_demo_model.py")
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"model directory {path!r} does not exist; pass a local model directory or a hub id")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        hub.reach()
    _quiet_transformers()
    from transformers import AutoConfig

    try:
        return path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError or hub errors here
        directory = _local_dir(model_name)
        config_file = os.path.join(directory, "config.json") if directory else None
        if config_file and os.path.isfile(config_file):
            try:
                with open(config_file) as handle:
                    json.load(handle)
            except (ValueError, OSError) as bad:
                raise UsageError(f"{config_file} is not valid JSON ({first_line(bad)}); "
                                 f"{_refetch_hint(model_name)}") from None
            raise UsageError(f"{config_file} is not a model config ({first_line(error)}); "
                             f"{_refetch_hint(model_name)}") from None
        if os.path.isdir(path):
            raise UsageError(f"{path!r} holds no config.json; pass a saved model directory") from None
        offline = " (offline, and not in the local cache)" if hub.offline() else ""
        raise UsageError(
            f"cannot load {model_name!r} from the Hugging Face hub{offline}: {first_line(error)}; "
            "pass a local model directory, or --model_name demo"
        ) from None


def config_depth(config) -> int:
    """Number of decoder blocks a config declares."""
    text = getattr(config, "text_config", None) or config
    depth = getattr(text, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise UsageError(f"the config of model type {config.model_type!r} declares no number of blocks; "
                         "this architecture is not supported")
    return depth


def _quiet_transformers() -> None:
    # Loading reports and warnings would bury a one-line error; our own checks follow.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _from(path: str) -> tuple:
    """(what from_pretrained takes as the name, its extra arguments): a GGUF file is its folder and gguf_file."""
    from sleb import gguf_file

    return gguf_file.source_args(path) if gguf_file.is_gguf(path) else (path, {})


def load_tokenizer(model_name: str, path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source, extra = _from(path)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as error:
        if extra:
            raise UsageError(f"cannot read the tokenizer of {path!r}: {first_line(error)}") from None
        directory = _local_dir(model_name)
        if directory and not any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES):
            raise UsageError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); save the "
                             "base model's tokenizer there with AutoTokenizer.from_pretrained(BASE)"
                             f".save_pretrained('{directory}')") from None
        raise UsageError(f"cannot load the tokenizer of {model_name!r}: {first_line(error)}") from None


def _unreadable_weights(directory: str):
    """'FILE (why)' for the first weights file in `directory` that cannot be read, else None."""
    from safetensors import safe_open

    names = sorted(os.listdir(directory))
    for index in [n for n in names if n.endswith(".index.json")]:
        try:
            with open(os.path.join(directory, index)) as handle:
                shards = set(json.load(handle)["weight_map"].values())
        except (ValueError, KeyError, OSError) as error:
            return f"{os.path.join(directory, index)} ({first_line(error)})"
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(directory, s)))
        if missing:
            return f"{os.path.join(directory, missing[0])} (listed in {index} but missing)"
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, "pt") as handle:  # the header check covers a truncated file
                    handle.keys()
            elif name.endswith(".bin"):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            return f"{path} ({first_line(error, 120)})"
    return None


def _offload_folder() -> str:
    """accelerate needs a folder when a device_map sends weights to disk; one per process, removed at exit."""
    folder = tempfile.mkdtemp(prefix="sleb-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def auto_class(config):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a vision-language model that has no
    causal-LM class (Qwen2.5-VL): its language model is pruned, its vision tower kept as it is."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM  # its error names the unknown configuration


def load_model(model_name: str, dtype: str = "auto", device: str = "auto", device_map=None,
               trust_remote_code: bool = False, max_memory=None, quantization_config=None):
    """Return (model in eval mode, tokenizer). Any failure to load is a one-line UsageError.

    `quantization_config` (e.g. bitsandbytes' 4-bit, for QLoRA) is handed to from_pretrained."""
    path, config = load_config(model_name, trust_remote_code)
    placement = resolve_placement(dtype, device, device_map, max_memory, config)
    print(f"loading {model_name}: {placement.describe()}", flush=True)
    tokenizer = load_tokenizer(model_name, path, trust_remote_code)  # before the weights: cheap, fails fast
    kwargs = {"dtype": placement.dtype, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if placement.device_map is not None:
        kwargs.update(device_map=placement.device_map, offload_folder=_offload_folder())
        if placement.max_memory is not None:
            kwargs["max_memory"] = placement.max_memory
    source, extra = _from(path)
    try:
        model, info = auto_class(config).from_pretrained(source, config=config, output_loading_info=True, **kwargs,
                                                         **extra)
    except Exception as error:  # OSError, ValueError, safetensors' own error, torch's unpickling errors, ...
        if extra:
            raise UsageError(f"cannot load the weights of {path!r}: {first_line(error)}") from None
        if "Unrecognized configuration class" in str(error) or "does not recognize" in str(error):
            raise UsageError(f"{model_name!r} ({config.model_type}) is not a causal or vision-language model; "
                             "pass a decoder such as Llama, OPT or Qwen2") from None
        directory = _local_dir(model_name)
        broken = _unreadable_weights(directory) if directory else None
        if broken:
            raise UsageError(f"cannot read the weights file {broken}: it is truncated or corrupt (an interrupted "
                             f"download?); {_refetch_hint(model_name)}") from None
        raise UsageError(f"cannot load the weights of {model_name!r}: {first_line(error)}") from None
    if extra:  # dequantized: plain weights now, saved and checked like any other model's
        from sleb import gguf_file

        gguf_file.forget_quantization(model, path)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        _check_block_weights(model_name, model, missing)
        # e.g. an encoder checkpoint mapped onto an LM-head class: the head would be random.
        raise UsageError(f"{model_name!r} is not a causal language model checkpoint ({len(missing)} weights "
                         f"missing, e.g. {missing[0]}); pass a decoder such as Llama, OPT or Qwen2")
    if placement.device_map is None and quantization_config is None:
        model.to(placement.device)
    else:
        print(f"placed by accelerate: {describe_placement(model)}", flush=True)
    model.eval()
    from sleb import blocks

    blocks.origin(model)  # the config as loaded: what the reload guard rebuilds the scored model from
    return model, tokenizer


def _check_block_weights(model_name: str, model, missing: list) -> None:
    """Weights missing inside the blocks mean a config that describes other blocks than the weights hold,
    as a pruned checkpoint whose config was not carried through the deletion has: say so in one line."""
    from sleb import blocks, layout

    try:
        prefix = blocks.block_path(model) + "."
    except UsageError:
        return
    inside = [name for name in missing if name.startswith(prefix)]
    if inside:
        config = layout.depth_config(model.config)
        raise UsageError(f"{model_name!r}: its config describes blocks its weights do not hold ({len(inside)} block "
                         f"weights missing, e.g. {inside[0]}); was it pruned without carrying "
                         f"{layout.describe(config)} into the new numbering? Save it again from the model it was "
                         "pruned from (python -m eval --removal_list ... --save_model checks this)")


def placement_record(model) -> dict:
    """What a results file says about where the model ran: dtype, and the devices accelerate chose."""
    record = {"dtype": str(model.dtype).replace("torch.", ""), "input_device": str(input_device(model))}
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        record["devices"] = dict(Counter(str(where) for where in device_map.values()))
    return record


def describe_placement(model) -> str:
    """One line: 'float16 on cuda:0' or 'float16 over cuda:0 (41 modules), cuda:1 (42 modules)'."""
    record = placement_record(model)
    if "devices" in record and len(record["devices"]) > 1:
        spread = ", ".join(f"{where} ({count} modules)" for where, count in record["devices"].items())
        return f"{record['dtype']} over {spread}"
    return f"{record['dtype']} on {record['input_device']}"


def input_device(model) -> torch.device:
    """The device that token ids must be on: the embedding's (with a device_map it is not model.device;
    an embedding offloaded by accelerate runs on its hook's execution device)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return embedding.weight.device


def effective_seqlen(model, seqlen: int) -> int:
    """`seqlen` capped at the model's maximum positions."""
    return min(seqlen, max_positions(model.config))


def max_positions(config) -> int:
    """The longest sequence a model's config allows."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@contextlib.contextmanager
def use_cache(model, enabled: bool):
    """`use_cache` set on the config that holds it (a vision-language model's text config) for the
    duration, then put back."""
    config = model.config.get_text_config()
    before = getattr(config, "use_cache", None)
    config.use_cache = enabled
    try:
        yield model
    finally:
        config.use_cache = before
