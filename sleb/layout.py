"""What ties a config to block indices, declared in one table, and how to carry it through a deletion.

A config says which block is which in four ways: a list with one entry per block (`layer_types`,
`layers_block_type`, `no_rope_layers`), a list of indices (`mlp_only_layers`, `moe_layers`,
`full_attn_idxs`, `attn_layer_indices`), a rule (`decoder_sparse_step`, `first_k_dense_replace`, a
period and an offset, a start/end/interval) or a layout string (`hybrid_override_pattern`). Each
entry of LAYOUT reads the config into one value per block, and writes a list of per-block values
back in a form the architecture's own config accepts. Deleting blocks is then: read every entry,
keep the surviving blocks' values, write.

A rule that cannot express the surviving layout (Jamba's periods after an irregular deletion) is
left as it was: the model in memory is right, and the reload guard (sleb/checkpoint.py) refuses to
save a checkpoint whose config would rebuild another model, naming the fields listed here.
"""

from dataclasses import dataclass
from typing import Callable

from sleb.rebuild import PLAIN_SCALARS

# Per-block lists known by name. Any other list of plain values as long as the depth is treated the
# same way, for architectures not met yet.
PER_BLOCK_LISTS = ("layer_types", "layers_block_type", "no_rope_layers", "mlp_layer_types", "layers_num_experts",
                   "sliding_window_layers", "attention_types")
INDEX_LISTS = ("moe_layers", "full_attn_idxs", "mlp_only_layers", "attn_layer_indices")
LAYOUT_STRINGS = ("hybrid_override_pattern",)
# transformers 5's heterogeneous configs: {block index: {field: value}} overrides (Gemma 4's head sizes).
PER_LAYER_OVERRIDES = "per_layer_config"


class Inexpressible(Exception):
    """The config cannot describe this layout."""


@dataclass(frozen=True)
class Entry:
    """One way a config ties structure to block index."""

    fields: tuple  # the config fields it reads and writes
    read: Callable  # (config, depth) -> one value per block
    write: Callable  # (config, values) -> None, or raise Inexpressible


def _per_block_list(name):
    return Entry((name,), lambda c, depth: list(getattr(c, name)),
                 lambda c, values: setattr(c, name, type(getattr(c, name))(values)))


def _index_list(name):
    return Entry((name,), lambda c, depth: [i in getattr(c, name) for i in range(depth)],
                 lambda c, values: setattr(c, name, [i for i, chosen in enumerate(values) if chosen]))


def _overrides(config):
    """A heterogeneous config's per-block overrides as a dict by index; None for a homogeneous config (whose
    `per_layer_config` property is a view of the config itself)."""
    import copy

    spec = config.__dict__.get("_heterogeneity_spec")
    return copy.deepcopy(spec.per_layer_overrides) if spec is not None else None


def _value(config, name: str):
    return _overrides(config) if name == PER_LAYER_OVERRIDES else getattr(config, name, None)


def _layout_string(name):
    return Entry((name,), lambda c, depth: list(getattr(c, name)), lambda c, values: setattr(c, name, "".join(values)))


def _write_sparse_step(config, sparse: list) -> None:
    # Qwen-MoE: block i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    # Step 1 with the dense blocks listed is the explicit form of any layout.
    config.decoder_sparse_step = 1
    config.mlp_only_layers = [i for i, is_sparse in enumerate(sparse) if not is_sparse]


def _write_first_k_dense(config, moe: list) -> None:
    # DeepSeek-V3, GLM-4.5: blocks from first_k_dense_replace on are MoE. Deletion keeps a prefix a prefix.
    k = moe.index(True) if True in moe else len(moe)
    if moe != [i >= k for i in range(len(moe))]:
        raise Inexpressible
    config.first_k_dense_replace = k


def _period_entry(period: str, offset: str) -> Entry:
    """Jamba: block i is special iff i % period == offset."""

    def write(config, chosen: list) -> None:
        depth = len(chosen)
        for p in range(1, depth + 2):  # p = depth + 1 with offset depth expresses "none"
            for o in range(p):
                if chosen == [i % p == o for i in range(depth)]:
                    setattr(config, period, p)
                    setattr(config, offset, o)
                    return
        raise Inexpressible

    return Entry((period, offset), lambda c, depth: [i % getattr(c, period) == getattr(c, offset) for i in range(depth)],
                 write)


def _interval_entry(start: str, end: str, interval: str) -> Entry:
    """ERNIE 4.5 MoE: block i is MoE iff (i + 1) % interval == 0 and start <= i <= end."""

    def read(config, depth):
        return [(i + 1) % getattr(config, interval) == 0 and getattr(config, start) <= i <= getattr(config, end)
                for i in range(depth)]

    def write(config, chosen: list) -> None:
        depth = len(chosen)
        moe = [i for i, is_moe in enumerate(chosen) if is_moe]
        if not moe:
            setattr(config, start, depth)
            setattr(config, end, depth - 1)
            return
        for step in range(1, depth + 1):
            if moe == [i for i in range(moe[0], moe[-1] + 1) if (i + 1) % step == 0]:
                setattr(config, interval, step)
                setattr(config, start, moe[0])
                setattr(config, end, moe[-1])
                return
        raise Inexpressible

    return Entry((start, end, interval), read, write)


LAYOUT = (
    [_per_block_list(name) for name in PER_BLOCK_LISTS]
    + [Entry(("decoder_sparse_step", "mlp_only_layers"),
             lambda c, depth: [i not in c.mlp_only_layers and (i + 1) % c.decoder_sparse_step == 0
                               for i in range(depth)],
             _write_sparse_step)]
    + [_index_list(name) for name in INDEX_LISTS]
    + [Entry(("first_k_dense_replace",), lambda c, depth: [i >= c.first_k_dense_replace for i in range(depth)],
             _write_first_k_dense),
       _period_entry("attn_layer_period", "attn_layer_offset"),
       _period_entry("expert_layer_period", "expert_layer_offset"),
       _interval_entry("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")]
    + [_layout_string(name) for name in LAYOUT_STRINGS]
    + [Entry((PER_LAYER_OVERRIDES,), lambda c, depth: [_overrides(c).get(i, {}) for i in range(depth)],
             lambda c, values: setattr(c, PER_LAYER_OVERRIDES, {i: v for i, v in enumerate(values) if v}))]
)


def _settable(config, name: str) -> bool:
    """A plain attribute (Jamba's layers_block_type, say, is a property derived from its periods; Bamba's
    layer_types is another name, through attribute_map, for such a property)."""
    name = getattr(config, "attribute_map", {}).get(name, name)
    attribute = getattr(type(config), name, None)
    return not isinstance(attribute, property) or attribute.fset is not None


def entries(config, depth: int) -> list:
    """The LAYOUT entries this config uses, then any unknown "*layer*" list as long as the depth."""
    found, claimed = [], set()
    for entry in LAYOUT:
        if any(name in claimed for name in entry.fields):
            continue  # mlp_only_layers belongs to the sparse-step rule when that rule is there
        values = [_value(config, name) for name in entry.fields]
        if any(value is None for value in values) or not all(_settable(config, n) for n in entry.fields):
            continue
        if entry.fields[0] in PER_BLOCK_LISTS + LAYOUT_STRINGS and len(values[0]) != depth:
            continue
        found.append(entry)
        claimed.update(entry.fields)
    for name, value in vars(config).items():
        if (name not in claimed and _per_block_values(name, value, depth) and _settable(config, name)):
            found.append(_per_block_list(name))
    return found


def _per_block_values(name: str, value, depth: int) -> bool:
    """A list of plain values as long as the depth, whatever its name (a per-block top-k or FFN width
    as much as a *_layer_types list); token ids are not per block. Carried as a per-block list: where
    that guess is wrong and it matters, the reload guard sees the rebuilt model differ."""
    return (isinstance(value, (list, tuple)) and len(value) == depth and not name.startswith("_")
            and "token_id" not in name and all(isinstance(item, PLAIN_SCALARS) for item in value))


def structure_fields(config, depth: int) -> list:
    """Names of the fields through which this config ties structure to block index."""
    return [name for entry in entries(config, depth) for name in entry.fields]


def depth_config(config):
    """The (sub)config that declares the decoder depth: the text config of a vision-language model."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class Snapshot:
    """A config's layout fields before a deletion, to put back after a temporary skip."""

    config: object
    values: dict

    def restore(self) -> None:
        for name, value in self.values.items():
            setattr(self.config, name, value)


def keep_blocks(config, keep: list) -> Snapshot:
    """Rewrite `config` (the one that declares the depth) for a model that keeps only the blocks at
    original positions `keep`, in order. Returns what restores it. Rules that cannot express the new
    layout stay as they were (see the module docstring)."""
    depth = config.num_hidden_layers
    found = entries(config, depth)
    names = ["num_hidden_layers"] + [name for entry in found for name in entry.fields]
    snapshot = Snapshot(config, {name: _value(config, name) for name in names})
    per_block = [(entry, entry.read(config, depth)) for entry in found]
    config.num_hidden_layers = len(keep)  # Nemotron-H ignores this and derives it from its layer list
    for entry, values in per_block:
        try:
            entry.write(config, [values[i] for i in keep])
        except Inexpressible:
            for name in entry.fields:
                setattr(config, name, snapshot.values[name])
    return snapshot


# Per-block kind lists, in the order they are read: what kind of mixer (attention, Mamba, convolution,
# linear attention) or cache slot each block is.
KIND_FIELDS = ("layers_block_type", "layer_types", "hybrid_override_pattern")


# Kinds that hold no cache (feed-forward-only blocks: "mlp", "moe", and "-" / "E" in a layout string).
CACHE_FREE_KINDS = ("mlp", "moe", "-", "E")


def block_kinds(config, depth: int):
    """Each block's kind from the config's per-block type list, None for a kind that holds no cache;
    None altogether where every block that holds a cache is of one kind."""
    for name in KIND_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple, str)) and len(value) == depth:
            kinds = [None if kind in CACHE_FREE_KINDS else kind for kind in value]
            return kinds if len(set(kinds) - {None}) > 1 else None
    return None


def describe(config) -> str:
    """'jamba (attn_layer_period, attn_layer_offset, ...)' for messages."""
    fields = structure_fields(config, config.num_hidden_layers)
    return f"{config.model_type} ({', '.join(fields) if fields else 'no field sleb knows ties blocks to their index'})"
