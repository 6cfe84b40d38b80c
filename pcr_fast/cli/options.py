"""Command-line flags generated from :class:`pcr_fast.PCRConfig`, so no setting is written twice.

Every leaf field of the config becomes ``--field-name`` with its type, its choices, the
given defaults and the help text of its record's docstring ("Args:" section). Values are
checked twice: by the flag's type (a usage error for a malformed value) and by building the
config (a usage error naming the field for a value out of range), both before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any, Callable, Dict, Optional, Sequence

from ..config import MODES, PCRConfig


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """A flag type: ``convert`` the text, then check it (an argparse usage error otherwise)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = expected
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
fraction = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def int_list(text: str) -> list:
    try:
        values = [int(x) for x in parse_csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def writable_dir(path: str) -> str:
    """Create ``path`` if needed and check that a file can be written there (before any work)."""
    import os
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pcr_fast_write_check"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write to {path!r}: {err.strerror or err}") from None
    return path


def _optional(inner: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def _number_or_word(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _floats(text: str) -> tuple:
    try:
        return tuple(float(x) for x in parse_csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _record_help(cls: type) -> Dict[str, str]:
    """``name: text`` entries of a record's "Args:" docstring section (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    if "Args:" not in doc:
        return {}
    out: Dict[str, str] = {}
    current = None
    for line in doc.split("Args:", 1)[1].splitlines():
        m = re.match(r"^\s{4}([\w, ]+):\s*(.*)$", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            current = names
            for n in names:
                out[n] = m.group(2).strip()
        elif current and line.strip():
            for n in current:
                out[n] += " " + line.strip()
    return out


def _parser_for(tp: Any) -> Optional[Callable[[str], Any]]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = _parser_for(rest[0]) if len(rest) == 1 else _number_or_word
        return _optional(inner)
    if origin is typing.Union:
        return _number_or_word
    if origin in (tuple, typing.Tuple):
        return _floats
    return {bool: parse_bool, int: int, float: float, str: str}.get(tp, str)


def config_fields():
    """(leaf name, its record class, dataclass field) for every leaf of PCRConfig."""
    for f in dataclasses.fields(PCRConfig):
        if f.name == "mode":
            yield f.name, PCRConfig, f
            continue
        cls = typing.get_type_hints(PCRConfig)[f.name]
        for sub in dataclasses.fields(cls):
            yield sub.name, cls, sub


def add_config_flags(parser: argparse.ArgumentParser, defaults: PCRConfig, title: str,
                     sections: Optional[Sequence[str]] = None) -> None:
    """Add one ``--flag`` per config leaf (default: ``defaults``' value) in a group;
    ``sections`` limits them to those records (``"mode"`` for the top-level mode)."""
    group = parser.add_argument_group(title)
    values = defaults.leaves()
    owner = PCRConfig.leaf_sections()
    helps: Dict[type, Dict[str, str]] = {}
    for name, cls, f in config_fields():
        if sections is not None and (owner[name] or "mode") not in sections:
            continue
        hints = typing.get_type_hints(cls)
        text = helps.setdefault(cls, _record_help(cls)).get(name, "")
        if name == "mode":
            text = ("inline: test a few rows per step for invariant responses holding a token the model never "
                    "predicted before, unlearn it; "
                    "scan: scan the training set for invariant responses, drop them, unlearn the target tokens; "
                    "online: the per-batch two-view objective")
        default = values[name]
        if isinstance(default, tuple):  # argparse passes a string default through the flag's type
            default = ",".join(str(x) for x in default)
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", re.sub(r"``([^`]+)``", r"\1", text)).replace("%", "%%")
        kwargs: Dict[str, Any] = dict(type=_parser_for(hints[name]), default=default, dest=name,
                                      help=f"{text} (default: %(default)s)", metavar=name.upper())
        choices = f.metadata.get("choices")
        if choices:
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: PCRConfig) -> PCRConfig:
    """The config the flags describe; a bad value is a usage error naming its flag."""
    values = {name: getattr(args, name) for name in defaults.leaves() if hasattr(args, name)}
    try:
        config = defaults.override(**values)
    except ValueError as err:
        parser.error(_as_flag(str(err)))
        raise  # pragma: no cover - parser.error exits
    # a setting the chosen mode never reads would be silently ignored: say so instead
    start, read = defaults.leaves(), set(PCRConfig.leaves_read(config.mode))
    ignored = [n for n, v in config.leaves().items() if n not in read and v != start[n]]
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        users = {n: [m for m in MODES if n in PCRConfig.leaves_read(m)] for n in ignored}
        hint = "; ".join(f"--{n.replace('_', '-')} is read by --mode {' or '.join(m)}" for n, m in users.items())
        parser.error(f"{flags}: no effect with --mode {config.mode} ({hint})")
    return config


def _as_flag(message: str) -> str:
    """Name the flag rather than the field in a config error message."""
    head = message.split(" ", 1)
    if head and head[0] in PCRConfig().leaves():
        return f"--{head[0].replace('_', '-')} {head[1] if len(head) > 1 else ''}".strip()
    return message
