"""`python -m sleb.heal`: LoRA-heal a pruned model (the pipeline is sleb/run_heal.py).

Imported (`import sleb.heal`), this module hands the package's `sleb.heal` back to the API function:
Python binds a submodule to its package attribute from sys.modules, so the name stays the function.
"""

import sys

if __name__ == "__main__":
    from sleb.run_heal import cli

    cli()
else:
    from sleb.api import heal

    sys.modules[__name__] = heal
