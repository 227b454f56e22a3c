#!/usr/bin/env bash
# Every figure that needs a GPU, in one command (planned to fit in 9 minutes on one H100 80 GB):
#
#     bash bench/gpu.sh OUT_DIR
#
# 1. the CUDA tests (pytest -m cuda): fast == reference in float16/bfloat16 on Llama, Gemma 3 and
#    Qwen3-MoE, the pinned-CPU cache, device_map auto, latency's peak memory, bf16 LoRA, QLoRA;
# 2. bench/search_speed.py at the paper's search shape (random Llama-2-7B shape, fp16, 16 windows of
#    2048 tokens, 2 phases, fast vs reference);
# 3. python -m latency on a random 7B-shape model (built from a config, cached in OUT_DIR) with 20% of
#    its blocks removed: prompt 1 x 2048 and generation 64 x (64 + 128), eager and compiled;
# 4. bench/guard.py at the 7B shape (fp16): the reload guard's seconds and peak memory above the model;
# 5. bench/compensate.py at the 7B shape (fp16): --compensate linear and sleb_compensated, time and memory;
# 6. bench/metric_speed.py at a Llama-3-8B shape (bf16, vocabulary 128256, 16 windows of 2048 tokens):
#    sleb --objective kl (2 phases) and evopress --objective kl (3 generations: seconds per generation),
#    the dense distributions held as the top 512 per token (--kl_gb 1 keeps the full vocabulary out);
# then one JSON summary line (also in OUT_DIR/summary.json). Logs and JSON files stay in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-}
if [ -z "$out" ]; then echo "error: usage: bash bench/gpu.sh OUT_DIR" >&2; exit 2; fi
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: bench/gpu.sh needs a CUDA GPU and torch sees none; the CPU figures come from bench/search_speed.py" >&2
  exit 2
fi
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

"$PYTHON" -m pytest -q -m cuda tests -p no:cacheprovider > "$out/tests.log" 2>&1
echo "tests: $(tail -n 1 "$out/tests.log")" >&2

"$PYTHON" -m bench.search_speed --layers 32 --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000 \
  --windows 16 --seqlen 2048 --phases 2 --device cuda --dtype float16 > "$out/search_speed.json" 2> "$out/search_speed.log"
echo "search: $(cat "$out/search_speed.json")" >&2

"$PYTHON" -m bench.guard --cases random --layers 32 --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000 \
  --device cuda --dtype float16 > "$out/guard.json" 2> "$out/guard.log"
echo "guard: $(cat "$out/guard.json")" >&2

"$PYTHON" -m bench.compensate --cases random --layers 32 --hidden 4096 --intermediate 11008 --heads 32 \
  --vocab 32000 --windows 8 --seqlen 2048 --device cuda --dtype float16 > "$out/compensate.json" 2> "$out/compensate.log"
echo "compensate: $(cat "$out/compensate.json")" >&2

"$PYTHON" -m bench.metric_speed --model_name random --layers 32 --hidden 4096 --intermediate 14336 --heads 32 \
  --kv_heads 8 --vocab 128256 --windows 16 --seqlen 2048 --device cuda --dtype bfloat16 --num_remove_blocks 2 \
  --metrics sleb,evopress --objectives kl --kl_gb 1 --evo_generations 3 > "$out/objectives.json" 2> "$out/objectives.log"
echo "objectives: $(cat "$out/objectives.json")" >&2

"$PYTHON" -m bench.random_model "$out/llama-7b-shape" > "$out/random_model.log" 2>&1
for mode in prompt generation; do
  for compiled in False True; do
    flags=(--model_name "$out/llama-7b-shape" --result_folder "$out/latency" --overwrite True --compile "$compiled")
    [ "$mode" = generation ] && flags+=(--generation True)
    [ "$mode" = generation ] && [ "$compiled" = True ] && flags+=(--static_cache True)
    "$PYTHON" -m latency "${flags[@]}" > "$out/latency_${mode}_compile${compiled}.log" 2>&1
    echo "latency $mode compile=$compiled: $(grep '^speedup' "$out/latency_${mode}_compile${compiled}.log")" >&2
  done
done

"$PYTHON" - "$out" <<'PY' | tee "$out/summary.json"
import glob, json, os, re, sys
out = sys.argv[1]
summary = {"tests": open(os.path.join(out, "tests.log")).read().strip().splitlines()[-1:]}
try:
    summary["search"] = json.load(open(os.path.join(out, "search_speed.json")))
except (OSError, ValueError) as error:
    summary["search"] = f"failed: {error}"
for name, key in (("guard", "cases"), ("compensate", "cases"), ("objectives", "runs")):
    try:
        summary[name] = json.load(open(os.path.join(out, f"{name}.json")))[key]
    except (OSError, ValueError, KeyError) as error:
        summary[name] = f"failed: {error}"
summary["latency"] = {}
for path in sorted(glob.glob(os.path.join(out, "latency", "*.json"))):
    record = json.load(open(path))
    key = f"{record['mode']}{'_compiled' if record['settings']['compile'] else ''}"
    summary["latency"][key] = {"speedup": round(record["speedup"], 3), "ideal": round(record["ideal_speedup"], 3),
                               "of_ideal": round(record["speedup_over_ideal"], 3),
                               "dense_ms": round(1e3 * record["dense"]["median_s"], 2),
                               "pruned_ms": round(1e3 * record["pruned"]["median_s"], 2)}
    summary.setdefault("device", record["environment"]["device"])
    summary.setdefault("versions", record["environment"]["versions"])
print(json.dumps(summary))
PY
