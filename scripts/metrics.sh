#!/usr/bin/env bash
# Paper Table: removal metrics compared (sleb, sleb_oneshot, cosine, angular, random x 3 seeds) at 10%/20%.
#   bash scripts/metrics.sh meta-llama/Llama-2-7b-hf sleb_results/metrics
# Extra flags: EVAL_FLAGS go to every run (e.g. --ppl_datasets demo), SEARCH_FLAGS to the searches only
# (e.g. --dataset demo --nsamples 64), as scripts/demo_table.sh does. SAVE_SLEB=1 also saves each sleb
# run's pruned checkpoint to OUT/pruned_<model>_<percent> (for healing).
source "$(dirname "$0")/_common.sh"
read -r -a EVAL_EXTRA <<< "${EVAL_FLAGS:-}"
read -r -a SEARCH_EXTRA <<< "${SEARCH_FLAGS:-}"
for model in "${MODELS[@]}"; do
  depth=$(depth_of "$model")
  name=$(slug "$model")
  run "metrics_${name}_dense.json" "$PY" -m eval --model_name "$model" --removal_list '[]' \
    "${EVAL_EXTRA[@]}" --result_folder "$OUT" --result_file "metrics_${name}_dense.json"
  for percent in 10 20; do
    k=$(remove_count "$depth" "$percent")
    for metric in sleb sleb_oneshot cosine angular random:0 random:1 random:2; do
      seed=0
      case "$metric" in random:*) seed=${metric#random:}; metric=random ;; esac
      file="metrics_${name}_${percent}_${metric}_seed${seed}.json"
      save=()
      [ "$metric" = sleb ] && [ -n "${SAVE_SLEB:-}" ] && save=(--save_model "$OUT/pruned_${name}_${percent}")
      run "$file" "$PY" -m sleb --model_name "$model" --num_blocks "$depth" --num_remove_blocks "$k" \
        --metric "$metric" --seed "$seed" "${EVAL_EXTRA[@]}" "${SEARCH_EXTRA[@]}" "${save[@]}" --result_folder "$OUT" \
        --result_file "$file"
    done
  done
done
