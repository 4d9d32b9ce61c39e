"""Service settings: one dataclass, filled from CLI flags or ``INSLOC_SERVE_*`` environment variables."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from insloc_hub.errors import ConfigError

ENV_PREFIX = "INSLOC_SERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: inclusive ranges of the integer settings (the upper bounds only stop values nothing could honour)
_INT_RANGES = {"port": (0, 65535), "max_batch_size": (1, 1 << 20), "max_queue": (1, 1 << 30),
               "max_body_bytes": (1, 1 << 40), "max_images": (1, 1 << 20), "max_pixels": (1, 1 << 40),
               "max_inflight_requests": (1, 1 << 30), "threads": (0, 4096)}


@dataclass
class Settings:
    """Everything the service can be configured with.

    Each field is also an environment variable ``INSLOC_SERVE_<FIELD>`` (``INSLOC_SERVE_MODELS`` takes
    a comma-separated list; booleans accept 1/0, true/false); :data:`ENV_ALIASES` adds the flag-named
    ``INSLOC_SERVE_MODEL`` and ``INSLOC_SERVE_NO_WARMUP``. Any other ``INSLOC_SERVE_*`` is an error.

    Example:
        >>> Settings(models=["out/tiny-detector"], max_batch_size=8).max_wait_ms
        5.0
    """

    models: list[str] = field(default_factory=list)  # hub names, aliases, folders or .onnx files; "name=spec" renames
    revision: str | None = None
    backend: str = "auto"  # torch | onnxruntime | auto (onnxruntime for .onnx files, torch otherwise)
    device: str = "auto"  # auto | cuda | cpu
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for the device, per model and operation
    api_key_file: str | None = None
    compile: bool = False  # torch.compile on CUDA
    precision: str = "auto"  # torch backend: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16
    threads: int = 0  # torch intra-op threads for the device worker (0: library default)
    request_timeout_s: float = 30.0  # from arrival: a body not read by then is a 408, a result not ready a 504
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 16  # per request
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    max_inflight_requests: int = 128  # requests being read/decoded/inferred at once; beyond: 503
    warmup: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        # ranges checked here so a bad value is one clear line, not a traceback from the socket or torch
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer from {low:,} to {high:,}, got {value!r}")
        for name, low, strict in (("max_wait_ms", 0.0, False), ("request_timeout_s", 0.0, True)):
            value = getattr(self, name)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if not finite or value < low or (strict and value == low):
                raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
        if self.backend not in ("auto", "torch", "onnxruntime"):
            raise ConfigError(f"unknown backend {self.backend!r}; choose torch, onnxruntime or auto")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}; choose auto, cuda or cpu")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        if str(self.log_level).lower() not in LOG_LEVELS:
            raise ConfigError(f"unknown log level {self.log_level!r}; choose one of {', '.join(LOG_LEVELS)}")

    def api_key(self) -> str | None:
        """The API key read from ``api_key_file`` (stripped), or None when no key is required."""
        if not self.api_key_file:
            return None
        path = Path(self.api_key_file)
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the API key file {str(path)!r}: {exc.strerror}") from exc
        if not key:
            raise ConfigError(f"the API key file {str(path)!r} is empty; write the key into it")
        return key

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``INSLOC_SERVE_*`` variables, then ``overrides`` (non-None values win).

        Raises:
            ConfigError: an ``INSLOC_SERVE_*`` variable that names no setting (a typo would otherwise be
                ignored silently), a value that does not parse, or two names for one setting that disagree.
        """
        environ = dict(os.environ if environ is None else environ)
        accepted = env_names()
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        source: dict[str, str] = {}
        for key in sorted(k for k in environ if k.startswith(ENV_PREFIX)):
            if key not in accepted:
                raise ConfigError(_unknown_variable(key, accepted))
            name, inverted = accepted[key]
            value = _parse(key, environ[key], types[name])
            if inverted:
                value = not value
            if name in values and values[name] != value:
                raise ConfigError(f"{source[name]} and {key} are both set and disagree; keep one of them")
            values[name], source[name] = value, key
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


#: names that follow the flag rather than the field (--model, --no-warmup), accepted as well:
#: variable -> (field, whether the boolean is inverted)
ENV_ALIASES: dict[str, tuple[str, bool]] = {
    ENV_PREFIX + "MODEL": ("models", False),
    ENV_PREFIX + "NO_WARMUP": ("warmup", True),
}


def env_names() -> dict[str, tuple[str, bool]]:
    """Every accepted ``INSLOC_SERVE_*`` variable -> (settings field, inverted boolean)."""
    names = {ENV_PREFIX + f.name.upper(): (f.name, False) for f in dataclasses.fields(Settings)}
    return {**names, **ENV_ALIASES}


def env_help(field_name: str) -> str:
    """How ``--help`` names the variables of one field, e.g. ``env INSLOC_SERVE_PORT``."""
    main = ENV_PREFIX + field_name.upper()
    aliases = [k for k, (name, _) in ENV_ALIASES.items() if name == field_name]
    if field_name == "models":
        return f"env {main}, comma-separated; or {', '.join(aliases)}"
    if field_name == "warmup":
        return f"env {aliases[0]}=1 or {main}=0"
    if any(f.name == field_name and str(f.type) == "bool" for f in dataclasses.fields(Settings)):
        return f"env {main}=1"
    return f"env {main}"


def _unknown_variable(key: str, accepted: dict[str, tuple[str, bool]]) -> str:
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"unknown environment variable {key}; {hint}unset it or use one of: "
            f"{', '.join(sorted(accepted))}")


def _parse(name: str, raw: str, type_name: object) -> object:
    text = str(type_name)
    try:
        if text.startswith("list"):
            return [part.strip() for part in raw.split(",") if part.strip()]
        if text == "bool":
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes")
        if text == "int":
            return int(raw)
        if text == "float":
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {text}") from exc
    return raw or None if "None" in text else raw
