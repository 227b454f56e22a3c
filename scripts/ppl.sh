#!/usr/bin/env bash
# Paper Table: WikiText-2 and C4 perplexity with 10% and 20% of the blocks removed by SLEB.
#   bash scripts/ppl.sh facebook/opt-6.7b,facebook/opt-13b,facebook/opt-30b,facebook/opt-66b,meta-llama/Llama-2-7b-hf,meta-llama/Llama-2-13b-hf,meta-llama/Llama-2-70b-hf sleb_results/ppl
source "$(dirname "$0")/_common.sh"
for model in "${MODELS[@]}"; do
  depth=$(depth_of "$model")
  for percent in 10 20; do
    k=$(remove_count "$depth" "$percent")
    run "ppl_$(slug "$model")_$percent.json" "$PY" -m sleb --model_name "$model" --num_blocks "$depth" \
      --num_remove_blocks "$k" --eval_ppl True --ppl_datasets wikitext2,c4 \
      --result_folder "$OUT" --result_file "ppl_$(slug "$model")_$percent.json"
  done
done
