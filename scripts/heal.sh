#!/usr/bin/env bash
# Healing at paper scale: SLEB removes 20% of the blocks (WikiText-2 calibration, as in the paper), the
# pruned checkpoint is saved, then LoRA heals it on C4 with Shortened LLaMA's recipe (sleb.heal defaults;
# QLoRA with HEAL_FLAGS="--load_in_4bit True", as Gromov et al.).
#   bash scripts/heal.sh meta-llama/Llama-2-7b-hf,meta-llama/Llama-2-13b-hf sleb_results/heal [--dry-run]
# Extra flags: HEAL_FLAGS go to every heal run (e.g. --max_steps 2000 --dataset file:alpaca.jsonl).
source "$(dirname "$0")/_common.sh"
read -r -a HEAL_EXTRA <<< "${HEAL_FLAGS:-}"
for model in "${MODELS[@]}"; do
  depth=$(depth_of "$model")
  k=$(remove_count "$depth" 20)
  name=$(slug "$model")
  run "heal_search_${name}.json" "$PY" -m sleb --model_name "$model" --num_blocks "$depth" --num_remove_blocks "$k" \
    --eval_ppl False --save_model "$OUT/pruned_${name}" --result_folder "$OUT" --result_file "heal_search_${name}.json"
  run "heal_${name}.json" "$PY" -m sleb.heal --model_name "$OUT/pruned_${name}" --output_dir "$OUT/healed_${name}" \
    --ppl_datasets wikitext2,c4 "${HEAL_EXTRA[@]}" --result_folder "$OUT" --result_file "heal_${name}.json"
done
