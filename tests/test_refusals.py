"""A finished search is never thrown away by a refusal (issue 41): the list and the results file are the
outcome, exit 0; only a step the user asked for that cannot be carried out (here --save_model, a pruned
hybrid that cannot generate) is refused, in one line, with the list kept in the results and no folder."""

import json

import pytest

from clitools import invoke

# (family, flags under which the search takes every attention block of the tiny model, its attention blocks):
# Nemotron-H has attention at 2 and 5 (5 is the last block, a barrier unless --latter_barrier 0; the search
# takes [1, 2, 3, 5]), Bamba at 1 and 3 (it takes [3, 2, 1]).
HYBRIDS = {"nemotron_h": (["--num_remove_blocks", "4", "--latter_barrier", "0"], {2, 5}),
           "bamba": (["--num_remove_blocks", "3"], {1, 3})}


def _search(family_dirs, text_file, tmp_path, arch, *extra):
    flags, _ = HYBRIDS[arch]
    return invoke("sleb", "--model_name", family_dirs[arch], "--dataset", f"file:{text_file}", "--nsamples", "4",
                  "--seqlen", "32", "--eval_ppl", "False", "--keep_block_kinds", "False", *flags, "--result_folder",
                  str(tmp_path / "results"), "--result_file", "r.json", *extra)


@pytest.mark.parametrize("arch", sorted(HYBRIDS))
def test_a_search_that_takes_every_attention_block_exits_0_with_its_list(arch, family_dirs, text_file, tmp_path):
    out = _search(family_dirs, text_file, tmp_path, arch)
    assert out.returncode == 0, out.stderr[-1500:]
    record = json.loads((tmp_path / "results" / "r.json").read_text())
    assert HYBRIDS[arch][1] <= set(record["removal_list"])  # every attention block went, as the flags allow
    assert record["search"]["status"] == "done"


@pytest.mark.parametrize("arch", sorted(HYBRIDS))
def test_save_model_of_such_a_list_is_one_line_the_list_kept_and_no_folder(arch, family_dirs, text_file, tmp_path):
    out = _search(family_dirs, text_file, tmp_path, arch, "--save_model", str(tmp_path / "saved"))
    assert out.returncode == 2, out.stderr[-1500:]
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot generate" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert "--keep_block_kinds False" not in lines[0] and "--removal_list" not in lines[0]  # advice fits the flags
    record = json.loads((tmp_path / "results" / "r.json").read_text())
    assert HYBRIDS[arch][1] <= set(record["removal_list"])
    assert not (tmp_path / "saved").exists()
