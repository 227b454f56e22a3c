#!/usr/bin/env bash
# Paper Table: prompt and generation speedup with 20% of the blocks removed (eager, and compiled).
#   bash scripts/latency.sh meta-llama/Llama-2-7b-hf,meta-llama/Llama-2-13b-hf,meta-llama/Llama-2-70b-hf sleb_results/latency
source "$(dirname "$0")/_common.sh"
for model in "${MODELS[@]}"; do
  name=$(slug "$model")
  run "latency_${name}_prompt.json" "$PY" -m latency --model_name "$model" \
    --result_folder "$OUT" --result_file "latency_${name}_prompt.json"
  run "latency_${name}_generation.json" "$PY" -m latency --model_name "$model" --generation True \
    --result_folder "$OUT" --result_file "latency_${name}_generation.json"
  run "latency_${name}_generation_compiled.json" "$PY" -m latency --model_name "$model" --generation True \
    --static_cache True --compile True --result_folder "$OUT" --result_file "latency_${name}_generation_compiled.json"
done
