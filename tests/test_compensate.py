"""Training-free linear compensation (sleb.compensate): the fold is exact, the fit is the formula's,
it lowers held-out perplexity on the demo model, the checkpoint reloads, and bad input is one line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sleb
import tiny
from clitools import assert_bad_input, invoke
from sleb import blocks, forward
from sleb.recovery import linear


def _windows(tokenizer, text_file, model, count=8, seqlen=32):
    return sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=300, seqlen=seqlen, model=model)[:count]


# Every family of the tests is compensated exactly, or refused with its own cause (issue 30).
REFUSED = {"gemma3": "applies a norm (post_feedforward_layernorm)", "gemma3_vl": "applies a norm (post_feedforward",
           "gemma2": "applies a norm (post_feedforward_layernorm)", "gemma4": "applies a norm (post_feedforward",
           "falcon": "adds to its last sub-layer's output (mlp) in place",
           "granite": "by 0.22 before adding it (a residual multiplier)"}
ALL = tiny.ARCHS + tiny.FAMILIES + tiny.COMPENSATION_FAMILIES
REMOVED = {"opt": [2, 3], "jamba": [4], "nemotron_h": [4]}  # jamba's attention block is 2; nemotron_h: its Mamba out_proj


def _directory(arch, model_dirs, family_dirs):
    return (model_dirs if arch in tiny.ARCHS else family_dirs)[arch]


@pytest.mark.parametrize("arch", [arch for arch in ALL if arch not in REFUSED])
def test_folded_weights_give_the_logits_of_the_map_applied_as_a_hook(arch, model_dirs, family_dirs, text_file):
    """Among them: OPT (biases), Qwen2-MoE (experts and a gated shared expert), Qwen3-MoE (fused 3-D experts),
    GPT-OSS (fused experts with biases), Nemotron-H (a Mamba mixer's out_proj), and the blocks that end in a
    dropout the fold target is found past: Phi-3, GPT-NeoX, Phi-2 (one dropout for both branches), StableLM."""
    removed = REMOVED.get(arch, [2])
    directory = _directory(arch, model_dirs, family_dirs)
    hooked, tokenizer = sleb.load(directory, device="cpu")
    windows = _windows(tokenizer, text_file, hooked)
    before = removed[0] - 1
    with torch.inference_mode():
        sublayer = linear.last_sublayer(hooked, before, windows[:1, :16], str(before))
        T = linear.normal_equations(hooked, windows, sublayer, removed[-1], progress=False).solve(0.0)
    dtype = next(sublayer.module.parameters()).dtype
    handle = sublayer.module.register_forward_hook(
        lambda module, args, out: (out[0] @ T.to(dtype), *out[1:]) if isinstance(out, tuple) else out @ T.to(dtype))
    ids = windows[:2]
    with torch.inference_mode(), sleb.skipping(hooked, removed):
        expected = hooked(input_ids=ids).logits
    handle.remove()
    folded, _ = sleb.load(directory, device="cpu")
    result = sleb.compensate(folded, windows, removed, progress=False, keep_block_kinds=False)
    assert [fit.run for fit in result.runs] == [removed] and result.runs[0].folded_into
    with torch.inference_mode():
        torch.testing.assert_close(folded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert blocks.num_blocks(folded) == blocks.num_blocks(hooked) - len(removed)
    with torch.inference_mode(), sleb.skipping(hooked, removed):  # the map did something
        assert not torch.allclose(hooked(input_ids=ids).logits, expected, atol=1e-4)
    assert result.runs[0].residual < result.runs[0].identity_residual  # the recorded map is not the identity


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_a_block_that_cannot_take_a_map_is_refused_with_its_own_cause(arch, model_dirs, family_dirs, text_file):
    model, tokenizer = sleb.load(_directory(arch, model_dirs, family_dirs), device="cpu")
    windows = _windows(tokenizer, text_file, model)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(sleb.UsageError) as raised:
        sleb.compensate(model, windows, [2], progress=False)
    message = str(raised.value)
    assert REFUSED[arch] in message and "\n" not in message, message
    assert blocks.num_blocks(model) == 6 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _collected(model, windows, before, last):
    """M and H - Y at every token, collected here independently of sleb's accumulation."""
    layers = model.model.layers
    Ms, Ds = [], []
    with torch.inference_mode():
        for window in windows:
            watched = {"M": layers[before].mlp, "O": layers[before], "H": layers[last]}
            seen = forward.observe(model, window[None], watched, stop_after=layers[last])
            M = seen.outputs["M"][0].double()
            Ms.append(M)
            Ds.append(seen.outputs["H"][0].double() - (seen.outputs["O"][0].double() - M))
    return torch.cat(Ms), torch.cat(Ds)


def test_the_fit_is_the_least_squares_solution_and_the_ridge_shrinks_it_toward_plain_removal(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, model)
    with torch.inference_mode():
        sublayer = linear.last_sublayer(model, 1, windows[:1, :16], "1")
        normal = linear.normal_equations(model, windows, sublayer, 3, progress=False)
    M, D = _collected(model, windows, 1, 3)
    assert normal.tokens == len(M) == windows.numel()
    expected = torch.linalg.lstsq(M, D).solution
    T = normal.solve(0.0)
    torch.testing.assert_close(T, expected, rtol=1e-5, atol=1e-6)  # normal equations square the conditioning
    assert normal.residual(T) == pytest.approx(((M @ T - D).norm() / D.norm()).item(), rel=1e-6)
    assert normal.residual(torch.eye(32, dtype=torch.float64)) == pytest.approx(((M - D).norm() / D.norm()).item(),
                                                                               rel=1e-9)
    ridge, eye = 1.0, torch.eye(32, dtype=torch.float64)
    with_ridge = torch.linalg.solve(M.T @ M + ridge * eye, M.T @ D + ridge * eye)  # argmin |MT-D|^2 + r|T-I|^2
    torch.testing.assert_close(normal.solve(ridge), with_ridge, rtol=1e-5, atol=1e-6)
    # ridge -> infinity: T -> I, plain removal (shrinking toward 0 would also delete block l's sub-layer)
    assert (normal.solve(1e12) - eye).norm() < 1e-4 * (T - eye).norm()


def test_a_run_that_is_a_linear_map_of_m_is_recovered_exactly(model_dirs, text_file):
    """Block 2 made to add exactly M A to the stream (its own contribution zeroed, M A added by a hook):
    then H - Y = M (I + A), and the fit must return I + A with no residual."""
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, model, count=12)
    layers = model.model.layers
    with torch.no_grad():
        layers[2].self_attn.o_proj.weight.zero_()
        layers[2].mlp.down_proj.weight.zero_()
    A = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) / 8
    seen = {}
    handles = [layers[1].mlp.register_forward_hook(lambda module, args, out: seen.update(M=out)),
               layers[2].register_forward_hook(lambda module, args, out: out + seen["M"] @ A)]
    with torch.inference_mode():
        sublayer = linear.last_sublayer(model, 1, windows[:1, :16], "1")
        normal = linear.normal_equations(model, windows, sublayer, 2, progress=False)
    for handle in handles:
        handle.remove()
    T = normal.solve(0.0)
    torch.testing.assert_close(T, torch.eye(32, dtype=torch.float64) + A.double(), rtol=1e-4, atol=1e-4)
    assert normal.residual(T) < 1e-5


@pytest.mark.parametrize("removal_list", [[7, 3, 5], [7, 3]])
def test_compensation_lowers_held_out_demo_perplexity(removal_list, tmp_path):
    model, tokenizer = sleb.load("demo", device="cpu")
    windows = sleb.calibration_windows(tokenizer, "demo", nsamples=64, seqlen=512, model=model)
    held_out = sleb.evaluation_windows(tokenizer, "demo", seqlen=512, model=model)[:12]
    with sleb.skipping(model, removal_list):
        plain = sleb.perplexity(model, windows=held_out, progress=False)
    result = sleb.compensate(model, windows, removal_list, progress=False)
    compensated = sleb.perplexity(model, windows=held_out, progress=False)
    assert compensated < plain
    assert all(fit.residual < fit.identity_residual for fit in result.runs)
    if len(removal_list) == 3:  # saved, reloaded by stock transformers as the very same model
        sleb.save_pretrained(model, tokenizer, str(tmp_path / "compensated"))
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "compensated", output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        ids = held_out[:2]
        with torch.inference_mode():
            torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def _eval_compensated(model_dirs, text_file, tmp_path, method: str, *flags) -> dict:
    """eval with [2, 3, 5] removed and compensated, the checkpoint saved; its results record."""
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[2, 3, 5]", "--compensate", method,
                 *flags, "--dataset", f"file:{text_file}", "--nsamples", "200", "--seqlen", "32",
                 "--ppl_datasets", f"file:{text_file}", "--result_folder", str(tmp_path), "--result_file", "c.json",
                 "--save_model", str(tmp_path / "saved"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "c.json").read_text())


def test_eval_compensate_records_the_fit_and_the_card_says_so(model_dirs, text_file, tmp_path):
    record = _eval_compensated(model_dirs, text_file, tmp_path, "linear", "--ridge", "0.5")
    compensation = record["compensation"]
    assert compensation["ridge"] == 0.5 and [fit["run"] for fit in compensation["runs"]] == [[2, 3], [5]]
    assert [fit["before"] for fit in compensation["runs"]] == [1, 4]
    assert all(0 <= fit["residual"] <= fit["identity_residual"] for fit in compensation["runs"])
    assert record["times"]["compensate_s"] == compensation["seconds"] > 0
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "linear compensation" in card and "run [2, 3] -> block 1 (mlp.down_proj.weight)" in card


def test_search_then_compensate_records_it(model_dirs, text_file, tmp_path):
    out = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "100",
                 "--seqlen", "32", "--num_remove_blocks", "2", "--compensate", "linear", "--ppl_datasets",
                 f"file:{text_file}", "--result_folder", str(tmp_path), "--result_file", "s.json")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "s.json").read_text())
    runs = [index for fit in record["compensation"]["runs"] for index in fit["run"]]
    assert sorted(runs) == sorted(record["removal_list"])


@pytest.mark.parametrize("arch, args, message", [
    ("llama", ["--removal_list", "[2]", "--compensate", "linear", "--ridge", "-1"], "--ridge must be a number >= 0"),
    ("llama", ["--removal_list", "[0, 1]", "--compensate", "linear"], "starts at block 0"),
    ("llama", ["--removal_list", "[2]", "--compensate", "cubic"], "--compensate must be linear or local"),
    ("llama", ["--removal_list", "[0, 1]", "--compensate", "local"], "block 0 has none"),
    ("llama", ["--removal_list", "[2]", "--compensate", "local", "--local_steps", "0"], "--local_steps must be"),
    ("llama", ["--removal_list", "[2]", "--local_lr", "0.1"], "apply to --compensate local only"),
    ("gemma3", ["--removal_list", "[2]", "--compensate", "linear"], "applies a norm (post_feedforward_layernorm)"),
])
def test_bad_compensation_input_is_one_line_and_writes_nothing(arch, args, message, model_dirs, text_file, tmp_path):
    flags = {"--model_name": model_dirs[arch], "--dataset": f"file:{text_file}", "--nsamples": "100",
             "--seqlen": "32", "--ppl_datasets": f"file:{text_file}", "--result_folder": str(tmp_path / "results"),
             "--save_model": str(tmp_path / "saved")}
    assert_bad_input("eval", flags, args, message, tmp_path / "results")
    assert not (tmp_path / "saved").exists()


def test_tied_weights_the_fold_would_change_are_refused(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    model.model.layers[1].mlp.down_proj.weight = model.model.layers[3].mlp.down_proj.weight  # blocks sharing weights
    windows = _windows(tokenizer, text_file, model)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(sleb.UsageError, match="is shared"):
        sleb.compensate(model, windows, [2], progress=False)
    assert blocks.num_blocks(model) == 6 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_compensated_search_scores_what_compensate_then_gives(model_dirs, text_file):
    """Phase 1's chosen loss is the calibration loss of the model sleb.compensate makes from a fresh copy;
    the last phase's is the loss of the model the search leaves once its blocks are removed."""
    from sleb.engines import ReferenceEngine

    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = _windows(tokenizer, text_file, model, count=6)
    found = sleb.search(model, windows, num_remove_blocks=2, metric="sleb_compensated", progress=False)
    assert len(found.removal_list) == 2 and [fit.run for fit in found.fits] == [[b] for b in found.removal_list]
    first = found.removal_list[0]
    fresh, _ = sleb.load(model_dirs["llama"], device="cpu")
    sleb.compensate(fresh, windows, [first], progress=False)
    assert ReferenceEngine(fresh, windows).loss([]) == pytest.approx(found.losses[0][first], rel=1e-5)
    sleb.remove_blocks(model, found.removal_list)
    assert ReferenceEngine(model, windows).loss([]) == pytest.approx(found.losses[1][found.removal_list[1]],
                                                                     rel=1e-5)
    # Each phase's pick is the lowest compensated loss, ties to the lowest block.
    for row, block in zip(found.losses, found.removal_list):
        scored = {b: v for b, v in enumerate(row) if v is not None}
        assert block == min(scored, key=lambda b: (scored[b], b))


def test_compensated_search_from_the_command_saves_the_scored_model(model_dirs, text_file, tmp_path):
    out = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "100",
                 "--seqlen", "32", "--num_remove_blocks", "2", "--metric", "sleb_compensated", "--ppl_datasets",
                 f"file:{text_file}", "--result_folder", str(tmp_path), "--result_file", "s.json",
                 "--save_model", str(tmp_path / "saved"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["compensation"]["method"] == "linear, inside the search"
    assert [fit["run"] for fit in record["compensation"]["runs"]] == [[b] for b in record["removal_list"]]
    assert record["ppl"][f"file:{text_file}"]["ppl"] != record["ppl_dense"][f"file:{text_file}"]["ppl"]
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    resumed = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples",
                     "100", "--seqlen", "32", "--num_remove_blocks", "2", "--metric", "sleb_compensated",
                     "--result_folder", str(tmp_path), "--result_file", "s.json", "--resume", "True")
    assert resumed.returncode == 2 and "folds maps into the model" in resumed.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compensation_runs_in_half_precision_as_in_float32(dtype):
    """Users load bf16 checkpoints: the exactness proofs run on a float32 copy of the block. In the
    demo model's own dtype they rounded a trained Llama block (a stream far larger than what its MLP
    adds) into a refusal; the map fitted is float32's to half-precision rounding."""
    fits = {}
    for name in ("float32", dtype):
        model, tokenizer = sleb.load("demo", dtype=name, device="cpu")
        windows = sleb.calibration_windows(tokenizer, "demo", nsamples=64, seqlen=512, model=model)[:4]
        fits[name] = sleb.compensate(model, windows, [3], progress=False).runs[0]
        assert blocks.compute_dtype(model) == getattr(torch, name)
    assert fits[dtype].folded_into == fits["float32"].folded_into == ["mlp.down_proj.weight"]
    assert fits[dtype].residual == pytest.approx(fits["float32"].residual, rel=0.02)
    assert fits[dtype].residual < fits[dtype].identity_residual


def test_local_reconstruction_trains_the_block_before_each_run_toward_what_the_run_made(tmp_path):
    """--compensate local: the block before each run learns the run's output on the calibration text, so the
    relative error falls, held-out perplexity falls below plain removal's, and the saved checkpoint reloads
    in stock transformers as the very model that was scored."""
    model, tokenizer = sleb.load("demo", device="cpu")
    windows = sleb.calibration_windows(tokenizer, "demo", nsamples=64, seqlen=256, model=model)
    held_out = sleb.evaluation_windows(tokenizer, "demo", seqlen=512, model=model)[:8]
    removal_list = [7, 3, 4]
    with sleb.skipping(model, removal_list):
        plain = sleb.perplexity(model, windows=held_out, progress=False)
    before = [[p.clone() for p in block.parameters()] for block in blocks.get_blocks(model)]
    result = sleb.compensate(model, windows, removal_list, method="local", local_steps=40, local_lr=3e-4,
                             progress=False)
    assert [(t.run, t.before) for t in result.runs] == [([3, 4], 2), ([7], 6)]
    assert all(t.error_trained < 0.8 * t.error_removed for t in result.runs), [t.record() for t in result.runs]
    assert blocks.num_blocks(model) == 9 and sleb.perplexity(model, windows=held_out, progress=False) < plain
    kept = [index for index in range(len(before)) if index not in removal_list]
    changed = [index for index, block in zip(kept, blocks.get_blocks(model))
               if not all(torch.equal(p, q) for p, q in zip(block.parameters(), before[index]))]
    assert changed == [2, 6]  # the blocks before the runs, and only they
    sleb.save_pretrained(model, tokenizer, str(tmp_path / "local"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "local")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.eval()(input_ids=held_out[:2]).logits, model(input_ids=held_out[:2]).logits)


def test_eval_compensate_local_records_the_training_and_the_card_says_so(model_dirs, text_file, tmp_path):
    compensation = _eval_compensated(model_dirs, text_file, tmp_path, "local", "--local_steps", "5")["compensation"]
    assert compensation["method"] == "local" and compensation["settings"]["steps"] == 5
    assert [(t["run"], t["before"]) for t in compensation["runs"]] == [([2, 3], 1), ([5], 4)]
    assert all(t["error_trained"] < t["error_removed"] for t in compensation["runs"])
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "local reconstruction" in card and "run [2, 3] -> block 1" in card and "given + local" in card
