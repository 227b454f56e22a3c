"""Turning command-line flags into a settings dataclass, and bad input into one line and exit code 2.

`fire` parses the values (`'[5, 4]'` becomes a list, `True` a bool); this module checks each flag
against the settings dataclass: unknown names, wrong types and `--help` are handled here so that a
mistake never ends in a traceback or a page of usage text.
"""

import dataclasses
import sys
import typing

import fire

from sleb.errors import UsageError


def flag(default, help: str):
    """A settings field with its help text (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _coerce(name: str, value, annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UsageError(f"--{name} must be True or False, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"--{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"--{name} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, tuple) and all(isinstance(v, (str, int)) for v in value):
            return ",".join(map(str, value))  # fire reads "wikitext2,c4" as a tuple
        if isinstance(value, (list, tuple, dict, bool)) or value is None:
            raise UsageError(f"--{name} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        return value  # lists are checked by the stage that knows what they hold
    return value


def parse_settings(settings_cls, flags: dict):
    """Build `settings_cls` from parsed flags, rejecting unknown names and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(settings_cls)}
    hints = typing.get_type_hints(settings_cls)
    values = {}
    for name, value in flags.items():
        if name not in fields:
            raise UsageError(f"unknown flag --{name}; run with --help to list the flags")
        values[name] = _coerce(name, value, hints[name])
    return settings_cls(**values)


def help_text(settings_cls, command: str, summary: str) -> str:
    lines = [f"usage: {command} [--flag value ...]", "", summary, "", "flags:"]
    for f in dataclasses.fields(settings_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --{f.name} (default: {default!r})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _stray_argument(argv):
    """The first argument that is neither a flag nor a flag's value (fire would answer it with a page of usage)."""
    awaits_value = False
    for arg in argv:
        if arg.startswith("--"):
            awaits_value = "=" not in arg
        elif awaits_value:
            awaits_value = False  # a value, negative numbers included
        else:
            return arg
    return None


def run_cli(main, settings_cls, command: str, summary: str, argv=None) -> None:
    """Entry point of `python -m sleb|eval|latency`: flags -> settings -> main(settings)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(settings_cls, command, summary))
        return
    try:
        stray = _stray_argument(argv)
        if stray is not None:
            raise UsageError(f"unexpected argument {stray!r}; flags are written --name value "
                             "(quote a list with spaces: --removal_list '[5, 4]')")
        # fire only parses the values; everything else is ours, so errors stay one line.
        flags = {}
        fire.Fire(lambda **kwargs: flags.update(kwargs), command=argv, name=command)
        main(parse_settings(settings_cls, flags))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
