"""The saved model computes what was scored, or one line says why not.

Many families read config fields at run time (the mask kind of block i from `layer_types[i]`,
Mistral's model-wide `sliding_window`, Llama 4's chunked attention), so module state alone proves
nothing: outputs do. Before a checkpoint is written, two models are rebuilt on the meta device and
given the very tensors the model holds (assigned, no second copy of the weights; unsaved buffers
built from their own config; accelerate's hooks copied):

- the reference, the model as scored: rebuilt from the config taken at load (full depth), the kept
  blocks' tensors at their original indices, the removed blocks passed over (their input handed on
  unchanged), which is the model the fast engine scores. Where blocks derive settings from their
  index (GPT-2's inverse-index scaling), the removed blocks are skipped as the reference engine skips
  them, which renumbers the kept ones: that is the model those families are scored as.
- the candidate: the model `from_pretrained` builds from the config about to be written.

Both run on a probe longer than every window, chunk and period the config names; every kept block's
output and the logits must agree within a stated tolerance. Because both hold the current tensors,
weights changed after removal (compensation, a merged LoRA, a user's edit) pass; a config that reads
otherwise does not. Before the outputs, the candidate's tensors (names, shapes) and module state
(tree, classes, plain settings, unsaved buffers, weight sharing) are compared, which names the
attribute where they differ; after them, the candidate generates with and without its KV cache.
Every refusal, and every unexpected failure of these checks, is one line.
"""

import copy
import inspect
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from sleb import blocks, forward, layout, models, rebuild, serving
from sleb.errors import UsageError, first_line

# Small models are rebuilt for real (with random weights) where the meta device cannot build them.
REAL_REBUILD_PARAMETERS = 200_000_000
PROBE_MIN_TOKENS = 32
PROBE_BEYOND = 8  # probe tokens past the longest window, chunk or period the config names
PROBE_LOGITS = 64  # positions whose logits are compared (every block output is compared at every position)
FINGERPRINT_WIDTH = 8  # each block output is kept as output @ R, R a fixed random (hidden x 8) matrix
# Largest difference allowed between the two rebuilds, relative to the reference's scale. Both run
# the same tensors through the same kernels, so what is measured is float rounding of a different
# call order at most (0 on every family tested).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
HALF_TOLERANCE = 1e-2
# Config fields that say how a model was saved or loaded, not what it computes.
NOT_BEHAVIOUR = ("_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype", "_commit_hash",
                 "architectures")


@dataclass
class Verdict:
    """What the guard found on a model it let through."""

    warnings: list  # 'config fields changed since load ...' lines (the outputs agree regardless)
    probe_tokens: int
    logit_gap: float  # largest logit difference between the two rebuilds, relative to the logits' scale
    seconds: float


def _saved_form(config):
    """The config exactly as from_pretrained reads it back from the config.json about to be written."""
    from transformers import AutoConfig

    folder = tempfile.mkdtemp(prefix="sleb-config-")
    try:
        config.save_pretrained(folder)
        extras = serving.saved_extras(config)
        if extras:
            add_to_config(os.path.join(folder, "config.json"), extras)
        return AutoConfig.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def add_to_config(path: str, fields: dict) -> None:
    """Write `fields` into a saved config.json (values the config object derives and does not save); a dict
    under a sub-config's key ("text_config") goes into that sub-config."""
    import json

    with open(path) as handle:
        config = json.load(handle)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def _build(model, config):
    """type(model) built from `config` on the meta device, or for real on the CPU for a small model whose
    classes refuse the meta device."""
    try:
        rebuilt = rebuild.on_meta(lambda: type(model)._from_config(config))
    except Exception as error:
        if sum(p.numel() for p in model.parameters()) > REAL_REBUILD_PARAMETERS:
            raise UsageError(f"not saved: {type(model).__name__} cannot be rebuilt from its config on the meta device "
                             f"({first_line(error, 120)}) to check it; no checkpoint written") from None
        print(f"note: {type(model).__name__} rebuilt on the CPU to check it (the meta device refused: "
              f"{first_line(error, 80)})")
        rebuilt = type(model)._from_config(config)
    rebuilt.tie_weights()  # as from_pretrained does after loading
    return rebuilt


def _where(name: str, block_prefix: str) -> str:
    if name.startswith(block_prefix + "."):
        index, _, rest = name[len(block_prefix) + 1:].partition(".")
        return f"block {index}" + (f" ({rest})" if rest else "")
    return name or "the model itself"


def _sharing(module) -> set:
    """Groups of parameter names that are one tensor (tied embeddings, blocks sharing weights)."""
    groups = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {tuple(sorted(names)) for names in groups.values() if len(names) > 1}


def tensor_differences(model, rebuilt) -> list:
    """'NAME (what)' for every tensor that a model rebuilt from the saved config would not load as it is."""
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    differences = [f"{name} (newly initialised)" for name in theirs if name not in ours]
    differences += [f"{name} (left unused)" for name in ours if name not in theirs]
    differences += [f"{name} (shape {ours[name]} saved, {theirs[name]} expected)" for name in ours
                    if name in theirs and ours[name] != theirs[name]]
    return differences


def behaviour_differences(model, rebuilt) -> list:
    """What a model rebuilt from the config about to be written holds differently from `model`, module by
    module: the tree and classes, every plain setting (rebuild.settings), the buffers that are not saved
    (computed from the config, such as RoPE frequencies) and which parameters are one tensor."""
    prefix = blocks.block_path(model)
    ours, theirs = dict(model.named_modules()), dict(rebuilt.named_modules())
    found = [f"{_where(name, prefix)}: a {type(ours[name]).__name__} here, none rebuilt" for name in ours
             if name not in theirs]
    found += [f"{_where(name, prefix)}: none here, a {type(theirs[name]).__name__} rebuilt" for name in theirs
              if name not in ours]
    for name, module in ours.items():
        other = theirs.get(name)
        if other is None:
            continue
        if type(module) is not type(other):
            found.append(f"{_where(name, prefix)}: a {type(module).__name__} here, a {type(other).__name__} rebuilt")
            continue
        for attribute, value, theirs_value in rebuild.setting_differences(module, other):
            found.append(f"{_where(name, prefix)}: {attribute} is {value!r} here, {theirs_value!r} rebuilt")
        for buffer in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            mine, built = module._buffers.get(buffer), other._buffers.get(buffer)
            if mine is None or built is None or built.is_meta or mine.is_meta:
                continue
            if mine.shape != built.shape or not torch.allclose(mine.detach().float().cpu(), built.float().cpu(),
                                                                rtol=1e-5, atol=1e-6):
                found.append(f"{_where(name, prefix)}: the unsaved buffer {buffer} differs from the rebuilt one")
    mine, built = _sharing(model), _sharing(rebuilt)
    found += [f"parameters {', '.join(group)} are one tensor here, not rebuilt" for group in sorted(mine - built)]
    found += [f"parameters {', '.join(group)} are one tensor rebuilt, not here" for group in sorted(built - mine)]
    return found


def _fields(config) -> dict:
    """{field: value} of a config and its sub-configs ('text_config.sliding_window'), behaviour fields only."""
    flat = {}

    def walk(record, prefix):
        for key, value in record.items():
            if key in NOT_BEHAVIOUR:
                continue
            if isinstance(value, dict) and key.endswith("_config") and key != "per_layer_config":
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value
    walk(config.to_dict(), "")
    return flat


def field_changes(before, after) -> list:
    """'FIELD (OLD -> NEW)' for every behaviour field whose value differs between two configs."""
    old, new = _fields(before), _fields(after)
    return [f"{name} ({old.get(name, '<unset>')!r} -> {new.get(name, '<unset>')!r})"
            for name in sorted(set(old) | set(new)) if old.get(name, "<unset>") != new.get(name, "<unset>")]


def _named(changes: list, limit: int = 6) -> str:
    shown = "; ".join(changes[:limit])
    return shown + (f"; and {len(changes) - limit} more" if len(changes) > limit else "") if changes else "none"


def probe_length(config) -> int:
    """Tokens enough to pass every window, chunk or period the config names, capped at the model's positions."""
    text = layout.depth_config(config)
    spans = [value for name, value in vars(text).items() if isinstance(value, int) and not isinstance(value, bool)
             and value > 0 and any(word in name for word in ("window", "chunk", "period", "interval"))]
    return min(models.max_positions(config), max([PROBE_MIN_TOKENS] + [span + PROBE_BEYOND for span in spans]))


def _probe(model, length: int) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(vocab, (1, length), generator=generator)


def _run(model, ids: torch.Tensor, hidden: int):
    """(float32 logits of the last PROBE_LOGITS positions, forward.BlockOutputs) of one probe forward."""
    projection = torch.randn(hidden, FINGERPRINT_WIDTH, generator=torch.Generator().manual_seed(1))
    extra = {"logits_to_keep": PROBE_LOGITS} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with forward.block_outputs(blocks.get_blocks(model), projection) as outputs, torch.inference_mode():
        logits = model(input_ids=ids.to(models.input_device(model)), use_cache=False, **extra).logits
    return logits[:, -PROBE_LOGITS:].float().cpu(), outputs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _tolerance(dtype) -> float:
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def _quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))


def check(model) -> Verdict:
    """The checks described at the top, or one UsageError line. Returns what was found on the way."""
    started = time.perf_counter()
    try:
        return _check(model, started)
    except UsageError:
        raise
    except Exception as error:  # a config or modeling code the checks did not expect
        raise UsageError(f"not saved: checking that the config about to be written rebuilds {type(model).__name__} "
                         f"failed ({type(error).__name__}: {first_line(error, 160)}); no checkpoint written") from None


def _check(model, started: float) -> Verdict:
    cls = type(model).__name__
    saved = _saved_form(model.config)
    fields = layout.describe(layout.depth_config(model.config))
    candidate = _build(model, saved)
    differences = tensor_differences(model, candidate)
    if differences:
        raise UsageError(
            f"not saved: {cls}'s config cannot describe the pruned model: rebuilt from it, {len(differences)} tensors "
            f"differ (e.g. {differences[0]}); the fields that tie blocks to their index in {fields} cannot express "
            "this removal; no checkpoint written")
    differences = behaviour_differences(model, candidate)
    if differences:
        raise UsageError(
            f"not saved: rebuilt from the config about to be written, {cls} would not be this model: {differences[0]}"
            + (f" (and {len(differences) - 1} more)" if len(differences) > 1 else "")
            + f"; the fields that tie blocks to their index in {fields} cannot express it; no checkpoint written")
    known = blocks.origin(model)
    expected = copy.deepcopy(known.config)
    layout.keep_blocks(layout.depth_config(expected), known.kept)
    serving.align(expected)
    changed = field_changes(_saved_form(expected), saved)
    if _quantized(model):
        # bitsandbytes layers exist only after transformers' quantizer has replaced the modules of a model
        # being loaded; a model built from a config has plain Linear layers that cannot hold 4/8-bit weights.
        print(f"note: {cls} is quantized: its module state was compared, not its outputs (a rebuild cannot hold "
              "4- or 8-bit weights)")
        check_generates(model)
        return Verdict(_warnings(changed), 0, 0.0, round(time.perf_counter() - started, 3))

    device = models.input_device(model)
    hidden = model.get_input_embeddings().weight.shape[-1]
    ids = _probe(model, probe_length(saved))
    candidate = rebuild.with_tensors(candidate, model, device)
    candidate.generation_config = copy.deepcopy(model.generation_config)  # saved beside the weights
    candidate_logits, candidate_outputs = _run(candidate, ids, hidden)

    reference_logits, reference_fingerprints = _as_scored(model, known, ids, hidden, device,
                                                          candidate_outputs.tuple_length)
    kept = known.kept
    tolerance = _tolerance(blocks.compute_dtype(model))
    scale = float(reference_logits.abs().max().clamp_min(1.0))
    gap = float((candidate_logits - reference_logits).abs().max()) / scale
    first = None
    for position, original in enumerate(kept):
        mine, theirs = candidate_outputs.fingerprints.get(position), reference_fingerprints.get(original)
        if mine is not None and theirs is not None and _relative(mine, theirs) > tolerance:
            first = (position, original, _relative(mine, theirs))
            break
    if gap > tolerance or first is not None:
        where = (f"block {first[0]} (block {first[1]} of the original) is the first whose output differs (relative "
                 f"{first[2]:.1e})" if first else "every block's output agrees, the head does not")
        raise UsageError(
            f"not saved: rebuilt from the config about to be written, {cls} computes other outputs than the model that "
            f"was scored: on a {ids.shape[1]}-token probe, {where}, and the logits differ by {gap:.2e} of their "
            f"scale (tolerance {tolerance:g}); the configs differ in {_named(field_changes(known.config, saved))}; "
            f"changed since load, not by sleb: {_named(changed)}; no checkpoint written")
    check_generates(candidate)
    return Verdict(_warnings(changed), int(ids.shape[1]), gap, round(time.perf_counter() - started, 3))


def _as_scored(model, known: blocks.Origin, ids: torch.Tensor, hidden: int, device, tuple_length):
    """(logits, {original block index: output fingerprint}) of the reference rebuild: the config at load, the
    kept blocks' tensors at their original indices, the removed ones passed over (or, for blocks that
    derive settings from their index, skipped and the kept ones renumbered)."""
    prefix = blocks.block_path(model) + "."

    def original_name(name: str):
        if not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix):].partition(".")
        return prefix + ".".join(filter(None, (str(known.kept[int(index)]), rest)))

    reference = rebuild.with_tensors(_build(model, copy.deepcopy(known.config)), model, device, original_name)
    if blocks.index_derived(model):  # scored as deleted, the kept blocks renumbered (the reference engine's way)
        with blocks.skipping(reference, known.removed):
            logits, outputs = _run(reference, ids, hidden)
        return logits, {known.kept[j]: value for j, value in outputs.fingerprints.items()}
    reference_blocks = blocks.get_blocks(reference)
    for index in known.removed:
        forward.pass_over(reference_blocks[index], tuple_length)
    logits, outputs = _run(reference, ids, hidden)
    return logits, outputs.fingerprints


def _warnings(changed: list) -> list:
    if not changed:
        return []
    return [f"config fields changed since load, not by sleb's layout rules: {_named(changed)}; the saved model "
            "computes the outputs that were scored all the same"]


def check_removable(model) -> None:
    """One line where sleb cannot remove blocks of this model at all, before any long work: weights outside
    the blocks whose shape follows the depth (Gemma 3n's and Gemma 4's per-layer input embeddings), or a
    forward that fails with a block skipped (Zamba2's shared attention, mapped by block index). Checked
    once per model: a meta rebuild one block shallower and one 8-token forward."""
    if model.__dict__.get("_sleb_removable") or blocks.num_blocks(model) < 3:
        return
    cls, depth = type(model).__name__, blocks.num_blocks(model)
    shallower = copy.deepcopy(model.config)
    layout.keep_blocks(layout.depth_config(shallower), [i for i in range(depth) if i != 1])
    try:
        built = rebuild.on_meta(lambda: type(model)._from_config(shallower))
    except Exception as error:
        raise UsageError(f"cannot remove blocks of {cls}: its config with one block fewer builds no model "
                         f"({type(error).__name__}: {first_line(error, 160)})") from None
    inside = blocks.block_path(model) + "."
    theirs = {name: tuple(t.shape) for name, t in built.state_dict().items() if not name.startswith(inside)}
    for name, tensor in model.state_dict().items():
        if name in theirs and not name.startswith(inside) and tuple(tensor.shape) != theirs[name]:
            raise UsageError(f"cannot remove blocks of {cls}: {name} holds per-block weights outside the blocks (its "
                             f"shape {tuple(tensor.shape)} follows the depth); sleb removes whole blocks only")
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(8, device=models.input_device(model)).unsqueeze(0) % vocab
    try:
        with blocks.skipping(model, [1]), torch.inference_mode(), models.use_cache(model, False):
            model(input_ids=ids, use_cache=False)
    except Exception as error:
        raise UsageError(f"cannot remove blocks of {cls}: with block 1 skipped its forward fails "
                         f"({type(error).__name__}: {first_line(error, 120)}); it ties its blocks to their index in "
                         "a way sleb cannot carry") from None
    model.__dict__["_sleb_removable"] = True


def binding_kinds(model):
    """Each block's kind where the model cannot generate without a block of that kind, None elsewhere;
    None altogether where no kind binds. A hybrid model's cache is built per kind (Nemotron-H cannot
    generate without an attention block); chunked and full attention are both attention (Llama 4). Decided
    by the generate check with every block of the kind skipped, so the cache classes of the family say it."""
    kinds = blocks.block_kinds(model)
    if not kinds:
        return None
    binding = set()
    for kind in dict.fromkeys(kind for kind in kinds if kind is not None):
        of_kind = [i for i, other in enumerate(kinds) if other == kind]
        try:
            with blocks.skipping(model, of_kind):
                check_generates(model)
        except UsageError:
            binding.add(kind)
    return [kind if kind in binding else None for kind in kinds] if binding else None


def check_generates(model) -> None:
    """A short greedy generation with the KV cache and without it: a pruned hybrid model whose cache
    cannot be built (no attention block left) is refused here, not by the user's first generate. In
    float32 both must give the same tokens."""
    import warnings

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(4, device=models.input_device(model)).unsqueeze(0) + 1) % vocab
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    try:
        with torch.inference_mode(), warnings.catch_warnings(), models.use_cache(model, True):
            warnings.simplefilter("ignore")
            cached = model.generate(ids, use_cache=True, **settings)
            uncached = model.generate(ids, use_cache=False, **settings)
    except Exception as error:
        raise UsageError(f"not saved: the pruned {type(model).__name__} cannot generate ({first_line(error, 160)}); "
                         "keep a block of every kind (--keep_block_kinds True); no checkpoint written") from None
    if blocks.compute_dtype(model) == torch.float32 and not torch.equal(cached, uncached):
        raise UsageError(f"not saved: the pruned {type(model).__name__} generates other tokens with its KV cache than "
                         "without it; no checkpoint written")
