"""The SLEB search: the reference engine, the fast engine against it, the baselines, resume."""


import pytest
import torch

from sleb import blocks, data, search
from sleb.errors import UsageError
from sleb.fast_search import FastEngine
from sleb.models import load_model
from sleb.search import ReferenceEngine, SearchState, candidate_positions


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
    losses, _ = engine.phase_losses(SearchState(6, [2]), candidate_positions(5, 1, 1))
    alive = [0, 1, 3, 4, 5]
    for position, loss in losses.items():
        assert loss == pytest.approx(hand_loss(model_dirs["llama"], [2, alive[position]], windows), rel=1e-5)


def test_identity_block_costs_nothing_and_phases_pick_their_argmin(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    _make_identity(blocks.get_blocks(model)[3])
    engine = ReferenceEngine(model, windows)
    dense = engine.loss([])
    state = search.greedy_search(engine, SearchState(6), 3, 1, 1, log=lambda *_: None)
    assert state.losses[0][3] == pytest.approx(dense, rel=1e-6)
    for phase, row in enumerate(state.losses):
        chosen = state.removal_list[phase]
        computed = {block: loss for block, loss in enumerate(row) if loss is not None}
        assert computed[chosen] == min(computed.values())
        alive = [b for b in range(6) if b not in state.removal_list[:phase]]
        assert row[alive[0]] is None and row[alive[-1]] is None  # barriers
    assert 0 not in state.removal_list and 5 not in state.removal_list


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])
def test_fast_engine_equals_reference(arch, model_dirs, calibration):
    model, windows = calibration(model_dirs[arch])
    reference = search.greedy_search(ReferenceEngine(model, windows), SearchState(6), 3, 1, 1, log=lambda *_: None)
    fast_engine = FastEngine(model, windows, batch_size=4)
    fast = search.greedy_search(fast_engine, SearchState(6), 3, 1, 1, log=lambda *_: None)
    assert fast.removal_list == reference.removal_list
    for ref_row, fast_row in zip(reference.losses, fast.losses):
        for ref, got in zip(ref_row, fast_row):
            if got is not None:  # abandoned candidates have no complete loss
                assert got == pytest.approx(ref, rel=1e-5)
    # One-shot ranking uses every candidate's complete loss.
    ref_once = search.oneshot_search(ReferenceEngine(model, windows), SearchState(6), 2, 1, 1, log=lambda *_: None)
    fast_once = search.oneshot_search(FastEngine(model, windows, 3), SearchState(6), 2, 1, 1, log=lambda *_: None)
    assert fast_once.removal_list == ref_once.removal_list
    for ref, got in zip(ref_once.losses[0], fast_once.losses[0]):
        assert (got is None and ref is None) or got == pytest.approx(ref, rel=1e-5)


def test_prefix_reuse_saves_block_forwards(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    engine = FastEngine(model, windows, batch_size=6, abandon=False)
    search.greedy_search(engine, SearchState(6), 2, 1, 1, log=lambda *_: None)
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
    state = SearchState(6)
    positions = [2, 3, 4]
    reference, _ = ReferenceEngine(model, windows).phase_losses(state, positions)
    # Evaluate block 4 first (as a previous phase ranking it best would), one window per batch.
    previous = [None, None, 3.0, 2.0, 1.0, None]
    fast, _ = FastEngine(model, windows, batch_size=1).phase_losses(state, positions, previous=previous)
    assert reference[2] == reference[4]
    assert search.choose(reference) == search.choose({p: v for p, v in fast.items() if v is not None}) == 2
    full = search.greedy_search(FastEngine(model, windows, batch_size=1), SearchState(6), 2, 1, 1, log=lambda *_: None)
    assert full.removal_list == search.greedy_search(ReferenceEngine(model, windows), SearchState(6), 2, 1, 1,
                                                     log=lambda *_: None).removal_list


def test_memory_fallback_gives_the_same_answer(model_dirs, calibration):
    model, windows = calibration(model_dirs["qwen2"])
    cached = FastEngine(model, windows, batch_size=2)
    streamed = FastEngine(model, windows, batch_size=2, cache_gb=1e-9)
    assert cached.storage == "device" and streamed.storage is None
    a = search.greedy_search(cached, SearchState(6), 3, 1, 1, log=lambda *_: None)
    b = search.greedy_search(streamed, SearchState(6), 3, 1, 1, log=lambda *_: None)
    assert a.removal_list == b.removal_list


@pytest.mark.parametrize("metric", ["cosine", "angular", "random"])
def test_baselines_give_valid_lists(metric, model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    run = {
        "cosine": lambda: search.cosine_search(model, windows, SearchState(6), 2, 1, 1, log=lambda *_: None),
        "angular": lambda: search.angular_search(model, windows, SearchState(6), 2, 1, 1, log=lambda *_: None),
        "random": lambda: search.random_search(SearchState(6), 2, 1, 1, seed=7, log=lambda *_: None),
    }[metric]
    chosen = run().removal_list
    assert len(chosen) == 2 and len(set(chosen)) == 2 and all(1 <= b <= 4 for b in chosen)
    if metric == "angular":
        assert chosen[1] == chosen[0] + 1
    if metric == "random":
        assert run().removal_list == chosen


def test_cosine_ranks_an_identity_block_first(model_dirs, calibration):
    model, windows = calibration(model_dirs["llama"])
    _make_identity(blocks.get_blocks(model)[4])
    state = search.cosine_search(model, windows, SearchState(6), 1, 1, 1, log=lambda *_: None)
    assert state.removal_list == [4] and state.losses[0][4] == pytest.approx(0.0, abs=1e-6)


def test_flag_checks():
    with pytest.raises(UsageError, match="below"):
        search.check_search_flags(6, 4, 1, 1, "sleb")
    with pytest.raises(UsageError, match="barriers"):
        search.check_search_flags(6, 1, -1, 1, "sleb")
    with pytest.raises(UsageError, match="no candidate"):
        search.check_search_flags(6, 1, 3, 3, "sleb")
    with pytest.raises(UsageError, match="unknown --metric"):
        search.check_search_flags(6, 1, 1, 1, "magic")
