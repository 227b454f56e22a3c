#!/usr/bin/env bash
# The paper's metric comparison in miniature, on the shipped demo model, offline on CPU:
# demo test perplexity and the demo zero-shot tasks for dense and 10% / 20% of the blocks removed by
# every metric (random: 3 seeds), each SLEB model then healed with LoRA ("sleb + LoRA" rows, the
# README's demo recipe); SLEB's lists with training-free linear compensation ("sleb + linear"), the
# search that compensates as it goes ("sleb_compensated"), the compensated models healed with the same
# LoRA recipe ("sleb + linear + LoRA"); the objectives and searches of scripts/objectives.sh at 2, 3 and 4
# blocks removed (sleb (kl), evopress (ce), evopress (kl), evopress (ce) + linear); every run but the
# healed ones also measures KL to the dense model on the demo test text; and the report with its table
# and plots.
#   bash scripts/demo_table.sh [OUT_DIR] [--dry-run]
SCRIPT_ARGS="[OUT_DIR]" SCRIPT_MIN_ARGS=0 SCRIPT_MAX_ARGS=1
source "$(dirname "$0")/_common.sh"
OUT="${POSITIONAL[0]:-sleb_results/demo_table}"
HEAL_EVAL_FLAGS="--ppl_datasets demo --eval_zeroshot True --tasks demo_cloze,demo_order"
EVAL_FLAGS="$HEAL_EVAL_FLAGS --eval_kl True"  # a healed checkpoint has no dense model beside it to compare with
EVAL_FLAGS="$EVAL_FLAGS" SEARCH_FLAGS="--dataset demo --nsamples 64" SAVE_SLEB=1 \
  bash scripts/metrics.sh demo "$OUT" "${DRY_FLAG[@]}"
EVAL_FLAGS="$EVAL_FLAGS" SEARCH_FLAGS="--dataset demo --nsamples 64" PERCENTS="10 20 30" \
  bash scripts/objectives.sh demo "$OUT" "${DRY_FLAG[@]}"
read -r -a EVAL_EXTRA <<< "$EVAL_FLAGS"
read -r -a HEAL_EVAL_EXTRA <<< "$HEAL_EVAL_FLAGS"
SEARCH_EXTRA=(--dataset demo --nsamples 64)
HEAL_RECIPE=(--lr 1e-3 --max_steps 250 --warmup_steps 25 --train_batch_size 8 --grad_accum 1)
for percent in 10 20; do
  k=$(remove_count 12 "$percent")
  run "linear_demo_${percent}.json" "$PY" -m sleb --model_name demo --num_remove_blocks "$k" --compensate linear \
    "${SEARCH_EXTRA[@]}" "${EVAL_EXTRA[@]}" --save_model "$OUT/linear_demo_${percent}" --result_folder "$OUT" \
    --result_file "linear_demo_${percent}.json"
  run "compensated_search_demo_${percent}.json" "$PY" -m sleb --model_name demo --num_remove_blocks "$k" \
    --metric sleb_compensated "${SEARCH_EXTRA[@]}" "${EVAL_EXTRA[@]}" --result_folder "$OUT" \
    --result_file "compensated_search_demo_${percent}.json"
  for source in pruned linear; do
    run "heal_${source}_demo_${percent}.json" "$PY" -m sleb.heal --model_name "$OUT/${source}_demo_${percent}" \
      --output_dir "$OUT/healed_${source}_demo_${percent}" "${HEAL_RECIPE[@]}" "${HEAL_EVAL_EXTRA[@]}" \
      --result_folder "$OUT" --result_file "heal_${source}_demo_${percent}.json"
  done
done
[ "$DRY_RUN" = 1 ] || "$PY" -m sleb report "$OUT" --out docs/demo_report/report.md
