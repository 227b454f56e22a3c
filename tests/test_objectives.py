"""Issue 31: the KL-to-dense objective and EvoPress's evolutionary search, checked on models small enough to
try every subset, and against a greedy KL loop written here independently of the engines."""

import dataclasses
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import sleb
import tiny
from clitools import invoke
from sleb import objectives
from sleb.engines import ReferenceEngine
from sleb.errors import UsageError
from sleb.evopress import Evolution

K = 3  # of 8 blocks; barriers 1 and 1 leave blocks 1..6, 20 subsets


@pytest.fixture(scope="module")
def eight_blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("eight")
    return {arch: tiny.make_model_dir(root / arch, arch, layers=8) for arch in ("llama", "qwen2")}


def _windows(tokenizer, seed=2):
    return tokenizer(tiny.sample_text(80, seed=seed), return_tensors="pt").input_ids[:, :256].view(4, 64)


def _exhaustive(model, windows, goal) -> dict:
    engine = ReferenceEngine(model, windows, goal)
    return {subset: engine.loss(list(subset)) for subset in itertools.combinations(range(1, 7), K)}


# Calibration text where the greedy ce list is not the best set (greedy [1, 5, 6] vs {1, 3, 4} on the llama,
# [1, 2, 5] vs {1, 4, 5} on the qwen2): evopress must improve on its greedy start. Under kl the greedy list
# is the best set on these random models, so the evolution is also run from random sets only.
TEXT_SEED = {"llama": 2, "qwen2": 7}


@pytest.mark.parametrize("greedy_start", [True, False])
@pytest.mark.parametrize("objective", ["ce", "kl"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_evopress_finds_the_exhaustive_best_set(arch, objective, greedy_start, eight_blocks):
    model, tokenizer = sleb.load(eight_blocks[arch], device="cpu")
    windows = _windows(tokenizer, seed=TEXT_SEED[arch])
    goal = objectives.build(objective, model, windows, progress=False)
    every = _exhaustive(model, windows, goal)
    best = min(every, key=lambda subset: (every[subset], subset))
    evolution = Evolution(greedy_start=greedy_start, initial=1)  # one random start: the generations do the work
    found = sleb.search(model, windows, K, metric="evopress", objective=objective, evolution=evolution,
                        progress=False)
    assert tuple(found.removal_list) == best, (found.removal_list, best)
    assert found.generations[-1]["value"] == pytest.approx(every[best], rel=1e-5)
    assert len(found.generations) == 1 + math.ceil(K * (8 - K) / 1.5)
    start = found.generations[0]
    if greedy_start:
        assert found.generations[-1]["value"] <= start["greedy_value"]  # never worse than greedy
        greedy = sleb.search(model, windows, K, objective=objective, progress=False).removal_list
        assert start["greedy"] == sorted(greedy)
        if objective == "ce":
            assert tuple(sorted(greedy)) != best  # the data above: the evolution had to find a better set
    else:
        assert start["greedy"] is None and tuple(start["best"]) != best  # it started elsewhere and moved
    values = [g["value"] for g in found.generations]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))  # elitism: the parent never worsens


def _dense_log_probs(model, windows):
    with torch.inference_mode():
        return F.log_softmax(model(input_ids=windows, use_cache=False).logits[:, :-1].float(), dim=-1)


def _greedy_kl(model, windows, k) -> list:
    """The paper's loop, written here: each phase skips every candidate between the barriers in turn and
    takes the smallest sum over windows of mean KL(dense || candidate) x seqlen, ties to the lowest position."""
    dense = _dense_log_probs(model, windows)
    seqlen = windows.shape[1]
    removed = []
    for _ in range(k):
        alive = [i for i in range(8) if i not in removed]
        scores = {}
        for position in range(1, len(alive) - 1):
            with sleb.skipping(model, removed + [alive[position]]):
                log_q = _dense_log_probs(model, windows)
            kl = (dense.exp() * (dense - log_q)).sum(-1)  # (windows, seqlen - 1)
            scores[position] = float((kl.mean(dim=1) * seqlen).sum())
        removed.append(alive[min(scores, key=lambda p: (scores[p], p))])
    return removed


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_sleb_with_kl_is_the_greedy_loop_on_kl(engine, eight_blocks):
    model, tokenizer = sleb.load(eight_blocks["llama"], device="cpu")
    windows = _windows(tokenizer)
    found = sleb.search(model, windows, K, objective="kl", engine=engine, progress=False)
    assert found.removal_list == _greedy_kl(model, windows, K)
    assert found.objective == {"objective": "kl", "kl_vocabulary": "full", "kl_memory_mb": 0.1}


def test_fast_equals_reference_under_kl_loss_by_loss(eight_blocks):
    model, tokenizer = sleb.load(eight_blocks["qwen2"], device="cpu")
    windows = _windows(tokenizer, seed=5)
    fast = sleb.search(model, windows, K, objective="kl", progress=False)
    reference = sleb.search(model, windows, K, objective="kl", engine="reference", progress=False)
    assert fast.removal_list == reference.removal_list
    for row_fast, row_reference in zip(fast.losses, reference.losses):
        for a, b in zip(row_fast, row_reference):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-5))


def test_top_k_keeps_the_rest_as_one_bucket(eight_blocks):
    """A budget too small for the whole vocabulary keeps the top K: the KL is then exactly the KL of both
    distributions coarsened to those K tokens plus one bucket for the rest."""
    model, tokenizer = sleb.load(eight_blocks["llama"], device="cpu")
    windows = _windows(tokenizer)
    full_bytes = windows.shape[0] * (windows.shape[1] - 1) * tiny.VOCAB * 4
    goal = objectives.KLToDense(model, windows, top_k=16, budget_gb=full_bytes / 2 / 2**30, progress=False)
    assert goal.top_k == 16 and goal.record()["kl_vocabulary"] == "top 16 + rest"
    dense = _dense_log_probs(model, windows)
    with sleb.skipping(model, [3]), torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    log_q = F.log_softmax(logits, dim=-1)
    top = dense.topk(16, dim=-1).indices
    p = torch.cat([dense.exp().gather(-1, top), 1 - dense.exp().gather(-1, top).sum(-1, keepdim=True)], -1)
    q = torch.cat([log_q.exp().gather(-1, top), 1 - log_q.exp().gather(-1, top).sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - q.log())).sum(-1).sum(-1)
    torch.testing.assert_close(goal.chunk_sums(logits, list(range(4)), 0, 63), expected, rtol=1e-4, atol=1e-4)
    full = objectives.KLToDense(model, windows, progress=False).chunk_sums(logits, list(range(4)), 0, 63)
    assert (expected <= full + 1e-5).all()  # coarsening never raises a KL


def test_evopress_is_reproducible_and_resumes_from_any_generation(eight_blocks):
    model, tokenizer = sleb.load(eight_blocks["qwen2"], device="cpu")
    windows = _windows(tokenizer)
    evolution = Evolution(generations=6, offspring=8, initial=8)
    saved = []
    whole = sleb.search(model, windows, K, metric="evopress", evolution=evolution, seed=3, progress=False,
                        on_phase=lambda partial: saved.append(partial))
    again = sleb.search(model, windows, K, metric="evopress", evolution=evolution, seed=3, progress=False)
    assert whole.generations == [{**g, "seconds": h["seconds"]} for g, h in zip(again.generations, whole.generations)]
    partial = saved[3]  # killed after generation 3
    assert partial.status == "searching" and len(partial.generations) == 4 and partial.removal_list == []
    resumed = sleb.search(model, windows, K, metric="evopress", evolution=evolution, seed=3, progress=False,
                          resume=partial)
    assert resumed.removal_list == whole.removal_list
    assert [g["best"] for g in resumed.generations] == [g["best"] for g in whole.generations]
    # the greedy list given (found before on the same windows) takes the search's path exactly
    given = dataclasses.replace(evolution, start=tuple(whole.generations[0]["greedy"]))
    kept = []
    started = sleb.search(model, windows, K, metric="evopress", evolution=given, seed=3, progress=False,
                          on_phase=lambda partial: kept.append(json.dumps(partial.to_dict())))
    assert [g["best"] for g in started.generations] == [g["best"] for g in whole.generations]
    read_back = sleb.SearchResult.from_dict(json.loads(kept[2]))  # as a results file keeps it
    resumed = sleb.search(model, windows, K, metric="evopress", evolution=given, seed=3, progress=False,
                          resume=read_back)
    assert [g["best"] for g in resumed.generations] == [g["best"] for g in whole.generations]
    with pytest.raises(UsageError, match="is not 3 distinct candidate blocks"):
        sleb.search(model, windows, K, metric="evopress", progress=False,
                    evolution=dataclasses.replace(evolution, start=(0, 3, 4)))  # block 0 is a barrier


def test_an_objective_for_a_metric_that_scores_no_loss_is_one_line(model_dirs, text_file, tmp_path):
    out = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--metric", "cosine",
                 "--objective", "kl", "--result_folder", str(tmp_path))
    assert out.returncode == 2 and "applies to the metrics that score by calibration loss" in out.stderr, out.stderr


def test_kl_to_dense_measures_the_pruned_model_against_the_dense_one(eight_blocks):
    model, tokenizer = sleb.load(eight_blocks["llama"], device="cpu")
    windows = _windows(tokenizer, seed=7)
    dense = sleb.dense_distributions(model, windows, progress=False)
    assert sleb.kl_to_dense(model, dense, progress=False) == pytest.approx(0.0, abs=1e-6)  # nothing removed yet
    before = _dense_log_probs(model, windows)
    sleb.remove_blocks(model, [2, 5])
    after = _dense_log_probs(model, windows)
    expected = float((before.exp() * (before - after)).sum(-1).mean())
    assert sleb.kl_to_dense(model, dense, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3  # the removal moved the model: the check above is not 0 == 0


def test_eval_and_sleb_report_kl_to_dense_on_each_evaluation_set(model_dirs, text_file, tmp_path):
    flags = ["--model_name", model_dirs["llama"], "--ppl_datasets", f"file:{text_file}", "--seqlen", "32",
             "--eval_kl", "True", "--result_folder", str(tmp_path)]
    out = invoke("eval", "--removal_list", "[2]", *flags, "--result_file", "eval.json")
    assert out.returncode == 0, out.stderr
    assert "KL to dense (nats/token)" in out.stdout
    record = json.loads((tmp_path / "eval.json").read_text())
    kl = record["kl_to_dense"][f"file:{text_file}"]
    assert kl["unit"] == "nats per token" and kl["vocabulary"] == "full" and kl["kl"] > 0

    model, tokenizer = sleb.load(model_dirs["llama"], device="cpu")
    windows = sleb.evaluation_windows(tokenizer, f"file:{text_file}", 32, model=model)
    dense = sleb.dense_distributions(model, windows, progress=False)
    sleb.remove_blocks(model, [2])
    assert kl["kl"] == pytest.approx(sleb.kl_to_dense(model, dense, progress=False), rel=1e-4)

    searched = invoke("sleb", *flags, "--dataset", f"file:{text_file}", "--nsamples", "20", "--num_remove_blocks",
                      "1", "--result_file", "search.json")
    assert searched.returncode == 0, searched.stderr
    record = json.loads((tmp_path / "search.json").read_text())
    assert record["kl_to_dense"][f"file:{text_file}"]["kl"] > 0


def test_kl_without_an_evaluation_set_is_one_line(model_dirs, tmp_path):
    out = invoke("eval", "--model_name", model_dirs["llama"], "--removal_list", "[2]", "--eval_ppl", "False",
                 "--eval_kl", "True", "--result_folder", str(tmp_path))
    assert out.returncode == 2 and "--eval_kl True measures KL on the --ppl_datasets" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def _single_removal_kl(model, windows) -> dict:
    """Each candidate's KL sum (mean over positions x seqlen, summed over windows) with only it removed."""
    dense = _dense_log_probs(model, windows)
    scores = {}
    for block in range(1, 7):
        with sleb.skipping(model, [block]):
            log_q = _dense_log_probs(model, windows)
        scores[block] = float(((dense.exp() * (dense - log_q)).sum(-1).mean(dim=1) * windows.shape[1]).sum())
    return scores


def test_oneshot_and_compensated_searches_take_the_kl_objective(eight_blocks):
    model, tokenizer = sleb.load(eight_blocks["llama"], device="cpu")
    windows = _windows(tokenizer, seed=3)
    scores = _single_removal_kl(model, windows)
    oneshot = sleb.search(model, windows, K, metric="sleb_oneshot", objective="kl", progress=False)
    assert oneshot.removal_list == sorted(scores, key=lambda b: (scores[b], b))[:K]
    assert oneshot.losses[0][1:7] == pytest.approx([scores[b] for b in range(1, 7)], rel=1e-4)
    lists = []
    for engine in ("fast", "reference"):
        fresh, _ = sleb.load(eight_blocks["llama"], device="cpu")  # a compensated search folds maps in
        lists.append(sleb.search(fresh, windows, K, metric="sleb_compensated", objective="kl", engine=engine,
                                 progress=False).removal_list)
    assert lists[0] == lists[1]
    ce, _ = sleb.load(eight_blocks["llama"], device="cpu")
    fresh, _ = sleb.load(eight_blocks["llama"], device="cpu")
    first_kl = sleb.search(fresh, windows, 1, metric="sleb_compensated", objective="kl", progress=False).losses[0]
    first_ce = sleb.search(ce, windows, 1, metric="sleb_compensated", progress=False).losses[0]
    assert first_kl != pytest.approx(first_ce)  # the objective reached the compensated scoring


def test_evopress_resumes_from_its_results_file(model_dirs, text_file, tmp_path):
    flags = ["--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "40", "--seqlen",
             "32", "--num_remove_blocks", "2", "--metric", "evopress", "--evo_generations", "4", "--evo_offspring", "6",
             "--eval_ppl", "False", "--result_folder", str(tmp_path), "--result_file", "evo.json"]
    assert invoke("sleb", *flags).returncode == 0
    whole = json.loads((tmp_path / "evo.json").read_text())
    cut = {key: whole[key] for key in ("command", "settings", "environment", "dtype", "placement", "num_blocks",
                                       "calibration_windows", "seqlen")}
    cut["search"] = {**whole["search"], "status": "searching", "removal_list": [],
                     "generations": whole["search"]["generations"][:2]}  # as saved after generation 1
    (tmp_path / "evo.json").write_text(json.dumps(cut))
    resumed = invoke("sleb", *flags, "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads((tmp_path / "evo.json").read_text())["search"]
    assert again["removal_list"] == whole["search"]["removal_list"]
    assert [g["best"] for g in again["generations"]] == [g["best"] for g in whole["search"]["generations"]]
    assert again["generations"][:2] == whole["search"]["generations"][:2]  # the saved generations are kept as they were

    # A saved parent the run itself never had is taken up as it stands: the resume reads the file.
    other = next([a, b] for a, b in itertools.combinations(range(1, 5), 2)
                 if [a, b] != whole["search"]["generations"][1]["best"])
    cut["search"]["generations"] = [dict(g) for g in whole["search"]["generations"][:2]]
    cut["search"]["generations"][1].update(best=other, value=1e9)
    (tmp_path / "evo.json").write_text(json.dumps(cut))
    assert invoke("sleb", *flags, "--resume", "True").returncode == 0
    taken = json.loads((tmp_path / "evo.json").read_text())["search"]["generations"]
    assert taken[1]["best"] == other and taken[2]["value"] < 1e9
