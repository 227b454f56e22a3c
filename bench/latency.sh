#!/usr/bin/env bash
# Latency of dense vs 20%-pruned models: the paper's two settings, plus the compiled static-cache variant.
#   bash bench/latency.sh gpu   # Llama-2-7B-shaped random fp16 model built from a config (no download)
#   bash bench/latency.sh cpu   # the shipped demo model, CPU-sized defaults
# Results land in sleb_results/bench_latency/; each run prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-cpu}"
out=sleb_results/bench_latency
if [ "$target" = gpu ]; then
  model=/tmp/sleb-llama-2-7b-shape
  if [ ! -f "$model/config.json" ]; then
    python - "$model" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
sys.path.insert(0, "tests")
import tiny
config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).half()
model.save_pretrained(sys.argv[1])
tiny.make_tokenizer().save_pretrained(sys.argv[1])
PY
  fi
  common=(--model_name "$model" --dtype float16 --device cuda --result_folder "$out" --overwrite True)
else
  common=(--model_name demo --device cpu --result_folder "$out" --overwrite True)
fi
python -m latency "${common[@]}"
python -m latency "${common[@]}" --generation True
python -m latency "${common[@]}" --generation True --static_cache True --compile True
