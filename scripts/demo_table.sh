#!/usr/bin/env bash
# The paper's metric comparison in miniature, on the shipped demo model, offline on CPU:
# demo test perplexity and the demo zero-shot tasks for dense and 10% / 20% of the blocks removed by
# every metric (random: 3 seeds), each SLEB model then healed with LoRA ("sleb + LoRA" rows, the
# README's demo recipe), and the report with its table and plots.
#   bash scripts/demo_table.sh [OUT_DIR] [--dry-run]
SCRIPT_ARGS="[OUT_DIR]" SCRIPT_MIN_ARGS=0 SCRIPT_MAX_ARGS=1
source "$(dirname "$0")/_common.sh"
OUT="${POSITIONAL[0]:-sleb_results/demo_table}"
EVAL_FLAGS="--ppl_datasets demo --eval_zeroshot True --tasks demo_cloze,demo_order"
EVAL_FLAGS="$EVAL_FLAGS" SEARCH_FLAGS="--dataset demo --nsamples 64" SAVE_SLEB=1 \
  bash scripts/metrics.sh demo "$OUT" "${DRY_FLAG[@]}"
read -r -a EVAL_EXTRA <<< "$EVAL_FLAGS"
for percent in 10 20; do
  run "heal_demo_${percent}.json" "$PY" -m sleb.heal --model_name "$OUT/pruned_demo_${percent}" \
    --output_dir "$OUT/healed_demo_${percent}" --lr 1e-3 --max_steps 250 --warmup_steps 25 --train_batch_size 8 \
    --grad_accum 1 "${EVAL_EXTRA[@]}" --result_folder "$OUT" --result_file "heal_demo_${percent}.json"
done
[ "$DRY_RUN" = 1 ] || "$PY" -m sleb.report "$OUT" --out docs/demo_report/report.md
