"""Service settings: one dataclass, filled from CLI flags or ``INSLOC_SERVE_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from insloc_hub.errors import ConfigError

ENV_PREFIX = "INSLOC_SERVE_"


@dataclass
class Settings:
    """Everything the service can be configured with.

    Each field is also an environment variable ``INSLOC_SERVE_<FIELD>`` (``INSLOC_SERVE_MODELS`` takes
    a comma-separated list; booleans accept 1/0, true/false).

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
    request_timeout_s: float = 30.0  # a request still waiting after this answers 504
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 16  # per request
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    max_inflight_requests: int = 128  # requests being read/decoded/inferred at once; beyond: 503
    warmup: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        checks = {"max_batch_size": 1, "max_queue": 1, "max_body_bytes": 1, "max_images": 1, "max_pixels": 1,
                  "max_inflight_requests": 1, "port": 0}
        for name, low in checks.items():
            if int(getattr(self, name)) < low:
                raise ConfigError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ConfigError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.backend not in ("auto", "torch", "onnxruntime"):
            raise ConfigError(f"unknown backend {self.backend!r}; choose torch, onnxruntime or auto")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}; choose auto, cuda or cpu")

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
        """Settings from ``INSLOC_SERVE_*`` variables, then ``overrides`` (non-None values win)."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


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
        raise ConfigError(f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {text}") from exc
    return raw or None if "None" in text else raw
