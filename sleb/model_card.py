"""Model cards for saved checkpoints (huggingface_hub's ModelCard): what was removed, how it was chosen,
what it cost, how it was healed, and the command that made it, so a checkpoint pushed to the hub
says what it is and where it came from."""

import os
import shlex
import sys
from typing import Optional

from sleb import metrics
from sleb.errors import UsageError


def command_line(module: str) -> str:
    """The command this process was started with, as a user would type it."""
    return f"python -m {module} {shlex.join(sys.argv[1:])}".strip()


def _base_model(model_name: str):
    """A hub id for the card's `base_model`, or None for the demo model and local paths."""
    if model_name == "demo" or model_name.startswith((".", "/", "~")) or model_name.count("/") != 1:
        return None
    return model_name


def _ppl_lines(title: str, ppl: dict) -> list:
    if not ppl:
        return []
    return [f"- {title}: " + ", ".join(f"{name} {entry['ppl']:.3f}" for name, entry in ppl.items())]


def _settings(record: dict) -> dict:
    settings = record["settings"]
    return settings if isinstance(settings, dict) else vars(settings)


def make_card(record: dict, module: str, tags: list, sections: list, metric: str):
    from huggingface_hub import ModelCard, ModelCardData

    model_name = record.get("base_model") or _settings(record)["model_name"]  # heal: the model it was pruned from
    dense_model = record["base_model"] if "base_model" in record else model_name  # None: a dense model not known
    # sleb_* keys: what `python -m sleb.heal` (and any other reader) needs to know about the checkpoint.
    data = ModelCardData(base_model=_base_model(dense_model) if dense_model else None, library_name="transformers",
                         tags=["sleb", "depth-pruning", "pruned"] + tags,
                         sleb_removal_list=list(record["removal_list"]), sleb_num_blocks=record["num_blocks"],
                         sleb_metric=metric, sleb_base_model=dense_model)
    removed = record["removal_list"]
    depth = record["num_blocks"]
    body = [f"# {model_name} with {len(removed)} of {depth} blocks removed", "",
            f"Made with [sleb](https://arxiv.org/abs/2402.09025) (SLEB: block removal). Removed blocks "
            f"(original indices, in removal order): `{removed}`; {depth - len(removed)} blocks remain.", ""]
    serving = [f"- {problem}" for problem in record.get("serving_warnings") or []]
    changed = [f"- {line}" for line in record.get("config_warnings") or []]
    for title, lines in sections + [("Serving engines that would build another layout", serving),
                                    ("Config changed since load", changed)]:
        if lines:
            body += [f"## {title}", ""] + lines + [""]
    body += ["## Command", "", "```", command_line(module), "```", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(body))


def _search_lines(record: dict) -> list:
    settings = _settings(record)
    if record["command"] != "sleb":
        return ["- removal list given by hand (`python -m eval --removal_list`)"]
    return [f"- metric: {settings['metric']}; calibration: {settings['dataset']}, {settings['nsamples']} rows "
            f"(seed {settings['seed']}), {record.get('calibration_windows')} windows of {record.get('seqlen')} tokens"]


def compensated_metric(record: dict) -> str:
    """How a search or eval run's blocks were chosen, with "+ linear" where --compensate linear followed
    (sleb_compensated compensates inside the search and says so itself)."""
    method = (record.get("compensation") or {}).get("method", "linear")
    if record["command"] != "sleb":
        return f"given + {method}" if record.get("compensation") else "given"
    metric = metrics.get(_settings(record).get("metric", metrics.PAPER))
    label = metric.label(_settings(record).get("objective", "ce"))
    return f"{label} + {method}" if record.get("compensation") and not metric.compensates else label


def compensation_lines(record: dict) -> list:
    """What --compensate linear folded in, per removed run."""
    compensation = record.get("compensation")
    if not compensation:
        return []
    if compensation.get("method") == "local":
        lines = [f"- local reconstruction, {compensation['seconds']:.1f} s: for each removed run the block before it "
                 f"trained ({compensation['settings']['steps']} AdamW steps, lr {compensation['settings']['lr']}) to "
                 "output what the run would have; no parameters added"]
        return lines + [f"- run {t['run']} -> block {t['before']}: relative error {t['error_trained']:.4f} (plain "
                        f"removal {t['error_removed']:.4f}), {t['tokens']} tokens" for t in compensation["runs"]]
    lines = [f"- training-free linear compensation (least squares, ridge {compensation['ridge']}), "
             f"{compensation['seconds']:.1f} s: for each removed run a map folded into the block before it; "
             "no parameters added"]
    for fit in compensation["runs"]:
        lines.append(f"- run {fit['run']} -> block {fit['before']} ({', '.join(fit['folded_into'])}): relative "
                     f"residual {fit['residual']:.4f} (plain removal {fit['identity_residual']:.4f}), "
                     f"{fit['tokens']} tokens")
    return lines


def pruned_card(record: dict):
    """Card of a checkpoint saved by `python -m sleb` or `python -m eval`."""
    quality = _ppl_lines("perplexity before removal", record.get("ppl_dense")) + \
        _ppl_lines("perplexity after removal", record.get("ppl"))
    module = "sleb" if record["command"] == "sleb" else "eval"
    metric = compensated_metric(record)
    compensation = record.get("compensation")
    tags = [f"{compensation.get('method', 'linear')}-compensation"] if compensation else []
    return make_card(record, module, tags, [("How the blocks were chosen", _search_lines(record)),
                                            ("Compensation", compensation_lines(record)),
                                            ("Quality", quality)], metric)


def read_card(directory: str):
    """The sleb metadata of a checkpoint's model card ({} when it has no sleb card)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    path = os.path.join(directory, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # as ModelCard.load reads it
            text = handle.read()
        if not REGEX_YAML_BLOCK.search(text):  # no metadata block (the demo model's README): huggingface_hub
            return {}                          # would log a line about it before any error of ours
        data = ModelCard(text).data.to_dict()
    except Exception:  # a README that is not a model card
        return {}
    return {key: value for key, value in data.items() if key.startswith("sleb_")}


def checkpoint_card(model_name: str) -> dict:
    """The sleb metadata of the card of the checkpoint --model_name names ({} for any other model): a pruned
    or healed checkpoint names its removed blocks and the dense model they came from."""
    from sleb import models

    path = os.path.expanduser(models.resolve_model_name(model_name))
    return read_card(path) if os.path.isdir(path) else {}


def removed_before(model_name: str, card: Optional[dict] = None) -> tuple:
    """(the blocks sleb already removed from the model --model_name names, the model they came from or None),
    from a checkpoint's card (`card`, when the caller read it already) or a GGUF file's sleb.removal_list;
    ([], None) for a model sleb did not prune."""
    from sleb import gguf_file

    card = checkpoint_card(model_name) if card is None else card
    if card:
        return list(card.get("sleb_removal_list") or []), card.get("sleb_base_model")
    if gguf_file.is_gguf(model_name) and os.path.isfile(os.path.expanduser(model_name)):
        removed = gguf_file.field(gguf_file.reader(model_name), gguf_file.REMOVAL_KEY) or []
        return [int(i) for i in removed], None
    return [], None


def dense_source(model_name: str, removed: list, base, given) -> Optional[str]:
    """The dense model a pruned --model_name came from: --dense_model where given, else the one its card records
    (None for a model sleb did not prune, or where neither names it: a GGUF records none). Refused in one line
    when its config cannot be read, before any long work."""
    from sleb import models

    if not removed:
        if given:
            raise UsageError(f"--dense_model names the dense model a pruned model came from, and {model_name!r} is "
                             "not one sleb pruned; drop --dense_model")
        return None
    found = given or base
    if found is not None:
        try:
            models.load_config(found)
        except UsageError as error:
            raise UsageError(f"the dense model {model_name!r} came from, {found!r}, cannot be read: {error}") from None
    return found


def healed_card(record: dict):
    """Card of a checkpoint healed by `python -m sleb.heal`."""
    settings = _settings(record)
    metric = record["source_metric"]
    trained = (f"- every parameter of blocks {record['trained_blocks']} (original numbering), the rest frozen"
               if record.get("trained_blocks") else
               f"- LoRA (peft) r={settings['lora_r']}, alpha={settings['lora_alpha']}, dropout "
               f"{settings['lora_dropout']}, on {', '.join(record['lora_targets'])}"
               + (f" and the fused expert weights {', '.join(record['lora_expert_parameters'])}"
                  if record.get("lora_expert_parameters") else "") + "; merged into the weights")
    recipe = [trained,
              f"- AdamW, lr {settings['lr']}, {settings['warmup_steps']} warm-up steps then linear decay, "
              f"batch {settings['train_batch_size']} x {settings['grad_accum']} accumulation, "
              + (f"{settings['max_steps']} steps" if settings["max_steps"] > 0 else f"{settings['epochs']} epochs"),
              f"- data: {settings['dataset']}, {record['train_windows']} windows of {settings['seqlen']} tokens; "
              f"trained {record['train_seconds']:.0f} s" + (" on a 4-bit base (QLoRA)" if settings["load_in_4bit"] else ""),
              "- loss: " + ("mean KL from the dense model's next-token distributions on the same windows "
                            "(distillation)" if settings.get("objective") == "kl" else "next-token cross-entropy")]
    quality = _ppl_lines("perplexity after removal", record.get("ppl_pruned")) + \
        _ppl_lines("perplexity after healing", record.get("ppl_healed"))
    if quality and record.get("ppl_precision"):
        quality.append(f"- both measured in {record['ppl_precision']}")
    tags = ["healed"] if record.get("trained_blocks") else ["lora", "healed"]
    return make_card(record, "sleb.heal", tags, [("How the blocks were chosen", [f"- metric: {metric}"]),
                                                              ("Before training", compensation_lines(record)),
                                                              ("Healing", recipe), ("Quality", quality)], metric)
