"""The bad-input matrix: every entry module, each mistake -> one stderr line, exit code 2, nothing written."""

import pytest

from clitools import assert_bad_input, run

# (module, flags over the module's base flags, text the one error line must contain)
MATRIX = [
    # eval
    ("eval", ["--model_name", "/nonexistent/model"], "does not exist"),
    ("eval", ["--model_name", "not-an-org/not-a-model"], "hub"),
    ("eval", ["--removal_list", "[1, x]"], "neither a block number nor a sub-layer"),
    ("eval", ["--removal_list", "[99]"], "index 99"),
    ("eval", ["--removal_list", "[2, 2]"], "twice"),
    ("eval", ["--removal_list", "[0, 1, 2, 3, 4, 5]"], "all 6"),
    ("eval", ["--ppl_datasets", "imaginary"], "unknown data set"),
    ("eval", ["--ppl_datasets", "wikitext2"], "not available"),
    ("eval", ["--ppl_datasets", "file:/nonexistent.txt"], "does not exist"),
    ("eval", ["--result_folder", "/proc/forbidden"], "result folder"),
    ("eval", ["--seqlen", "abc"], "integer"),
    ("eval", ["--no_such_flag", "1"], "unknown flag"),
    ("eval", ["--dtype", "float8"], "--dtype"),
    ("eval", ["--device_map", "{not json"], "JSON"),
    ("eval", ["--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks", "no_such_task"], "unknown task"),
    ("eval", ["--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks", "piqa"], "demo_cloze"),
    ("eval", ["--eval_ppl", "False", "--eval_zeroshot", "True", "--tasks", "demo_cloze", "--limit", "0"],
     "--limit"),
    # sleb
    ("sleb", ["--num_remove_blocks", "4"], "below"),
    ("sleb", ["--num_blocks", "7"], "has 6 blocks"),
    ("sleb", ["--early_barrier", "-1"], "barriers"),
    ("sleb", ["--early_barrier", "3", "--latter_barrier", "3"], "no candidate"),
    ("sleb", ["--metric", "magic"], "unknown --metric"),
    ("sleb", ["--engine", "warp"], "unknown --engine"),
    ("sleb", ["--dataset", "nowhere"], "unknown data set"),
    ("sleb", ["--nsamples", "0"], "--nsamples"),
    ("sleb", ["--resume", "True", "--overwrite", "True"], "pass one"),
    ("sleb", ["--resume", "True"], "does not exist"),
    ("sleb", ["--eval_zeroshot", "True", "--tasks", "demo_cloze,no_such_task"], "unknown task"),
    ("sleb", ["--objective", "entropy"], "unknown --objective"),
    ("sleb", ["--metric", "angular", "--objective", "kl"], "score by calibration loss"),
    ("sleb", ["--objective", "kl", "--kl_top_k", "0"], "--kl_top_k"),
    ("sleb", ["--objective", "kl", "--kl_gb", "-1"], "--kl_gb"),
    ("sleb", ["--kl_top_k", "64"], "apply to --objective kl or --eval_kl"),
    ("sleb", ["--evo_generations", "3"], "add --metric evopress"),
    ("sleb", ["--metric", "evopress", "--evo_first_stage_share", "0"], "--evo_first_stage_share"),
    ("sleb", ["--metric", "evopress", "--evo_offspring", "0"], "--evo_offspring"),
    ("sleb", ["--metric", "evopress", "--evo_greedy_start", "False", "--evo_initial", "0"], "--evo_initial"),
    ("sleb", ["--eval_kl", "True", "--eval_ppl", "False"], "--ppl_datasets"),
    ("eval", ["--kl_gb", "2"], "apply to --objective kl or --eval_kl"),
    ("eval", ["--dense_model", "demo"], "not one sleb pruned"),
    # latency
    ("latency", ["--removal_list", "[9]"], "index 9"),
    ("latency", ["--batch_size", "0"], "--batch_size"),
    ("latency", ["--prompt_len", "-3"], "--prompt_len"),
    ("latency", ["--generation", "True", "--prompt_len", "250", "--new_tokens", "10"], "positions"),
    ("latency", ["--repeats", "0"], "--repeats"),
    ("latency", ["--new_tokens", "5"], "--generation"),
]


@pytest.mark.parametrize("module, args, message", MATRIX, ids=[f"{m}:{' '.join(a)}" for m, a, _ in MATRIX])
def test_bad_input(module, args, message, model_dirs, text_file, tmp_path):
    results = tmp_path / "results"
    base = {"--model_name": model_dirs["llama"], "--result_folder": str(results)}
    if module in ("eval", "sleb"):
        base.update({"--ppl_datasets": f"file:{text_file}", "--seqlen": "32"})
    if module == "sleb":
        base["--dataset"] = f"file:{text_file}"
    # The first entry of each module runs as a user runs it, in a subprocess (exit code, every stderr line);
    # the rest go through the same cli(argv) in this process, which saves an interpreter start each.
    in_process = next(entry for entry in MATRIX if entry[0] == module) != (module, args, message)
    assert_bad_input(module, base, args, message, results, in_process=in_process)


@pytest.mark.parametrize("module", ["sleb", "eval", "latency"])
@pytest.mark.parametrize("where", ["first", "after a value"])
def test_stray_argument_is_one_line(module, where, model_dirs, tmp_path):
    flags = ["--model_name", model_dirs["llama"], "--result_folder", str(tmp_path)]
    out = run(module, *(["extra"] + flags if where == "first" else flags + ["extra"]))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unexpected argument 'extra'" in lines[0], out.stderr
    assert not list(tmp_path.iterdir())
