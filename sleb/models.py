"""Loading a causal language model and its tokenizer, from the hub or a local directory."""

import json
import os
from dataclasses import dataclass

import torch

from sleb.errors import UsageError
from sleb.hub import use_cache_only_if_offline

# `--model_name demo` is the small Llama shipped with the project (see scripts/train_demo_model.py).
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    """Where and in what precision the model runs."""

    device: torch.device
    dtype: torch.dtype
    device_map: object = None  # passed to accelerate; None keeps the whole model on `device`


def resolve_model_name(model_name: str) -> str:
    return DEMO_MODEL_DIR if model_name == "demo" else model_name


def resolve_placement(dtype: str = "auto", device: str = "auto", device_map=None) -> Placement:
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UsageError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if dtype == "auto":
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise UsageError(f"unknown --dtype {dtype!r}; use auto, float16, bfloat16 or float32")
    return Placement(torch.device(device), torch_dtype, device_map)


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_config(model_name: str, trust_remote_code: bool = False):
    """(resolved path or hub id, config): cheap, so every check that needs the depth runs before the weights load."""
    path = resolve_model_name(model_name)
    if model_name == "demo" and not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"the demo model is missing from {path}; train it with scripts/train_demo_model.py")
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"model directory {path!r} does not exist; pass a local model directory or a hub id")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        use_cache_only_if_offline()
    from transformers import AutoConfig

    try:
        return path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError or hub errors here
        if os.path.isdir(path):
            raise UsageError(f"{path!r} holds no model config ({_first_line(error)}); pass a saved model directory") from None
        raise UsageError(
            f"cannot load {model_name!r} from the Hugging Face hub (offline or unknown id: {_first_line(error)}); "
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


def load_model(model_name: str, dtype: str = "auto", device: str = "auto", device_map=None,
               trust_remote_code: bool = False):
    """Return (model in eval mode, tokenizer). Any failure to load is a one-line UsageError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Loading reports and warnings would bury a one-line error; our own checks follow.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if isinstance(device_map, str) and device_map.strip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError:
            raise UsageError(f"--device_map {device_map!r} is not valid JSON; e.g. '{{\"\": \"cpu\"}}' or auto") from None
    placement = resolve_placement(dtype, device, device_map)
    path, config = load_config(model_name, trust_remote_code)
    print(f"loading {model_name} ({placement.dtype}, {device_map or placement.device})", flush=True)
    kwargs = {"dtype": placement.dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error) or "does not recognize" in str(error):
            raise UsageError(f"{model_name!r} ({config.model_type}) is not a causal language model; "
                             "pass a decoder such as Llama, OPT or Qwen2") from None
        raise UsageError(f"cannot load {model_name!r}: {_first_line(error)}") from None
    except OSError as error:
        raise UsageError(f"cannot load the weights of {model_name!r}: {_first_line(error)}") from None
    if info.get("missing_keys"):
        # e.g. an encoder checkpoint mapped onto an LM-head class: the head would be random.
        missing = sorted(info["missing_keys"])
        raise UsageError(f"{model_name!r} is not a causal language model checkpoint ({len(missing)} weights "
                         f"missing, e.g. {missing[0]}); pass a decoder such as Llama, OPT or Qwen2")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise UsageError(f"cannot load the tokenizer of {model_name!r}: {_first_line(error)}") from None
    if device_map is None:
        model.to(placement.device)
    model.eval()
    return model, tokenizer


def input_device(model) -> torch.device:
    """The device that token ids must be on (the embedding's; with a device_map it is not model.device)."""
    return model.get_input_embeddings().weight.device


def max_positions(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
