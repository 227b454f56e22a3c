"""Where a model keeps its decoder blocks, and how to remove or temporarily skip some of them.

Nothing else in sleb knows where blocks live. Removal-list semantics are the paper's: indices of the
original blocks, in removal order.
"""

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field

import torch.nn as nn

from sleb import layout, rebuild
from sleb.errors import UsageError

# Attribute path of the decoder-block ModuleList, by `config.model_type`. Anything else goes through
# `_find_generic`, which looks inside the language model for the one ModuleList as long as the depth.
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
}


def _resolve(model, path: str):
    parent = model
    *parents, attribute = path.split(".")
    for name in parents:
        parent = getattr(parent, name)
    return parent, attribute


def _language_model(model):
    """The decoder that holds the blocks: the model itself, or a vision-language model's text part."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else model


def _find_generic(model) -> str:
    # Blocks may be of several classes (attention and Mamba layers in one list): the length decides.
    depth = getattr(layout.depth_config(model.config), "num_hidden_layers", None)
    decoder = _language_model(model)
    prefix = next((name for name, module in model.named_modules() if module is decoder), "")
    found = [".".join(filter(None, (prefix, name))) for name, module in decoder.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == depth]
    if len(found) != 1:
        raise UsageError(
            f"cannot tell which ModuleList holds the decoder blocks of {type(model).__name__} "
            f"(lists of {depth} modules: {found or 'none'}); this architecture is not supported"
        )
    return found[0]


def block_path(model) -> str:
    """Dotted name of the decoder-block ModuleList, e.g. 'model.layers' or 'transformer.h'."""
    path = BLOCK_PATHS.get(getattr(model.config, "model_type", None))
    if path is not None:
        try:
            parent, attribute = _resolve(model, path)
            if isinstance(getattr(parent, attribute), nn.ModuleList):
                return path
        except AttributeError:
            pass
    return _find_generic(model)


def block_owner(model):
    """(module holding the block list, attribute name)."""
    return _resolve(model, block_path(model))


def get_blocks(model) -> nn.ModuleList:
    parent, attribute = block_owner(model)
    return getattr(parent, attribute)


def num_blocks(model) -> int:
    return len(get_blocks(model))


@dataclass
class Origin:
    """The model as sleb first met it (loaded, or first given blocks to remove): its config at full
    depth, and the original index of each block it holds now. The reload guard rebuilds the model
    that was scored from it; a resumed healing run compares what was removed and changed."""

    config: object  # a copy of the config, taken before any block was removed
    kept: list  # original indices of the blocks the model holds, in order
    weights_changed: list = field(default_factory=list)  # maps folded in since: {"map", "run", "into"}

    @property
    def removed(self) -> list:
        return [i for i in range(layout.depth_config(self.config).num_hidden_layers) if i not in set(self.kept)]


def in_dense_numbering(removed_before: list, removal_list: list, depth: int) -> list:
    """The blocks a model lacks in the numbering of the dense model it came from: `removed_before` (already in
    that numbering) and then `removal_list`, indices of the `depth` blocks it had before these went."""
    removed_before = [int(i) for i in removed_before]
    alive = [i for i in range(depth + len(removed_before)) if i not in set(removed_before)]
    return removed_before + [alive[int(i)] for i in removal_list]


def origin(model) -> Origin:
    """The model's Origin, taken now if sleb has not met it before."""
    found = getattr(model, "_sleb_origin", None)
    if found is None or len(found.kept) != num_blocks(model):  # new, or blocks removed by other means since
        found = Origin(copy.deepcopy(model.config), list(range(num_blocks(model))))
        model.__dict__["_sleb_origin"] = found  # a plain attribute: never a module, never saved
    return found


def compute_dtype(model):
    """The floating dtype the blocks hold their weights in, which is what they compute in (a model's
    `dtype` is its first parameter's: float32 embeddings before bfloat16 blocks would say float32)."""
    for parameter in get_blocks(model).parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return model.dtype


def _set_block_list(model, keep: list) -> dict:
    """Keep only the blocks at positions `keep`; return what is needed to undo it."""
    parent, attribute = block_owner(model)
    blocks = getattr(parent, attribute)
    config = layout.depth_config(model.config)
    saved = {"owner": (parent, attribute), "blocks": blocks, "layout": layout.keep_blocks(config, keep)}
    setattr(parent, attribute, nn.ModuleList([blocks[i] for i in keep]))
    # (module, attribute, old value) of everything set on the kept blocks, undone in reverse
    saved["changed"] = _renumber(getattr(parent, attribute))
    saved["rederived"] = rederive(getattr(parent, attribute), config) if keep != list(range(len(blocks))) else []
    return saved


def rederive(block_list, config) -> list:
    """Settings a block computes from its index at construction (GPT-2's attention scaling by
    1 / (layer_idx + 1)) set as a block built at its new position would have them, so a model with
    blocks skipped or deleted is the model `from_pretrained` builds from its config. Returns
    (module, attribute, old value) to undo it. Classes not built as Block(config, layer_idx), or whose
    rebuild has another structure (modules, classes or tensor shapes), are left alone: the reload
    guard still compares them before a save."""
    changed = []
    for position, block in enumerate(block_list):
        fresh = rebuild.block_at(block, config, position)
        if fresh is None or rebuild.structure(fresh) != rebuild.structure(block):
            continue  # not this block's structure (Bamba's class takes its kind as a third argument)
        theirs = dict(fresh.named_modules())
        for name, module in block.named_modules():
            for attribute, _, new in rebuild.setting_differences(module, theirs[name]):
                if new != "<missing>":
                    changed.append((module, attribute, getattr(module, attribute)))
                    setattr(module, attribute, getattr(theirs[name], attribute))
    return changed


def _rederive_outside_blocks(model) -> None:
    """Settings the model computes from its depth outside the blocks (Gemma 4's first KV-sharing block,
    num_hidden_layers - num_kv_shared_layers) set as the model built from its new config has them."""
    fresh = rebuild.on_meta(lambda: type(model)._from_config(copy.deepcopy(model.config)))
    inside = block_path(model)
    theirs = dict(fresh.named_modules())
    for name, module in model.named_modules():
        other = theirs.get(name)
        if other is None or type(other) is not type(module) or name == inside or name.startswith(inside + "."):
            continue
        for attribute, _, new in rebuild.setting_differences(module, other):
            if new != "<missing>":
                setattr(module, attribute, getattr(other, attribute))


def index_derived(model) -> list:
    """'attribute' names that change in some block when an earlier block is skipped: settings the code
    derives from a block's index, beyond its layer_idx (empty for most models)."""
    if num_blocks(model) < 3:
        return []
    saved = _set_block_list(model, [i for i in range(num_blocks(model)) if i != 1])
    try:
        return sorted({attribute for _, attribute, _ in saved["rederived"]})
    finally:
        _restore(saved)


def _renumber(blocks) -> list:
    """Set every `layer_idx` inside block i to i (the KV cache is indexed by it); return the old ones."""
    old = []
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                old.append((module, "layer_idx", module.layer_idx))
                module.layer_idx = position
    return old


def block_kinds(model):
    """Each block's kind (layout.block_kinds of its config), or None where all blocks are alike."""
    config = layout.depth_config(model.config)
    return layout.block_kinds(config, num_blocks(model))


def check_keeps_every_kind(removal_list, kinds, what: str = "--removal_list") -> None:
    """A hybrid model's cache is built per kind of block (stock transformers' hybrid caches need an
    attention block, for one): a removal may not take every block of a kind."""
    if not kinds:
        return
    removed = set(removal_list)
    left = {kinds[i] for i in range(len(kinds)) if i not in removed}
    gone = [kind for kind in dict.fromkeys(kinds) if kind is not None and kind not in left]
    if gone:
        raise UsageError(f"{what} removes every {gone[0]!r} block (blocks "
                         f"{[i for i, kind in enumerate(kinds) if kind == gone[0]]}); the pruned model could not "
                         "build its cache to generate; keep one, or pass --keep_block_kinds False")


def keeps_every_kind(removal_list, kinds) -> bool:
    try:
        check_keeps_every_kind(removal_list, kinds)
    except UsageError:
        return False
    return True


def default_remove_count(depth: int) -> int:
    """The paper's default share: 20% of the blocks, rounded up."""
    return math.ceil(0.2 * depth)


def check_removal_list(value, depth: int = None, what: str = "--removal_list") -> list:
    """The one validator of removal lists: parse what a user typed, then, once the depth is known,
    check for distinct indices in 0..depth-1 that leave at least one block.

    fire turns '[5, 4]' into a list; a JSON string ('[5, 4]'), a comma string ('5,4') or a single
    index also work; [] is the dense model.
    """
    usage = f"{what} must be a list of block indices such as '[5, 4, 9]', got {value!r}"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            raise UsageError(usage) from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise UsageError(usage)
    indices = list(value)
    if depth is None:
        return indices
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise UsageError(f"{what} has index {bad[0]} but the model has blocks 0..{depth - 1}")
    if len(set(indices)) != len(indices):
        duplicate = next(i for i in indices if indices.count(i) > 1)
        raise UsageError(f"{what} names block {duplicate} twice; list each block once")
    if len(indices) >= depth:
        raise UsageError(f"{what} removes all {depth} blocks; at least one must stay")
    return indices


def remove_blocks(model, removal_list) -> None:
    """Delete the blocks (original indices) for good, leaving a normal checkpoint."""
    removal = set(check_removal_list(removal_list, num_blocks(model)))
    keep = [i for i in range(num_blocks(model)) if i not in removal]
    known = origin(model)
    _set_block_list(model, keep)
    known.kept = [known.kept[i] for i in keep]
    if removal:
        _rederive_outside_blocks(model)
    if removal:
        from sleb import serving

        serving.align(model.config)  # the fields serving engines read, where a value says the new layout


@contextlib.contextmanager
def skipping(model, skipped):
    """Within the block, the model runs as if blocks `skipped` were deleted; afterwards it is whole again."""
    skipped = set(skipped)
    if not skipped:
        yield model
        return
    saved = _set_block_list(model, [i for i in range(num_blocks(model)) if i not in skipped])
    try:
        yield model
    finally:
        _restore(saved)


def _restore(saved: dict) -> None:
    parent, attribute = saved["owner"]
    setattr(parent, attribute, saved["blocks"])
    for module, name, value in reversed(saved["changed"] + saved["rederived"]):
        setattr(module, name, value)
    saved["layout"].restore()
