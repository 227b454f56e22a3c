"""Sub-layers: the greedy search over attentions and MLPs returns what an independent loop returns, a model
without them generates with every cache, and eval and the search command take and write sub-layer lists."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import sleb
from clitools import invoke, run
from sleb import blocks, sublayers
from sleb.decilm.modeling_decilm import Absent

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _independent_loss(model, windows, gone: list) -> float:
    """The paper's loss with sub-layers silenced another way: their output projection zeroed in a copy, so the
    sub-layer adds exactly nothing to the residual stream."""
    model = copy.deepcopy(model)
    for block, kind in gone:
        layer = model.model.layers[block]
        out = layer.self_attn.o_proj if kind == "attn" else layer.mlp.down_proj
        with torch.no_grad():
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()
    total = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            total += F.cross_entropy(logits, window[1:]).item() * len(window)
    return total


def _independent_search(model, windows, budget_blocks: int, kinds: tuple) -> list:
    layers = model.model.layers
    size = {"attn": sum(getattr(layers[1].self_attn, n).weight.numel() for n in ATTENTION),
            "mlp": sum(getattr(layers[1].mlp, n).weight.numel() for n in MLP)}
    budget, gone, taken = budget_blocks * (size["attn"] + size["mlp"]), [], 0
    while taken < budget:
        options = [(b, k) for b in range(1, len(layers) - 1) for k in ("attn", "mlp") if k in kinds
                   and (b, k) not in gone]
        scored = sorted(options, key=lambda o: (_independent_loss(model, windows, gone + [o]), o[0], o[1] != "attn"))
        gone.append(scored[0])
        taken += size[scored[0][1]]
    return [f"{b}.{k}" for b, k in gone]


@pytest.mark.parametrize("unit, kinds", [("sublayer", ("attn", "mlp")), ("attention", ("attn",)), ("mlp", ("mlp",))])
def test_the_sublayer_search_returns_what_an_independent_loop_returns(unit, kinds, model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, open(text_file).read().splitlines(), nsamples=40, seqlen=16)[:6]
    found = sleb.search_sublayers(model, windows, 1, unit, progress=False)
    assert found.removal_list == _independent_search(model, windows, 1, kinds)
    assert found.weights_removed >= found.budget  # phases went on until a block's worth of weights was gone
    # the loss it chose by is the independent loss of the same set
    first = found.removal_list[0]
    assert found.losses[0][first] == pytest.approx(
        _independent_loss(model, windows, [(int(first.split(".")[0]), first.split(".")[1])]), rel=1e-5)
    assert all(isinstance(m, torch.nn.Module) and not isinstance(m, Absent)
               for m in model.modules())  # the model is whole again


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("unit, objective", [("sublayer", "ce"), ("attention", "kl"), ("mlp", "ce")])
def test_the_fast_sublayer_search_returns_the_reference_list(arch, unit, objective, model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs[arch], device="cpu")
    windows = sleb.calibration_windows(tokenizer, open(text_file).read().splitlines(), nsamples=40, seqlen=16)[:5]
    fast = sleb.search_sublayers(model, windows, 1, unit, objective=objective, progress=False, batch_size=2)
    reference = sleb.search_sublayers(model, windows, 1, unit, objective=objective, engine="reference",
                                      progress=False)
    assert fast.removal_list == reference.removal_list and len(fast.removal_list) >= 2
    for fast_phase, reference_phase in zip(fast.losses, reference.losses):  # every candidate's loss, not the pick
        assert fast_phase.keys() == reference_phase.keys()
        assert all(fast_phase[c] == pytest.approx(reference_phase[c], rel=1e-4) for c in fast_phase)


def test_the_cosine_ranking_is_llm_drops_similarity_of_each_sublayers_input_and_output(model_dirs, text_file):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, open(text_file).read().splitlines(), nsamples=40, seqlen=16)[:4]
    seen, hooks = {}, []

    def keep(name, index, value):
        seen.setdefault((name, index), []).append(value)
    for index, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: keep("in", i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, out, i=index: keep("attn", i, out[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, out, i=index: keep("mlp", i, out)))
    with torch.no_grad():
        for window in windows:  # Llama's block: h + attn(norm(h)), then + mlp(norm(.)): rebuilt from the parts
            model(input_ids=window[None])
    for hook in hooks:
        hook.remove()
    expected = {}
    for index in range(len(model.model.layers)):
        cos_attn = cos_mlp = 0.0
        for h, a, m in zip(seen[("in", index)], seen[("attn", index)], seen[("mlp", index)]):
            cos_attn += F.cosine_similarity(h, h + a, dim=-1).sum().item()
            cos_mlp += F.cosine_similarity(h + a, h + a + m, dim=-1).sum().item()
        expected[f"{index}.attn"] = 1 - cos_attn / windows.numel()
        expected[f"{index}.mlp"] = 1 - cos_mlp / windows.numel()
    found = sleb.search_sublayers(model, windows, 1, "sublayer", metric="cosine", progress=False)
    assert found.losses[0].keys() == expected.keys()
    assert all(found.losses[0][name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6) for name in expected)
    inner = sorted((n for n in expected if n.split(".")[0] not in ("0", str(len(model.model.layers) - 1))),
                   key=lambda n: expected[n])
    assert found.removal_list == inner[:len(found.removal_list)] and found.weights_removed >= found.budget


def test_an_interrupted_sublayer_search_resumes_to_the_same_list(model_dirs, text_file, tmp_path):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, open(text_file).read().splitlines(), nsamples=40, seqlen=16)[:4]
    whole = sleb.search_sublayers(model, windows, 2, progress=False)
    assert len(whole.removal_list) >= 3
    saved = []

    def stop_after_two(partial):
        saved.append(partial)
        if len(partial.removal_list) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sleb.search_sublayers(model, windows, 2, progress=False, on_phase=stop_after_two)
    resumed = sleb.search_sublayers(model, windows, 2, progress=False, resume=saved[-1])
    assert resumed.removal_list == whole.removal_list and resumed.losses == whole.losses
    assert resumed.weights_removed == whole.weights_removed
    # the command: a results file cut back to its first phase goes on from there with --resume True
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "40", "--seqlen", "16",
            "--num_remove_blocks", "2", "--unit", "sublayer", "--eval_ppl", "False", "--result_folder", str(tmp_path),
            "--result_file", "s.json"]
    assert invoke("sleb", *args).returncode == 0
    record = json.loads((tmp_path / "s.json").read_text())
    search = record["search"]
    first = sublayers.parse(search["removal_list"][0])
    cut = {**search, "status": "searching", "removal_list": search["removal_list"][:1], "losses": search["losses"][:1],
           "phase_seconds": search["phase_seconds"][:1], "weights_removed": sublayers.weights(model, first)}
    (tmp_path / "s.json").write_text(json.dumps({**record, "search": cut}))
    again = invoke("sleb", *args, "--resume", "True")
    assert again.returncode == 0, again.stderr[-2000:]
    finished = json.loads((tmp_path / "s.json").read_text())
    assert finished["removal_list"] == record["removal_list"] and finished["search"]["losses"] == search["losses"]
    other = [("3" if a == "2" and args[i - 1] == "--num_remove_blocks" else a) for i, a in enumerate(args)]
    changed = run("sleb", *other, "--resume", "True")
    assert changed.returncode == 2 and "it was run with --num_remove_blocks 2, not 3" in changed.stderr


@pytest.mark.parametrize("cache", [None, "static"])
def test_a_model_without_an_attention_generates_the_same_with_and_without_its_cache(cache, model_dirs):
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, ["2.attn", "3.mlp", 4])
    assert blocks.num_blocks(model) == 5
    prompt = torch.tensor([[1, 5, 9, 13, 17, 21]])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **({"cache_implementation": cache} if cache else {}), **settings)
    plain = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, plain)
    # and the pruned model is another model than the one with the attention kept
    whole, _ = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(whole, ["3.mlp", 4])
    assert not torch.equal(whole(prompt).logits, model(prompt).logits)


def test_a_removal_list_names_sublayers_once_and_in_blocks_the_model_has(model_dirs):
    model, _ = sleb.load(model_dirs["llama"], device="cpu")
    for bad, message in (([2, "2.attn"], "removes block 2 whole and its attn too"),
                         (["3.mlp", "3.mlp"], "names a sub-layer twice"),
                         (["3.ffn"], "neither a block number nor a sub-layer"),
                         (["9.attn"], "names block 9")):
        with pytest.raises(sleb.UsageError, match=message):
            sleb.remove_blocks(model, bad)
    assert not any(isinstance(m, Absent) for m in model.modules())  # nothing half-done


def test_eval_takes_a_sublayer_list_and_refuses_what_cannot_carry_it_in_one_line(model_dirs, text_file, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--ppl_datasets", f"file:{text_file}", "--seqlen", "32",
            "--result_folder", str(tmp_path)]
    out = invoke("eval", *args, "--removal_list", '["2.attn", "3.mlp", 4]', "--result_file", "e.json")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["removal_list"] == ["2.attn", "3.mlp", 4]
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(model, ["2.attn", "3.mlp", 4])
    ppl = sleb.perplexity(model, tokenizer, f"file:{text_file}", seqlen=32, progress=False)
    assert record["ppl"][f"file:{text_file}"]["ppl"] == pytest.approx(ppl, rel=1e-6)
    refused = run("eval", *args, "--removal_list", '["2.attn"]', "--save_gguf", str(tmp_path / "p.gguf"),
                  "--result_file", "r.json")
    assert refused.returncode == 2 and "copies a GGUF input in llama.cpp's deci layout" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "r.json").exists()
    opt = run("eval", *args[2:], "--model_name", model_dirs["opt"], "--removal_list", '["2.mlp"]', "--save_model",
              str(tmp_path / "opt"), "--result_file", "o.json")
    assert opt.returncode == 2 and "a Llama's; this model is opt" in opt.stderr and "Traceback" not in opt.stderr
    assert not (tmp_path / "o.json").exists()


def test_block_configs_size_the_mlp_as_vllm_reads_it():
    """vLLM sizes a DeciLM MLP from ffn_mult as int(2 * ffn_mult * hidden / 3) rounded up to 256: written where that
    gives the MLP's own size back (SmolLM2, Llama 2 7B), else intermediate_size, which vLLM reads instead."""
    from types import SimpleNamespace

    from sleb import decilm

    def ffn(hidden, intermediate):
        config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=hidden,
                                 intermediate_size=intermediate)
        return decilm.block_configs(config, [0, 1], [sublayers.Sublayer(1, "attn")])
    smol = ffn(576, 1536)
    assert smol[0]["ffn"]["ffn_mult"] == 4.0 and "intermediate_size" not in smol[0]["ffn"]
    assert smol[0]["attention"] == {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 4}
    assert smol[1]["attention"]["no_op"] and not smol[1]["ffn"]["no_op"]
    llama2 = ffn(4096, 11008)[0]["ffn"]
    assert int(2 * llama2["ffn_mult"] * 4096 / 3) == 11008
    assert ffn(32, 64)[0]["ffn"] == {"no_op": False, "replace_with_linear": False, "intermediate_size": 64}


def test_a_saved_sublayer_checkpoint_loads_with_trust_remote_code_as_the_scored_model(model_dirs, text_file, tmp_path):
    """--save_model writes the Nemotron-NAS (DeciLM) layout: the removed sub-layers' tensors absent, one
    block_configs entry per block, and a checkpoint transformers loads with trust_remote_code to the logits and
    greedy text of the model that was scored, and refuses without it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    removal = '["2.attn", "3.mlp", 4]'
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", removal, "--eval_ppl", "False",
                 "--save_model", str(tmp_path / "ckpt"), "--result_folder", str(tmp_path), "--result_file", "e.json")
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["num_hidden_layers"] == 5 and config["head_dim"] > 0
    flags = [(b["attention"]["no_op"], b["ffn"]["no_op"]) for b in config["block_configs"]]
    assert flags == [(False, False), (False, False), (True, False), (False, True), (False, False)]
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    assert not any(n.startswith(("model.layers.2.self_attn.", "model.layers.2.input_layernorm.",
                                 "model.layers.3.mlp.", "model.layers.3.post_attention_layernorm.")) for n in names)
    assert "model.layers.2.mlp.down_proj.weight" in names and "model.layers.3.self_attn.q_proj.weight" in names
    scored, _ = sleb.load(model_dirs["llama"], device="cpu")
    sleb.remove_blocks(scored, ["2.attn", "3.mlp", 4])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.allclose(loaded(prompt).logits, scored(prompt).logits, atol=1e-5)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **settings), scored.generate(prompt, **settings))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=False)


def test_the_search_command_with_unit_attention_writes_the_apis_list(model_dirs, text_file, tmp_path):
    args = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "40", "--seqlen", "16",
            "--num_remove_blocks", "1", "--unit", "attention", "--eval_ppl", "False", "--result_folder",
            str(tmp_path), "--result_file", "s.json"]
    out = invoke("sleb", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "s.json").read_text())
    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.calibration_windows(tokenizer, f"file:{text_file}", nsamples=40, seqlen=16, model=model)
    expected = sleb.search_sublayers(model, windows, 1, "attention", progress=False).removal_list
    assert record["removal_list"] == expected and all(name.endswith(".attn") for name in expected)
    assert record["search"]["status"] == "done" and record["settings"]["unit"] == "attention"
    saved = run("sleb", *args, "--save_model", str(tmp_path / "ckpt"), "--overwrite", "True")
    assert saved.returncode == 0, saved.stderr[-2000:]  # a Llama with sub-layers gone saves (DeciLM layout)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "nemotron-nas"
    ranked = invoke("sleb", *args, "--metric", "cosine", "--result_file", "c.json")
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    expected = sleb.search_sublayers(model, windows, 1, "attention", metric="cosine", progress=False).removal_list
    assert json.loads((tmp_path / "c.json").read_text())["removal_list"] == expected
