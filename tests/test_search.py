"""The SLEB search: the reference engine, the fast engine against it, the baselines, resume."""


import pytest
import torch

from sleb import blocks, data, metrics, search_algorithms
from sleb.engines import ReferenceEngine
from sleb.errors import UsageError
from sleb.fast_search import FastEngine
from sleb.models import load_model
from sleb.search_algorithms import SearchJob, SearchState, candidate_positions
from sleb.settings import SearchSettings


def quiet(*args, **kwargs):
    pass


def run_metric(metric, engine, model, windows, k, early=1, latter=1, seed=0):
    """Run a registered metric on a fresh state, as the pipeline does."""
    job = SearchJob(model, windows, k, early, latter, seed, build_engine=lambda: engine, log=quiet)
    return metrics.get(metric).run(job, SearchState(blocks.num_blocks(model)))


def greedy(engine, model, windows, k):
    return run_metric("sleb", engine, model, windows, k)


@pytest.fixture(scope="module")
def calibration(text_file):
    def make(model_dir, count=6, seqlen=32):
        model, tokenizer = load_model(model_dir, device="cpu")
        windows = data.load_calibration_windows(f"file:{text_file}", tokenizer, nsamples=200, seed=0, seqlen=seqlen)
        return model, windows[:count]
    return make


def _make_identity(block):
    """Zero a Llama block's residual branches: the block then returns its input exactly."""
    torch.nn.init.zeros_(block.self_attn.o_proj.weight)
    torch.nn.init.zeros_(block.mlp.down_proj.weight)


def hand_loss(model_dir, skipped, windows):
    """Delete the blocks from a fresh copy and sum mean cross-entropy x seqlen window by window."""
    model, _ = load_model(model_dir, device="cpu")
    blocks.remove_blocks(model, skipped)
    total = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, window[1:]).item() * len(window)
    return total


def test_reference_loss_is_the_hand_computed_sum(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    engine = ReferenceEngine(model, windows)
    losses = engine.phase([2], candidate_positions(5, 1, 1)).losses
    alive = [0, 1, 3, 4, 5]
    for position, loss in losses.items():
        assert loss == pytest.approx(hand_loss(model_dirs["llama"], [2, alive[position]], windows), rel=1e-5)


def test_identity_block_costs_nothing_and_phases_pick_their_argmin(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    _make_identity(blocks.get_blocks(model)[3])
    engine = ReferenceEngine(model, windows)
    dense = engine.loss([])
    state = greedy(engine, model, windows, 3)
    assert state.scores[0][3] == pytest.approx(dense, rel=1e-6)
    for phase, row in enumerate(state.scores):
        chosen = state.removal_list[phase]
        computed = {block: loss for block, loss in enumerate(row) if loss is not None}
        assert computed[chosen] == min(computed.values())
        alive = [b for b in range(6) if b not in state.removal_list[:phase]]
        assert row[alive[0]] is None and row[alive[-1]] is None  # barriers
    assert 0 not in state.removal_list and 5 not in state.removal_list


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])
def test_fast_engine_equals_reference(arch, model_dirs, calibration):
    model, windows = calibration(model_dirs[arch])
    reference = greedy(ReferenceEngine(model, windows), model, windows, 3)
    fast = greedy(FastEngine(model, windows, batch_size=4), model, windows, 3)
    assert fast.removal_list == reference.removal_list
    for ref_row, fast_row in zip(reference.scores, fast.scores):
        for ref, got in zip(ref_row, fast_row):
            if got is not None:  # abandoned candidates have no complete loss
                assert got == pytest.approx(ref, rel=1e-5)
    # One-shot ranking uses every candidate's complete loss.
    ref_once = run_metric("sleb_oneshot", ReferenceEngine(model, windows), model, windows, 2)
    fast_once = run_metric("sleb_oneshot", FastEngine(model, windows, 3), model, windows, 2)
    assert fast_once.removal_list == ref_once.removal_list
    for ref, got in zip(ref_once.scores[0], fast_once.scores[0]):
        assert (got is None and ref is None) or got == pytest.approx(ref, rel=1e-5)


def test_prefix_reuse_saves_block_forwards(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    engine = FastEngine(model, windows, batch_size=6, abandon=False)
    greedy(engine, model, windows, 2)
    # The reference engine runs every alive block but one per candidate: 4 x 5 + 3 x 4 = 32 per window.
    assert engine.block_forwards < 32 * len(windows)


def test_abandonment_keeps_the_winner_among_near_ties(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    layers = blocks.get_blocks(model)
    _make_identity(layers[2])
    _make_identity(layers[4])  # exact tie between blocks 2 and 4: the lower position must win
    with torch.no_grad():
        layers[3].mlp.down_proj.weight.mul_(1e-4)  # and block 3 nearly ties
        layers[3].self_attn.o_proj.weight.mul_(1e-4)
    positions = [2, 3, 4]
    reference = ReferenceEngine(model, windows).phase([], positions).losses
    # Evaluate block 4 first (as a previous phase ranking it best would), one window per batch.
    previous = [None, None, 3.0, 2.0, 1.0, None]
    engine = FastEngine(model, windows, batch_size=1)
    fast = engine.phase([], positions, order_hint=previous).losses
    settled = search_algorithms.settle_near_ties(engine, SearchState(6), fast, count=1)
    assert reference[2] == reference[4]
    assert search_algorithms.choose(reference) == search_algorithms.choose({p: v for p, v in settled.items() if v is not None}) == 2
    full = greedy(FastEngine(model, windows, batch_size=1), model, windows, 2)
    assert full.removal_list == greedy(ReferenceEngine(model, windows), model, windows, 2).removal_list


def test_memory_fallback_gives_the_same_answer(model_dirs, calibration):
    model, windows = calibration(model_dirs["qwen2"])
    cached = FastEngine(model, windows, batch_size=2)
    streamed = FastEngine(model, windows, batch_size=2, cache_gb=1e-9)
    assert cached.storage.where == "device" and streamed.storage.where is None
    a = greedy(cached, model, windows, 3)
    b = greedy(streamed, model, windows, 3)
    assert a.removal_list == b.removal_list


@pytest.mark.parametrize("metric", ["cosine", "angular", "random"])
def test_baselines_give_valid_lists(metric, model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    def run():
        return run_metric(metric, None, model, windows, 2, seed=7)

    chosen = run().removal_list
    assert len(chosen) == 2 and len(set(chosen)) == 2 and all(1 <= b <= 4 for b in chosen)
    if metric == "angular":
        assert chosen[1] == chosen[0] + 1
    if metric == "random":
        assert run().removal_list == chosen


def test_cosine_ranks_an_identity_block_first(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    _make_identity(blocks.get_blocks(model)[4])
    state = run_metric("cosine", None, model, windows, 1)
    assert state.removal_list == [4] and state.scores[0][4] == pytest.approx(0.0, abs=1e-6)


def _checked(**flags):
    settings = SearchSettings(**flags)
    settings.check()
    settings.check_depth(6)


def test_flag_checks():
    with pytest.raises(UsageError, match="below"):
        _checked(num_remove_blocks=4)
    with pytest.raises(UsageError, match="barriers"):
        _checked(num_remove_blocks=1, early_barrier=-1)
    with pytest.raises(UsageError, match="no candidate"):
        _checked(num_remove_blocks=1, early_barrier=3, latter_barrier=3)
    with pytest.raises(UsageError, match="unknown --metric"):
        _checked(metric="magic")
