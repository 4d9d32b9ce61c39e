"""Config dataclasses: one ``to_dict`` / ``from_dict`` for all of them, and their command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from insloc_hub.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
    """Mixin for dataclass configs written next to outputs and read back.

    ``from_dict`` rejects unknown fields with the names listed, so a typo or a config from a newer
    version is an error instead of being silently ignored.

    Example:
        >>> @dataclasses.dataclass
        ... class Toy(JsonConfig):
        ...     size: int = 1
        >>> Toy.from_dict({"size": 2})
        Toy(size=2)
    """

    config_kind = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown {cls.config_kind} fields {sorted(unknown)}; "
                              "is this config from a newer insloc-hub?")
        return cls(**dict(data))

    def check_limits(self) -> None:
        """Raise :class:`ConfigError` for a field outside the ``choices`` / ``min`` / ``max`` of its :func:`flag`."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None and f.metadata:
                problem = _limit_problem(f.metadata, value)
                if problem:
                    raise ConfigError(f"--{f.name.replace('_', '-')} {problem}")


def flag(default: Any = dataclasses.MISSING, *, help: str = "", choices: Sequence[Any] | None = None,
         min: float | None = None, max: float | None = None, above: float | None = None,
         parse: Callable[[str], Any] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is also a command-line flag: its help, allowed values and parser in one place.

    ``min``/``max`` bound it inclusively, ``above`` exclusively; ``parse`` reads the flag's text
    (default: the field's type). :func:`add_config_flags` turns the fields into flags and
    :meth:`JsonConfig.check_limits` applies the same rules to configs built in Python.

    Example:
        >>> @dataclasses.dataclass
        ... class Toy(JsonConfig):
        ...     batch_size: int = flag(2, help="images per step", min=1)
    """
    metadata = {k: v for k, v in dict(help=help, choices=choices, min=min, max=max, above=above,
                                      parse=parse).items() if v not in (None, "")}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _limit_problem(spec: Mapping[str, Any], value: Any) -> str | None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if "choices" in spec and v not in spec["choices"]:
            return f"must be one of {', '.join(map(str, spec['choices']))}, got {v!r}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                return f"must be a finite number, got {v}"
            if "min" in spec and v < spec["min"]:
                return f"must be >= {spec['min']}, got {v}"
            if "max" in spec and v > spec["max"]:
                return f"must be <= {spec['max']}, got {v}"
            if "above" in spec and v <= spec["above"]:
                return f"must be > {spec['above']}, got {v}"
    return None


def _flag_type(spec: Mapping[str, Any], base: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = spec["parse"](text) if "parse" in spec else base(text)
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {base.__name__} ({exc})") from None
        problem = _limit_problem(spec, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = base.__name__  # argparse names the type in its messages
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                     required: Sequence[str] = (), groups: Mapping[str, Sequence[str]] | None = None) -> None:
    """One flag per field of the dataclass ``cls`` (``batch_size`` -> ``--batch-size``), default ``None``.

    Types, ranges and choices come from each field's :func:`flag`, so bad values stop in the parser
    with one line. Booleans get ``--x/--no-x``; dict fields and those in ``skip`` get no flag.
    ``groups`` maps a help section title to field names (the rest go to "options").
    """
    hints = typing.get_type_hints(cls)
    sections = {title: parser.add_argument_group(title) for title in (groups or {})}
    section_of = {name: sections[title] for title, names in (groups or {}).items() for name in names}
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        if f.name in skip or kind is dict:
            continue
        spec = f.metadata
        target = section_of.get(f.name, parser)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = spec.get("help", "") + (f" (default: {default})" if default not in (None, "") else "")
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            target.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        target.add_argument(name, type=_flag_type(spec, kind), default=None, required=f.name in required,
                            metavar=f.name.upper() if "choices" not in spec else "{" + ",".join(spec["choices"]) + "}",
                            help=help_text)


def _base_type(annotation: Any) -> type:
    """``int`` for ``int`` and ``int | None``, ``list`` for ``list[int]``, ``dict`` for ``dict[...]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _base_type(args[0]) if args else str
    return typing.get_origin(annotation) or annotation


# ----------------------------------------------------------------------------------------------
# argparse types shared by the command-line tools
# ----------------------------------------------------------------------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (the checks of :func:`flag`)."""
    return _flag_type({"min": low}, int)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _flag_type({"min": 0.0, "max": 1.0}, float)(text)


def device_name(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


_OUTPUT_MARKERS = ("config.json", "training_args.json", "metrics.jsonl", "metrics.json", "model.safetensors",
                   "summary.json")


def output_folder(text: str) -> str:
    """argparse type: a folder to write into: new, empty, or one insloc-hub wrote (a run, eval or hub folder).

    Anything else (a file, a folder of other things, a place that cannot be written) is refused
    before any work starts.
    """
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; pass a folder")
    if path.is_dir() and any(path.iterdir()) and not (
        any((path / m).exists() for m in _OUTPUT_MARKERS) or any(path.glob("checkpoint_*.pt"))
    ):
        raise argparse.ArgumentTypeError(f"{text!r} holds files insloc-hub did not write; pass a new or empty folder")
    _check_writable(path, text)
    return text


def output_file(text: str) -> str:
    """argparse type: a file to write (replaced if it exists), in a folder that can be written."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; pass a file name")
    _check_writable(path.parent, text)
    return text


def _check_writable(path: Path, text: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {existing} is a file, not a folder")
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {existing} is not writable ({exc.strerror})") \
            from None
