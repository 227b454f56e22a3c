"""Recovery after block removal, one module per method: `lora` (trained: LoRA through transformers'
Trainer, merged into the weights) and `linear` (training-free: a least-squares map folded into the
block before each removed run). Each leaves an ordinary checkpoint of the pruned depth."""
