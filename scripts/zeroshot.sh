#!/usr/bin/env bash
# Paper Table: zero-shot accuracy on piqa, winogrande, hellaswag, arc_challenge, arc_easy, 20% removed.
#   bash scripts/zeroshot.sh meta-llama/Llama-2-7b-hf,meta-llama/Llama-2-13b-hf sleb_results/zeroshot
source "$(dirname "$0")/_common.sh"
for model in "${MODELS[@]}"; do
  depth=$(depth_of "$model")
  k=$(remove_count "$depth" 20)
  run "zeroshot_$(slug "$model").json" "$PY" -m sleb --model_name "$model" --num_blocks "$depth" \
    --num_remove_blocks "$k" --eval_ppl False --eval_zeroshot True \
    --result_folder "$OUT" --result_file "zeroshot_$(slug "$model").json"
done
