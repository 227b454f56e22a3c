"""sleb: find and remove redundant transformer blocks (SLEB, ICML 2024) in Hugging Face decoders."""
