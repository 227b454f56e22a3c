"""Issue 30: linear compensation wherever the search runs. Several runs fold as hooks would; the
compensated search is the greedy loop with its own scoring (fast == reference, any memory budget, the
saved model scores what the search scored); refusals come before any search phase; accelerate's hooks
are followed and offloaded weights refused; a candidate that cannot be compensated does not stop the
search; a map a later phase deletes leaves no stale record."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sleb
import tiny
from clitools import invoke, run
from sleb import blocks
from sleb.engines import ReferenceEngine
from sleb.recovery import compensated, linear


def _windows(tokenizer, text_file, model, count=6, seqlen=32):
    return sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=300, seqlen=seqlen, model=model)[:count]


def _hook(module, T):
    dtype = next(module.parameters()).dtype
    return module.register_forward_hook(
        lambda m, args, out: (out[0] @ T.to(dtype), *out[1:]) if isinstance(out, tuple) else out @ T.to(dtype))


def test_two_separate_runs_fold_as_their_maps_applied_as_hooks(model_dirs, text_file):
    """Runs [2] and [4]: the second map is fitted on the model with the first run compensated and skipped."""
    hooked, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, hooked)
    probe = windows[:1, :16]
    handles = []
    with torch.inference_mode():
        first = linear.last_sublayer(hooked, 1, probe, "1")
        handles.append(_hook(first.module, linear.normal_equations(hooked, windows, first, 2, progress=False).solve(0)))
        second = linear.last_sublayer(hooked, 3, probe, "3")
        with sleb.skipping(hooked, [2]):
            second.block_index = 2  # block 3 is at position 2 with block 2 skipped; block 4 at 3
            T2 = linear.normal_equations(hooked, windows, second, 3, progress=False).solve(0)
        handles.append(_hook(second.module, T2))
        with sleb.skipping(hooked, [2, 4]):
            expected = hooked(input_ids=windows[:2]).logits
    for handle in handles:
        handle.remove()
    folded, _ = sleb.load(model_dirs["llama"], device="cpu")
    result = sleb.compensate(folded, windows, [4, 2], progress=False)
    assert [fit.run for fit in result.runs] == [[2], [4]] and [fit.before for fit in result.runs] == [1, 3]
    with torch.inference_mode():
        torch.testing.assert_close(folded(input_ids=windows[:2]).logits, expected, rtol=1e-4, atol=1e-4)
    assert blocks.origin(folded).weights_changed == [{"map": "linear", "run": [2], "into": 1},
                                                     {"map": "linear", "run": [4], "into": 3}]


def test_fewer_tokens_than_dimensions_take_the_least_norm_solution():
    generator = torch.Generator().manual_seed(0)
    M, O, H = (torch.randn(5, 32, generator=generator, dtype=torch.float64) for _ in range(3))
    normal = linear.Normal(32, torch.device("cpu"))
    normal.add(M, O, H)
    D = H - (O - M)
    T = normal.solve(0.0)
    torch.testing.assert_close(T, torch.linalg.pinv(M) @ D, rtol=1e-6, atol=1e-8)
    assert normal.residual(T) < 1e-6  # 5 tokens, 32 dimensions: fitted exactly


def test_a_step_that_is_not_linear_after_the_sub_layer_fails_the_doubling_proof(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    model.model.layers[1].register_forward_hook(lambda module, args, out: torch.tanh(out))
    windows = _windows(tokenizer, text_file, model)
    with pytest.raises(sleb.UsageError, match=r"does not add its last sub-layer \(mlp\) to the residual stream as "
                                              r"it is \(a norm or another non-linear step after it"):
        sleb.compensate(model, windows, [2], progress=False)


@pytest.mark.parametrize("flags", [["--compensate", "linear"], ["--metric", "sleb_compensated"]])
def test_a_model_that_cannot_be_compensated_is_refused_before_any_search(flags, model_dirs, text_file, tmp_path):
    out = run("sleb", "--model_name", model_dirs["gemma3"], "--dataset", f"file:{text_file}", "--nsamples", "100",
              "--seqlen", "32", "--num_remove_blocks", "2", "--ppl_datasets", f"file:{text_file}", *flags,
              "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "applies a norm (post_feedforward_layernorm)" in lines[0], out.stderr
    assert "phase 1" not in out.stdout + out.stderr and "ppl " not in out.stderr  # no search, no dense perplexity
    assert not (tmp_path / "results").exists() or not [p for p in (tmp_path / "results").iterdir()
                                                      if not p.name.startswith(".")]


def _compensated(model, windows, **kwargs):
    return sleb.search(model, windows, num_remove_blocks=2, metric="sleb_compensated", progress=False, **kwargs)


def test_the_fast_engine_and_any_budget_give_the_reference_engines_compensated_list(model_dirs, text_file):
    found = {}
    for engine, budget in (("reference", 0.0), ("fast", 0.0), ("fast", 2e-5)):  # 2e-5 GiB: one candidate's sums (16 KiB)
        model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
        windows = _windows(tokenizer, text_file, model)
        found[engine, budget] = _compensated(model, windows, engine=engine, compensation_gb=budget)
    reference = found["reference", 0.0]
    for key, result in found.items():
        assert result.removal_list == reference.removal_list, key
        for row, expected in zip(result.losses, reference.losses):
            assert all((a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-5))
                       for a, b in zip(row, expected)), key
    small = found["fast", 2e-5].stats
    assert small["sums_capacity"] == 1 and small["statistics_passes"] > found["fast", 0.0].stats["statistics_passes"]
    assert found["fast", 0.0].stats["sums_reused"] > 0  # sums of candidates no fold reached, kept from phase 1


def test_a_budget_too_small_for_one_candidate_is_one_line(model_dirs, text_file, tmp_path):
    out = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "100",
                 "--seqlen", "32", "--num_remove_blocks", "2", "--metric", "sleb_compensated", "--compensation_gb",
                 "1e-9", "--eval_ppl", "False", "--result_folder", str(tmp_path))
    assert out.returncode == 2 and "holds no candidate's sums" in out.stderr.strip().splitlines()[-1], out.stderr


def test_the_reloaded_compensated_checkpoint_scores_the_searchs_last_loss(model_dirs, text_file, tmp_path):
    out = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "100",
                 "--seqlen", "32", "--num_remove_blocks", "2", "--metric", "sleb_compensated", "--eval_ppl", "False",
                 "--result_folder", str(tmp_path), "--result_file", "s.json", "--save_model", str(tmp_path / "saved"))
    assert out.returncode == 0, out.stderr[-3000:]
    search = json.loads((tmp_path / "s.json").read_text())["search"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    tokenizer = tiny.make_tokenizer()
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=100, seqlen=32, model=reloaded)
    last = search["removal_list"][-1]
    assert ReferenceEngine(reloaded, windows).loss([]) == pytest.approx(search["losses"][-1][last], rel=1e-5)
    for fit in search["fits"]:
        assert fit["residual"] < fit["identity_residual"]  # each recorded map is not the identity


def test_a_candidate_that_cannot_be_compensated_is_named_and_the_search_goes_on(model_dirs, text_file, monkeypatch):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, model)
    unbroken = _compensated(model, windows).removal_list[0]
    real = compensated.CompensatedEngine._map

    def broken_for_one(self, alive, position):
        return None if alive[position] == unbroken else real(self, alive, position)

    monkeypatch.setattr(compensated.CompensatedEngine, "_map", broken_for_one)
    model, _ = sleb.load(model_dirs["llama"], device="cpu")
    found = _compensated(model, windows)
    assert unbroken not in found.removal_list and len(found.removal_list) == 2
    assert found.losses[0][unbroken] is None
    assert {"removed_before": [], "block": unbroken} in found.stats["not_compensable"]


def test_a_map_in_a_block_a_later_phase_removes_is_merged_into_the_new_record(model_dirs, text_file):
    """Block 3 removed (its map into block 2), then block 2 removed (map into block 1): the model holds one map,
    for the run [2, 3], in block 1, and that is what the record says."""
    from sleb.engines import ReferenceEngine as Inner
    from sleb.search_algorithms import SearchState

    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, model)
    engine = compensated.CompensatedEngine(Inner(model, windows), model, windows, 1, 1, progress=False)
    state = SearchState(6)
    engine.keep(state, 3)
    state.removal_list.append(3)
    engine.keep(state, 2)
    state.removal_list.append(2)
    assert [(fit.run, fit.before) for fit in state.fits] == [([2, 3], 1)]
    assert blocks.origin(model).weights_changed == [{"map": "linear", "run": [2, 3], "into": 1}]


def test_a_model_dispatched_by_accelerate_is_compensated_as_on_one_device(model_dirs, text_file):
    from accelerate import cpu_offload, dispatch_model

    plain, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, plain)
    sleb.compensate(plain, windows, [2, 3], progress=False)
    spread, _ = sleb.load(model_dirs["llama"], device="cpu")
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"] + [f"model.layers.{i}" for i in range(6)]
    spread = dispatch_model(spread, device_map={name: "cpu" for name in names}, force_hooks=True)
    assert hasattr(spread.model.layers[1], "_hf_hook")  # accelerate's hooks move every input
    sleb.compensate(spread, windows, [2, 3], progress=False)
    ids = windows[:2]
    with torch.inference_mode():
        torch.testing.assert_close(spread(input_ids=ids).logits, plain(input_ids=ids).logits)

    offloaded, _ = sleb.load(model_dirs["llama"], device="cpu")
    offloaded = cpu_offload(offloaded, execution_device="cpu")  # weights held by the hooks, the modules on meta
    with pytest.raises(sleb.UsageError) as raised:
        sleb.compensate(offloaded, windows, [2], progress=False)
    assert "are offloaded" in str(raised.value) and "\n" not in str(raised.value)
