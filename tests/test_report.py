"""The paper scripts' dry runs print valid commands; the report reads a folder of tiny runs."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from clitools import ROOT, invoke, run
from sleb.cli import parse_settings
from sleb.settings import EvalSettings, HealSettings, LatencySettings, SearchSettings

SETTINGS = {"sleb": SearchSettings, "eval": EvalSettings, "latency": LatencySettings, "sleb.heal": HealSettings}
SCRIPTS = ["ppl.sh", "zeroshot.sh", "latency.sh", "metrics.sh", "objectives.sh", "demo_table.sh", "heal.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_valid_commands(script, tmp_path):
    models = [] if script == "demo_table.sh" else ["facebook/opt-6.7b,meta-llama/Llama-2-70b-hf"]
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--dry-run", *models, str(tmp_path)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    assert len(commands) >= 2 and not list(tmp_path.iterdir())  # nothing ran
    for command in commands:
        assert command[1] == "-m" and command[2] in SETTINGS, command
        flags = dict(zip([a[2:] for a in command[3::2]], command[4::2]))
        assert all(a.startswith("--") for a in command[3::2]), command
        typed = {name: _typed(value) for name, value in flags.items()}
        parse_settings(SETTINGS[command[2]], typed)  # raises on an unknown flag or a wrong type
        if script == "ppl.sh" and "Llama-2-70b-hf" in flags["model_name"]:
            assert flags["num_blocks"] == "80" and flags["num_remove_blocks"] in ("8", "16")


def _typed(value: str):
    import fire.parser

    return fire.parser.DefaultParseValue(value)


def test_script_without_arguments_says_how(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "ppl.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_option_like_argument_is_refused_not_run(script, tmp_path):
    # A misspelt --dry-run must never become OUT_DIR and start the full table.
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--dryrun", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 2 and "unknown option --dryrun" in out.stderr and not out.stdout
    assert not (tmp_path / "out").exists() and not os.path.exists(os.path.join(ROOT, "--dryrun"))


def test_report_tables_plots_and_skipped_files(model_dirs, text_file, tmp_path):
    results = tmp_path / "results"
    common = ["--model_name", model_dirs["llama"], "--ppl_datasets", f"file:{text_file}", "--seqlen", "32",
              "--result_folder", str(results)]
    for args in (["eval", "--removal_list", "[]", "--eval_zeroshot", "True", "--tasks", "demo_order", "--limit", "4"],
                 ["sleb", "--dataset", f"file:{text_file}", "--nsamples", "40", "--num_remove_blocks", "1"],
                 ["sleb", "--dataset", f"file:{text_file}", "--nsamples", "20", "--num_remove_blocks", "1"],
                 ["sleb", "--dataset", f"file:{text_file}", "--nsamples", "40", "--num_remove_blocks", "2",
                  "--metric", "cosine"],
                 ["sleb", "--dataset", f"file:{text_file}", "--nsamples", "20", "--num_remove_blocks", "1",
                  "--metric", "evopress", "--objective", "kl", "--evo_generations", "2", "--evo_offspring", "4",
                  "--evo_initial", "4", "--eval_kl", "True"]):
        assert invoke(args[0], *args[1:], *common).returncode == 0
    latency = invoke("latency", "--model_name", model_dirs["llama"], "--prompt_len", "16", "--repeats", "1",
                  "--warmup", "0", "--result_folder", str(results))
    assert latency.returncode == 0, latency.stderr
    (results / "foreign.json").write_text(json.dumps({"accuracy": 1}))
    (results / "pruned").mkdir()  # a saved checkpoint beside the results: its JSON files are not results
    (results / "pruned" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (results / "broken.json").write_text("{not json")

    out = run("sleb", "report", str(results), "--out", str(tmp_path / "report" / "report.md"))
    assert out.returncode == 0, out.stderr
    warnings = out.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping") for w in warnings)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "demo_order acc (%) | zero-shot mean acc (%) |" in report
    assert "| KL to dense " in report and "| search (s) | removed blocks |" in report
    dense_row = next(line for line in report.splitlines() if line.startswith("| llama | 0/6 (0%) | dense |"))
    assert dense_row.split("|")[-4].strip() == dense_row.split("|")[-5].strip() != "-"  # one task: mean == task
    assert dense_row.split("|")[-2].strip() == dense_row.split("|")[-3].strip() == "-"  # nothing removed or searched
    evo_row = next(line for line in report.splitlines() if line.startswith("| llama | 1/6 (17%) | evopress (kl) |"))
    evo_result = json.loads(next(results.glob("sleb_*_evopress_kl_remove1of6_*.json")).read_text())
    cells = [cell.strip() for cell in evo_row.split("|")]
    assert cells[-2] == str(evo_result["removal_list"]) and float(cells[-3]) == pytest.approx(
        evo_result["times"]["search_s"], abs=0.06)
    assert f"{evo_result['kl_to_dense'][f'file:{text_file}']['kl']:.4f}" in cells  # the KL column
    # Against sleb's list of the same count and calibration (20 rows): which blocks, and the perplexity change
    sleb_20 = json.loads(next(results.glob("sleb_*_sleb_remove1of6_*_n20_*.json")).read_text())
    against = next(line for line in report.split("## Against the paper's sleb list")[1].splitlines()
                   if line.startswith("| llama | 1 | evopress (kl) |"))
    cells = [cell.strip() for cell in against.split("|")]
    name = f"file:{text_file}"
    assert cells[5] == str(sleb_20["removal_list"])
    assert cells[6] == ("same set" if evo_result["removal_list"] == sleb_20["removal_list"] else
                        f"-{sleb_20['removal_list']} +{evo_result['removal_list']}")
    assert cells[7] == f"{evo_result['ppl'][name]['ppl'] - sleb_20['ppl'][name]['ppl']:+.2f}"
    # Two searches that differ only in their calibration rows are two rows, not one average.
    sleb_rows = [line for line in report.splitlines() if line.startswith("| llama | 1/6 (17%) | sleb |")]
    assert len(sleb_rows) == 2 and "mean of" not in report
    for nsamples in (20, 40):
        sleb_result = json.loads(next(results.glob(f"sleb_*_sleb_remove1of6_*_n{nsamples}_*.json")).read_text())
        row = next(line for line in sleb_rows if f"{nsamples} rows" in line)
        assert row.split("|")[-2].strip() == str(sleb_result["search"]["removal_list"])
    assert "| llama | 1/6 (17%) | sleb |" in report and "| llama | 2/6 (33%) | cosine |" in report
    assert "## Latency" in report and "| llama | prompt |" in report
    pngs = list((tmp_path / "report").glob("*.png"))
    assert {p.name for p in pngs} >= {"report_ppl_llama.png", "report_speedup.png"}
    assert any(p.name.endswith("_heatmap.png") for p in pngs)
    assert all(p.stat().st_size > 1000 for p in pngs)
