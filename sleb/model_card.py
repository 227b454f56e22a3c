"""Model cards for saved checkpoints (huggingface_hub's ModelCard): what was removed, how it was chosen,
what it cost, how it was healed, and the command that made it, so a checkpoint pushed to the hub
says what it is and where it came from."""

import shlex
import sys


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


def make_card(record: dict, module: str, tags: list, sections: list):
    from huggingface_hub import ModelCard, ModelCardData

    settings = record["settings"]
    settings = settings if isinstance(settings, dict) else vars(settings)
    model_name = settings["model_name"]
    data = ModelCardData(base_model=_base_model(model_name), library_name="transformers",
                         tags=["sleb", "depth-pruning", "pruned"] + tags)
    removed = record["removal_list"]
    depth = record["num_blocks"]
    body = [f"# {model_name} with {len(removed)} of {depth} blocks removed", "",
            f"Made with [sleb](https://arxiv.org/abs/2402.09025) (SLEB: block removal). Removed blocks "
            f"(original indices, in removal order): `{removed}`; {depth - len(removed)} blocks remain.", ""]
    for title, lines in sections:
        if lines:
            body += [f"## {title}", ""] + lines + [""]
    body += ["## Command", "", "```", command_line(module), "```", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(body))


def _search_lines(record: dict) -> list:
    settings = record["settings"]
    settings = settings if isinstance(settings, dict) else vars(settings)
    if record["command"] != "sleb":
        return ["- removal list given by hand (`python -m eval --removal_list`)"]
    return [f"- metric: {settings['metric']}; calibration: {settings['dataset']}, {settings['nsamples']} rows "
            f"(seed {settings['seed']}), {record.get('calibration_windows')} windows of {record.get('seqlen')} tokens"]


def pruned_card(record: dict):
    """Card of a checkpoint saved by `python -m sleb` or `python -m eval`."""
    quality = _ppl_lines("perplexity before removal", record.get("ppl_dense")) + \
        _ppl_lines("perplexity after removal", record.get("ppl"))
    module = "sleb" if record["command"] == "sleb" else "eval"
    return make_card(record, module, [], [("How the blocks were chosen", _search_lines(record)),
                                          ("Quality", quality)])
