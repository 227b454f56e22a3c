"""`python -m sleb.heal`: `sleb heal` under its earlier name.

`sleb.heal` is the API function (sleb/api.py); importing this file as a module would bind the package
attribute to the module instead, so an import is refused and the function stays in place.
"""

if __name__ == "__main__":
    from sleb.commands import cli

    cli("heal")
else:
    raise ImportError("sleb.heal is the healing function (import sleb; sleb.heal(model, ...)); the command is "
                      "`sleb heal` or `python -m sleb.heal`")
