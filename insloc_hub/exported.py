"""Exported .onnx files as every reader sees them: their ``insloc.*`` metadata and onnxruntime sessions.

Export writes the metadata with :func:`encode`; export and serving read it back with :func:`decode`
(one place for the keys and their JSON). Export (parity checks, TensorRT comparisons), serving and the
benchmarks open graphs with :func:`ort_session`, so they pick providers and threads alike.
onnxruntime is imported on first use.
"""

from __future__ import annotations

import json
import os
from typing import Any

from insloc_hub.errors import ConfigError, MissingDependencyError

PREFIX = "insloc."
#: the revision of a model that came from a local folder, in metadata and wherever a model is served
LOCAL_REVISION = "local"
#: what export wrote before LOCAL_REVISION (files in the wild still say it)
LEGACY_LOCAL_REVISIONS = ("local folder",)
#: keys whose values are JSON (the others are plain strings)
JSON_KEYS = ("class_names", "preprocessing", "inputs", "outputs", "parity", "options")


def encode(fields: dict[str, Any]) -> dict[str, str]:
    """``{"task": "detector", "class_names": [...]}`` -> ``{"insloc.task": "detector", "insloc.class_names": "[..]"}``.

    ``None`` values are left out.
    """
    props = {}
    for key, value in fields.items():
        if value is None:
            continue
        props[PREFIX + key] = json.dumps(value) if key in JSON_KEYS else str(value)
    return props


def decode(props: dict[str, str]) -> dict[str, Any]:
    """The inverse of :func:`encode` for the ``insloc.*`` keys (other keys are ignored)."""
    fields: dict[str, Any] = {}
    for key, value in props.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name in JSON_KEYS:
            try:
                fields[name] = json.loads(value)
            except json.JSONDecodeError:
                fields[name] = value
        else:
            fields[name] = value
    return fields


ORT_INSTALL = "pip install 'insloc-hub[onnxruntime]' (or 'insloc-hub[onnxruntime-gpu]' for CUDA)"


def import_onnxruntime(hint: str = "") -> Any:
    """``import onnxruntime``, or a :class:`MissingDependencyError` that says what to install (then ``hint``)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"onnxruntime is not installed; it runs exported graphs: {ORT_INSTALL}. "
                                     f"{hint}".rstrip()) from exc
    return onnxruntime


def providers_for(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device``: ``auto`` (CUDA when available, then CPU), ``cuda``, ``cpu``.

    Raises:
        ConfigError: ``cuda`` was asked for and onnxruntime has no CUDAExecutionProvider.
    """
    has_cuda = "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()
    if device.startswith("cuda") and not has_cuda:
        raise ConfigError("--device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
    cuda = device.startswith("cuda") or (device == "auto" and has_cuda)
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


def ort_session(path: str | os.PathLike[str], *, threads: int | None = None,
                providers: list[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``path`` whose idle threads never spin.

    Spinning threads would steal the cores a PyTorch model, the HTTP loop or another request in the
    same process needs.

    Args:
        threads: intra-op threads (default: onnxruntime's, one per core).
        providers: execution providers (default: ``providers_for("auto")``, CUDA when available, then CPU).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: shape-inference warnings on dynamic dims are expected
    if providers is None:
        providers = providers_for()
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)
