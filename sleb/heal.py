"""`python -m sleb.heal`: LoRA-heal a pruned model (the implementation is sleb/healing.py; `sleb.heal` from
Python is the API function)."""

from sleb.healing import cli

if __name__ == "__main__":
    cli()
