#!/usr/bin/env bash
# The paper's metric comparison in miniature, on the shipped demo model, offline on CPU:
# demo test perplexity and the demo zero-shot tasks for dense and 10% / 20% of the blocks removed by
# every metric (random: 3 seeds), then the report with its table and plots.
#   bash scripts/demo_table.sh [OUT_DIR] [--dry-run]
SCRIPT_ARGS="[OUT_DIR]" SCRIPT_MIN_ARGS=0 SCRIPT_MAX_ARGS=1
source "$(dirname "$0")/_common.sh"
out="${POSITIONAL[0]:-sleb_results/demo_table}"
EVAL_FLAGS="--ppl_datasets demo --eval_zeroshot True --tasks demo_cloze,demo_order" \
SEARCH_FLAGS="--dataset demo --nsamples 64" \
  bash scripts/metrics.sh demo "$out" "${DRY_FLAG[@]}"
[ "$DRY_RUN" = 1 ] || "$PY" -m sleb.report "$out" --out docs/demo_report/report.md
