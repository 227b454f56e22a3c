"""`python -m sleb` end to end, resume after an interruption, and its bad inputs."""

import dataclasses
import json

import pytest

from sleb import run_search as run_search_module
from sleb import metrics
from sleb.settings import SearchSettings
from clitools import invoke


def test_sleb_end_to_end(model_dirs, text_file, tmp_path):
    out = invoke("sleb", "--model_name", model_dirs["llama"], "--dataset", f"file:{text_file}", "--nsamples", "60",
              "--seqlen", "32", "--num_remove_blocks", "2", "--ppl_datasets", f"file:{text_file}",
              "--result_folder", str(tmp_path), "--result_file", "s.json", "--plot", "True")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "s.json").read_text())
    chosen = result["search"]["removal_list"]
    assert f"removal list: {chosen}" in out.stdout and "perplexity (pruned, 4 blocks)" in out.stdout
    assert result["search"]["status"] == "done" and result["search"]["engine"] == "fast"
    assert len(result["search"]["losses"]) == 2 and len(result["search"]["losses"][0]) == 6
    assert result["settings"]["num_blocks"] == 6 and result["settings"]["num_remove_blocks"] == 2
    assert (tmp_path / "s_heatmap.png").stat().st_size > 0 and (tmp_path / "s_loss.png").stat().st_size > 0
    assert "phase 1/2" in out.stderr  # progress bar


def test_resume_after_interruption_reaches_the_same_answer(model_dirs, text_file, tmp_path, monkeypatch):
    settings = dict(model_name=model_dirs["llama"], dataset=f"file:{text_file}", nsamples=60, seqlen=32,
                    num_remove_blocks=4, early_barrier=1, latter_barrier=0, eval_ppl=False,
                    result_folder=str(tmp_path))
    whole = run_search_module.run(SearchSettings(**settings, result_file="whole.json"))

    real_greedy = metrics.METRICS["sleb"].run

    def interrupted_greedy(job, state):
        save = job.on_phase

        def save_then_stop(state):
            save(state)
            if len(state.removal_list) == 2:
                raise KeyboardInterrupt
        job.on_phase = save_then_stop
        return real_greedy(job, state)

    monkeypatch.setitem(metrics.METRICS, "sleb", dataclasses.replace(metrics.METRICS["sleb"], run=interrupted_greedy))
    with pytest.raises(KeyboardInterrupt):
        run_search_module.run(SearchSettings(**settings, result_file="part.json"))
    partial = json.loads((tmp_path / "part.json").read_text())
    assert partial["search"]["status"] == "searching" and len(partial["search"]["removal_list"]) == 2

    monkeypatch.setitem(metrics.METRICS, "sleb", dataclasses.replace(metrics.METRICS["sleb"], run=real_greedy))
    resumed = run_search_module.run(SearchSettings(**settings, result_file="part.json", resume=True))
    assert resumed["search"]["removal_list"] == whole["search"]["removal_list"]
    assert resumed["search"]["losses"] == whole["search"]["losses"]

    changed = dataclasses.replace(SearchSettings(**settings, result_file="part.json", resume=True), seed=1)
    with pytest.raises(Exception, match="--seed"):
        run_search_module.run(changed)
