"""`python -m eval` end to end, and its bad inputs (those in a subprocess: exit code and stderr)."""

import json
import os

from transformers import AutoModelForCausalLM

from clitools import invoke, run


def test_eval_end_to_end(model_dirs, text_file, tmp_path):
    saved = tmp_path / "pruned"
    out = invoke("eval", "--model_name", model_dirs["opt"], "--removal_list", "[4, 1]",
              "--ppl_datasets", f"file:{text_file}", "--seqlen", "64", "--result_folder", str(tmp_path),
              "--result_file", "r.json", "--save_model", str(saved))
    assert out.returncode == 0, out.stderr
    assert "perplexity (pruned)" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["removal_list"] == [4, 1] and result["num_blocks"] == 6
    ppl = result["ppl"][f"file:{text_file}"]["ppl"]
    assert ppl > 1 and f"{ppl:.3f}" in out.stdout
    assert result["settings"]["seqlen"] == 64 and result["environment"]["versions"]["torch"]
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.config.num_hidden_layers == 4
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary files left
    umask = os.umask(0o022)
    os.umask(umask)  # the run had this one
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's owner-only mode
    assert saved.stat().st_mode & 0o777 == 0o777 & ~umask


def test_eval_accepts_json_string_and_empty_list(model_dirs, text_file, tmp_path):
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", '"[]"',
              "--ppl_datasets", f"file:{text_file}", "--seqlen", "64", "--result_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())["removal_list"] == []


def test_not_a_causal_lm(tmp_path, text_file):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    out = run("eval", "--model_name", str(tmp_path / "bert"), "--ppl_datasets", f"file:{text_file}",
              "--result_folder", str(tmp_path / "results"))
    assert out.returncode == 2
    assert "not a causal language model" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_existing_result_file_needs_overwrite(model_dirs, text_file, tmp_path):
    existing = tmp_path / "r.json"
    existing.write_text('{"kept": true}')
    out = run("eval", "--model_name", model_dirs["llama"], "--ppl_datasets", f"file:{text_file}",
              "--result_folder", str(tmp_path), "--result_file", "r.json")
    assert out.returncode == 2 and "--overwrite" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert existing.read_text() == '{"kept": true}'
