"""Training-free recovery: for each run of removed blocks, a least-squares map folded into the block
in front of it (ReplaceMe, arXiv 2505.02819; Prune&Comp, arXiv 2507.18212).

For a maximal run `a..b` of removed blocks (original indices) with kept block `l = a - 1` before it,
on the model as it stands (earlier runs already compensated and skipped, which is the same model as
deleted), every calibration token gives
    M = what block l's last sub-layer adds to the residual stream (a Llama block's MLP output),
    Y = the residual stream it is added to (block l's output minus M),
    H = block b's output (the residual stream after the run),
and the map is T = argmin ||M T - (H - Y)||^2 + ridge ||T||^2, solved in float64 from the accumulated
MᵀM and Mᵀ(H - Y) (hidden x hidden each; tokens are never kept). With the run deleted, block l then
outputs Y + M T, which is what the run would have made of it as nearly as a linear map can. T is
folded into the weights that produce M (a projection's W <- Tᵀ W, b <- Tᵀ b; every expert's and the
shared expert's output projection in an MoE block, fused 3-D expert tensors included; a Mamba or
convolution mixer's output projection), so the pruned model has exactly plain removal's parameters.

What is folded is found by observation, not by the architecture's name, and proven on a probe before
anything changes: block l's output must move by exactly M when M is doubled (else a norm or a
post-norm stands between the sub-layer and the residual add), and the sub-layer with a random map
folded in must output its old output times that map. A block where either fails, a run starting at
block 0, or weights the fold would change that are shared with another module (tied embeddings,
blocks sharing weights) is refused in one line.
"""

import contextlib
import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from sleb import blocks, forward
from sleb.errors import UsageError
from sleb.models import input_device

# Probe tokens for the exactness checks, and their tolerance (relative, in the model's dtype).
PROBE_TOKENS = 16
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 2e-2


@dataclass
class RunFit:
    """One removed run's map: how well it fits and where it went."""

    run: list  # original indices a..b of the removed blocks
    before: int  # original index l of the block the map is folded into
    tokens: int  # calibration tokens the fit saw
    residual: float  # ||M T - (H - Y)|| / ||H - Y||
    identity_residual: float  # the same for T = I, i.e. plain removal
    seconds: float
    folded_into: list  # parameters of block l the map went into

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    """A parameter the map is folded into, and how: 'rows' W <- Tᵀ W on the dimension `dim` that is
    the output (Linear weights, (experts, hidden, in) tensors), 'columns' W <- W T on the last
    dimension (Conv1D weights, (experts, in, hidden) tensors, biases)."""

    name: str
    parameter: nn.Parameter
    how: str  # "rows" or "columns"


def runs_of(removal_list: list) -> list:
    """Maximal runs of consecutive indices, in depth order: [7, 3, 4] -> [[3, 4], [7]]."""
    runs = []
    for index in sorted(removal_list):
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def fold(target: Target, T: torch.Tensor) -> None:
    """Fold the map into one parameter in place (computed in float64, stored in its own dtype)."""
    W = target.parameter.data
    T = T.to(W.device, torch.float64)
    if target.how == "rows":  # the output dimension is the second to last: W <- Tᵀ W
        folded = torch.matmul(T.transpose(0, 1), W.double())
    else:  # the output dimension is the last: W <- W T
        folded = torch.matmul(W.double(), T)
    W.copy_(folded.to(W.dtype))


def _tolerance(dtype) -> float:
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def _close(a: torch.Tensor, b: torch.Tensor, dtype) -> bool:
    scale = b.double().norm().item() or 1.0
    return (a.double() - b.double()).norm().item() <= _tolerance(dtype) * scale


def _hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def _candidates(sublayer: nn.Module, hidden: int) -> list:
    """(name, parameter, allowed ways) of every weight that may produce the sub-layer's output: 2-D
    weights with a hidden-sized output side, fused 3-D expert tensors, hidden-sized biases."""
    from transformers.pytorch_utils import Conv1D

    found = []
    for module_name, module in sublayer.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Linear):
            if module.out_features == hidden:
                found.append((prefix + "weight", module.weight, ("rows", None)))
                if module.bias is not None:
                    found.append((prefix + "bias", module.bias, ("columns", None)))
            continue
        if isinstance(module, Conv1D):
            if module.weight.shape[1] == hidden:
                found.append((prefix + "weight", module.weight, ("columns", None)))
                found.append((prefix + "bias", module.bias, ("columns", None)))
            continue
        for name, parameter in module.named_parameters(recurse=False):
            ways = []
            if parameter.dim() == 3:
                ways = (["rows"] if parameter.shape[1] == hidden else []) + \
                       (["columns"] if parameter.shape[2] == hidden else [])
            elif parameter.dim() == 2 and "bias" in name and parameter.shape[1] == hidden:
                ways = ["columns"]
            if ways:
                found.append((prefix + name, parameter, (*ways, None)))
    return found


@dataclass
class Sublayer:
    """Block l's last sub-layer: where M comes from and the parameters a map is folded into."""

    block_index: int  # in the model as it stands
    module: nn.Module
    name: str
    targets: list


def _hands_on(seen, name: str) -> bool:
    """The module's last call handed its input on unchanged (a dropout in eval mode, an identity)."""
    args, kwargs = seen.inputs.get(name, ((), {}))
    given = forward.hidden_of(args, kwargs) if args or kwargs else None
    out = seen.outputs[name]
    return isinstance(given, torch.Tensor) and given.shape == out.shape and torch.equal(given, out)


def _exact_copy(block: nn.Module, call):
    """(copy of the block, its call, dtype) in float64 for the proofs (half precision would round them away),
    else float32 where a kernel refuses float64, else the block itself."""
    for dtype in (torch.float64, torch.float32):
        try:
            copied = copy.deepcopy(block).to(dtype)
            converted = _as_dtype(call, dtype)
            copied(*converted[0], **converted[1])
            return copied, converted, dtype
        except Exception:  # a kernel without this dtype, or a block whose weights a hook holds elsewhere
            continue
    return block, call, next(block.parameters()).dtype


def last_sublayer(model, block_index: int, probe: torch.Tensor, label: str) -> Sublayer:
    """Find, and prove on the probe, what block `block_index` adds last and where a map folds in. Each
    refusal names its own cause: a norm after the sub-layer, a residual multiplier, an in-place add, weights
    held elsewhere (offloaded), shared weights."""
    block = blocks.get_blocks(model)[block_index]
    cls = type(block).__name__
    offloaded = [name for name, parameter in block.named_parameters() if parameter.is_meta]
    if offloaded:
        raise UsageError(f"--compensate linear: the weights of {cls} (block {label}) are offloaded ({offloaded[0]} "
                         "is on the meta device until the block runs), so no map can be folded into them; give the "
                         "model devices that hold that block (a larger --max_memory); no blocks removed")
    children = dict(block.named_children())
    watched = {**children, "__block__": block}
    seen = forward.observe(model, probe, watched, stop_after=block, keep_inputs=True)
    out = seen.outputs["__block__"]
    # The residual stream's values, perhaps flattened to (tokens, hidden) as OPT's MLP holds them; modules
    # that hand their input on (dropout in eval mode) stand between a sub-layer and the add, and are passed.
    order = [name for name in seen.finished if name != "__block__" and isinstance(seen.outputs[name], torch.Tensor)
             and seen.outputs[name].shape[-1] == out.shape[-1] and seen.outputs[name].numel() == out.numel()]
    while order and _hands_on(seen, order[-1]):
        order.pop()
    if not order:
        raise UsageError(f"--compensate linear: no sub-layer of {cls} (block {label}) outputs the residual "
                         "stream's shape; the map has nowhere to go")
    name = order[-1]
    sublayer = children[name]
    if "Norm" in type(sublayer).__name__:
        raise UsageError(f"--compensate linear: {cls} (block {label}) applies a norm ({name}) between its last "
                         "sub-layer and the residual add, so a folded map would not be exact; no blocks removed")
    checked, call, dtype = _exact_copy(block, seen.inputs["__block__"])
    part = dict(checked.named_children())[name]
    kept = []
    out, first = forward.observe_call(checked, *call, {name: part}, keep_inputs=True,
                                      replace={name: lambda m: kept.append(m.clone()) or m})
    M = first.outputs[name]
    if not torch.equal(kept[0], M):  # the block changed M after the sub-layer returned it
        raise UsageError(f"--compensate linear: {cls} (block {label}) adds to its last sub-layer's output ({name}) in "
                         "place, so what reaches the stream is not the sub-layer's own output and a folded map would "
                         "not be exact; no blocks removed")
    # Doubling M must move the block's output by exactly M: nothing (a norm, a multiplier) stands after it.
    doubled, _ = forward.observe_call(checked, *call, {name: part}, replace={name: lambda m: 2 * m})
    moved, M = (doubled - out).double(), M.reshape(out.shape).double()
    if not _close(moved, M, dtype):
        scale = float((moved * M).sum() / (M * M).sum().clamp_min(1e-300))
        if abs(scale - 1) > 1e-3 and _close(moved, scale * M, dtype):
            raise UsageError(f"--compensate linear: {cls} (block {label}) scales its last sub-layer's output ({name}) "
                             f"by {scale:.4g} before adding it (a residual multiplier), so the fit's M is not what "
                             "the stream receives; no blocks removed")
        raise UsageError(f"--compensate linear: {cls} (block {label}) does not add its last sub-layer ({name}) to "
                         "the residual stream as it is (a norm or another non-linear step after it, or post-norm); "
                         "a folded map would not be exact; no blocks removed")
    where = f"{cls}.{name} (block {label})"
    proven = _proven_targets(part, first.inputs[name], first.outputs[name], dtype, where)
    real = dict(sublayer.named_parameters())
    targets = [Target(target.name, real[target.name], target.how) for target in proven]
    _check_not_shared(model, targets, where)
    return Sublayer(block_index, sublayer, name, targets)


def _as_dtype(value, dtype):
    """Floating tensors (hidden states, position embeddings, additive masks) in `dtype`, the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_dtype(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _as_dtype(item, dtype) for key, item in value.items()}
    return value


def _proven_targets(sublayer: nn.Module, call, M: torch.Tensor, dtype, where: str) -> list:
    """The parameters whose fold maps the sub-layer's output to output x T, tried on its probe input
    with a random T; the first assignment (all folded before fewer) that holds is kept."""
    args, kwargs = call
    hidden = M.shape[-1]
    candidates = _candidates(sublayer, hidden)
    if not candidates or len(candidates) > 12:
        raise UsageError(f"--compensate linear: cannot tell which weights of {where} produce its output "
                         f"({len(candidates)} candidates); no blocks removed")
    generator = torch.Generator().manual_seed(0)
    T = torch.eye(hidden, dtype=torch.float64) + torch.randn(hidden, hidden, generator=generator,
                                                             dtype=torch.float64) / math.sqrt(hidden)
    expected = M.double() @ T.to(M.device)
    saved = [parameter.data.clone() for _, parameter, _ in candidates]
    try:
        for ways in itertools.product(*(allowed for _, _, allowed in candidates)):
            chosen = [Target(name, parameter, how) for (name, parameter, _), how in zip(candidates, ways) if how]
            if not chosen:
                continue
            for target in chosen:
                fold(target, T)
            with torch.inference_mode():
                output = forward.output_of(sublayer(*args, **kwargs))
            for (_, parameter, _), original in zip(candidates, saved):
                parameter.data.copy_(original)
            if _close(output, expected, dtype):
                return chosen
    finally:
        for (_, parameter, _), original in zip(candidates, saved):
            parameter.data.copy_(original)
    raise UsageError(f"--compensate linear: no weights of {where} carry a folded map exactly (its output is not "
                     "a linear image of weights sleb can find); no blocks removed")


def _check_not_shared(model, targets: list, where: str) -> None:
    mine = {id(target.parameter) for target in targets}
    uses = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in mine:
            uses.setdefault(id(parameter), []).append(name)
    for target in targets:
        if len(uses.get(id(target.parameter), [])) > 1:
            names = ", ".join(uses[id(target.parameter)])
            raise UsageError(f"--compensate linear: {where}.{target.name} is shared ({names}); folding a map into "
                             "it would change the other uses; no blocks removed")


class Normal:
    """Running MᵀM, MᵀD, ||D||² and ||M - D||² in float64 on block l's device (D = H - Y = H - (O - M), formed
    in float64 from the stored tensors, each first moved to that device: a model split over GPUs keeps
    block l and the run's last block apart). Memory: 2 x hidden² float64 (2 x 128 MiB at hidden 4096)."""

    def __init__(self, hidden: int, device):
        self.gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.cross = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.target_sq = 0.0
        self.identity_sq = 0.0
        self.tokens = 0

    @staticmethod
    def bytes(hidden: int) -> int:
        return 2 * hidden * hidden * 8

    def add(self, M: torch.Tensor, O: torch.Tensor, H: torch.Tensor) -> None:
        """One batch: M (what block l adds last), O (block l's output), H (the run's output)."""
        as64 = lambda t: t.reshape(-1, t.shape[-1]).to(self.gram.device, torch.float64)  # noqa: E731
        M, O, H = as64(M), as64(O), as64(H)
        D = H - (O - M)
        self.gram.addmm_(M.T, M)
        self.cross.addmm_(M.T, D)
        self.target_sq += D.pow(2).sum().item()
        self.identity_sq += (M - D).pow(2).sum().item()
        self.tokens += M.shape[0]

    def solve(self, ridge: float) -> Optional[torch.Tensor]:
        """T = argmin ||M T - D||² + ridge ||T - I||², from (MᵀM + ridge I) T = MᵀD + ridge I, solved, not
        inverted: the ridge shrinks T toward the identity (plain removal), never toward 0 (which would also
        delete block l's own sub-layer). A singular system (fewer tokens than dimensions, ridge 0) takes the
        least-norm solution; a map that is not finite is None (the run cannot be compensated)."""
        eye = torch.eye(len(self.gram), dtype=torch.float64, device=self.gram.device)
        system, right = self.gram + ridge * eye, self.cross + ridge * eye
        if ridge > 0 or self.tokens >= len(self.gram):
            solution, info = torch.linalg.solve_ex(system, right)
            if info.item() == 0 and torch.isfinite(solution).all():
                return solution
        solution = torch.linalg.lstsq(system.cpu(), right.cpu(), driver="gelsd").solution.to(self.gram.device)
        return solution if torch.isfinite(solution).all() else None

    def identity_residual(self) -> float:
        """The relative residual of T = I: plain removal."""
        return math.sqrt(self.identity_sq / self.target_sq) if self.target_sq else 0.0

    def residual(self, T: torch.Tensor) -> float:
        """||M T - D|| / ||D|| from the accumulated sums alone."""
        fitted = (T * (self.gram @ T)).sum() - 2 * (T * self.cross).sum() + self.target_sq
        return math.sqrt(max(fitted.item(), 0.0) / self.target_sq) if self.target_sq else 0.0


def check(ridge: float, removal_list: list, depth: int) -> list:
    """The runs to compensate, after the checks that need no forward (bad input fails here)."""
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge < 0:
        raise UsageError(f"--ridge must be a number >= 0, got {ridge!r}")
    removal_list = blocks.check_removal_list(removal_list, depth)
    runs = runs_of(removal_list)
    if runs and runs[0][0] == 0:
        raise UsageError(f"--compensate linear: the removed run {runs[0]} starts at block 0, so no block before "
                         "it can carry its map; keep block 0 or drop --compensate")
    return runs


def normal_equations(model, windows: torch.Tensor, sublayer: Sublayer, last_index: int, batch_size: int = 4,
                     progress: bool = True, desc: str = "compensate") -> Normal:
    """Stream the windows through the model as it stands up to block `last_index` (in its current
    list) and accumulate the sums for the sub-layer's M against that block's output."""
    return normal_equations_for_runs(model, windows, {last_index: sublayer}, batch_size, progress, desc)[last_index]


def normal_equations_for_runs(model, windows: torch.Tensor, sublayers: dict, batch_size: int = 4,
                              progress: bool = True, desc: str = "statistics") -> dict:
    """{last: sums} for each run that ends at block `last` of the model as it stands, its map going into
    `sublayers[last]` (whose block_index is the block before the run): one streaming pass for all, stopped
    after the deepest block any of them needs."""
    block_list = blocks.get_blocks(model)
    watched = {last: (sublayer.module, block_list[sublayer.block_index], block_list[last])
               for last, sublayer in sublayers.items()}
    device = input_device(model)
    with torch.inference_mode(), recording(watched) as normals:
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=not progress):
            forward.observe(model, windows[start:start + batch_size].to(device), {},
                            stop_after=block_list[max(sublayers)])
    return normals


@contextlib.contextmanager
def recording(watched: dict):
    """{key: Normal}, filled while open by every forward that runs the modules of
    `watched` ({key: (block l's sub-layer, block l, the run's last block)}), whichever code drives it
    (a streaming pass, or the fast engine walking its cached states): M and O of a batch are held until
    the run's last block has run on the same batch."""
    normals, held, handles = {}, {}, []

    def hook(key, role):
        def after(module, args, out):
            held[(key, role)] = forward.output_of(out)
            if role == "H":
                O = held.pop((key, "O"))
                M = held.pop((key, "M")).reshape(O.shape)
                if key not in normals:
                    normals[key] = Normal(M.shape[-1], M.device)
                normals[key].add(M, O, held.pop((key, "H")))
        return after

    for key, modules in watched.items():
        for role, module in zip("MOH", modules):
            handles.append(module.register_forward_hook(hook(key, role)))
    try:
        yield normals
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def folded(targets: list, T: torch.Tensor):
    """The map folded into `targets` for the duration, the weights put back exactly after."""
    saved = [target.parameter.data.clone() for target in targets]
    try:
        with torch.no_grad():
            for target in targets:
                fold(target, T)
        yield
    finally:
        for target, original in zip(targets, saved):
            target.parameter.data.copy_(original)


def record_change(model, run: list, before: int) -> None:
    """The model's origin notes what its weights now hold: a map for `run` in block `before` (indices of
    the model as it stands, recorded as the original ones). A map already in a block of the run is gone
    with the block, and this map stands for both."""
    kept = blocks.origin(model).kept
    run, before = [kept[i] for i in run], kept[before]
    changes = blocks.origin(model).weights_changed
    merged = sorted(set(run).union(*[change["run"] for change in changes if change["into"] in run]))
    changes[:] = [change for change in changes if change["into"] not in run]
    changes.append({"map": "linear", "run": merged, "into": before})


def compensate(model, windows: torch.Tensor, removal_list: list, ridge: float = 0.0, batch_size: int = 4,
               progress: bool = True) -> list:
    """Fit, fold and delete: afterwards the model is what `blocks.remove_blocks` leaves, with each
    run's map folded into the block before it. Returns one RunFit per run, in depth order. If any run
    fails (a map that is not finite), every weight is put back and nothing is removed."""
    depth = blocks.num_blocks(model)
    runs = check(ridge, removal_list, depth)
    probe = windows[:1, :PROBE_TOKENS].to(input_device(model))
    with torch.inference_mode():
        sublayers = [last_sublayer(model, run[0] - 1, probe, str(run[0] - 1)) for run in runs]  # all proven first
    originals = [(target.parameter, target.parameter.data.clone()) for sublayer in sublayers
                 for target in sublayer.targets]
    fits, done = [], []
    try:
        for run, sublayer in zip(runs, sublayers):
            started = time.perf_counter()
            with blocks.skipping(model, done):
                alive = [i for i in range(depth) if i not in set(done)]
                sublayer.block_index = alive.index(run[0] - 1)
                normal = normal_equations(model, windows, sublayer, alive.index(run[-1]), batch_size, progress,
                                          desc=f"compensate {run[0]}..{run[-1]}")
            T = normal.solve(ridge)
            if T is None:
                raise UsageError(f"--compensate linear: the map for blocks {run} is not finite (the statistics "
                                 "overflowed: try --dtype float32 or a --ridge above 0); the model is unchanged")
            with torch.no_grad():
                for target in sublayer.targets:
                    fold(target, T)
            done += run
            fits.append(RunFit(run, run[0] - 1, normal.tokens, normal.residual(T), normal.identity_residual(),
                               round(time.perf_counter() - started, 3),
                               [f"{sublayer.name}.{target.name}" for target in sublayer.targets]))
            del normal
    except BaseException:
        with torch.no_grad():
            for parameter, original in originals:
                parameter.data.copy_(original)
        raise
    for fit in fits:
        record_change(model, fit.run, fit.before)
    blocks.remove_blocks(model, sorted(removal_list))
    return fits
