#!/usr/bin/env bash
# Objectives and searches compared at 10%/20%/30% removed: sleb (ce, the paper's), sleb (kl), evopress (ce),
# evopress (kl), and evopress (ce) + linear compensation; every run also measures KL to the dense model
# on the evaluation text (--eval_kl True).
#   bash scripts/objectives.sh meta-llama/Llama-2-7b-hf sleb_results/objectives
# EVAL_FLAGS go to every run, SEARCH_FLAGS to the searches (as in scripts/metrics.sh; the sleb (ce) runs
# share metrics.sh's file names, so a folder holding those runs reuses them). "evopress + linear" takes the
# finished evopress (ce) search (its file copied, then --resume True), so the search does not run twice.
source "$(dirname "$0")/_common.sh"
read -r -a EVAL_EXTRA <<< "${EVAL_FLAGS:-}"
read -r -a SEARCH_EXTRA <<< "${SEARCH_FLAGS:-}"

# run_from SOURCE RESULT COMMAND...: as run, but RESULT starts as a copy of the finished search in SOURCE,
# which COMMAND (with --resume True) takes up.
run_from() {
  local source="$1" result="$2"; shift 2
  printf '%q ' "$@"; echo
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  if [ -f "$OUT/$result" ]; then echo "  (skipped: $OUT/$result exists)"; return 0; fi
  cp "$OUT/$source" "$OUT/$result"
  "$@" || { rm -f "$OUT/$result"; return 1; }
}

for model in "${MODELS[@]}"; do
  depth=$(depth_of "$model")
  name=$(slug "$model")
  for percent in ${PERCENTS:-10 20 30}; do
    k=$(remove_count "$depth" "$percent")
    common=(--model_name "$model" --num_blocks "$depth" --num_remove_blocks "$k" "${EVAL_EXTRA[@]}"
            "${SEARCH_EXTRA[@]}")
    run "metrics_${name}_${percent}_sleb_seed0.json" "$PY" -m sleb "${common[@]}" --metric sleb \
      --result_folder "$OUT" --result_file "metrics_${name}_${percent}_sleb_seed0.json"
    for search in sleb:kl evopress:ce evopress:kl; do
      metric=${search%:*} objective=${search#*:}
      file="objectives_${name}_${percent}_${metric}_${objective}.json"
      run "$file" "$PY" -m sleb "${common[@]}" --metric "$metric" --objective "$objective" \
        --result_folder "$OUT" --result_file "$file"
    done
    evo="objectives_${name}_${percent}_evopress_ce.json"
    linear="objectives_${name}_${percent}_evopress_ce_linear.json"
    run_from "$evo" "$linear" "$PY" -m sleb "${common[@]}" --metric evopress --objective ce --compensate linear \
      --resume True --result_folder "$OUT" --result_file "$linear"
  done
done
