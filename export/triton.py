"""``write_triton_repository``: a Triton Inference Server model repository from an exported ONNX file.

Layout: ``<repository>/<name>/config.pbtxt`` and ``<repository>/<name>/1/model.onnx`` (onnxruntime
backend). Features/embedding graphs with a dynamic batch get ``max_batch_size`` and dynamic
batching (Triton stacks requests along dim 0); detector graphs take one image per request
(``max_batch_size: 0``). The preprocessing contract and class names travel as model parameters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from insloc_hub.errors import ConfigError
from insloc_hub.export.metadata import read_metadata
from insloc_hub.exported import encode

#: numpy dtype name -> Triton data type
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _dims(shape: list[Any]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _quote(text: str) -> str:
    return json.dumps(text)  # protobuf text format accepts JSON-style double-quoted escapes


def render_config(metadata: dict[str, Any], name: str, *, max_batch_size: int = 32, instances: int = 1,
                  kind: str = "auto", max_queue_delay_us: int = 2000) -> str:
    """The ``config.pbtxt`` text for an exported graph's metadata.

    Args:
        metadata: :func:`insloc_hub.export.read_metadata` of the ONNX file.
        name: the model's name in the repository.
        max_batch_size: largest batch Triton forms for a dynamic-batch graph (ignored otherwise).
        instances: model instances per device.
        kind: ``auto``, ``cpu`` or ``gpu`` instance placement.
        max_queue_delay_us: how long dynamic batching waits to fill a batch.
    """
    if kind not in INSTANCE_KINDS:
        raise ConfigError(f"unknown instance kind {kind!r}; choose one of {sorted(INSTANCE_KINDS)}")
    if instances < 1 or max_batch_size < 1:
        raise ConfigError("--instances and --max-batch-size must be at least 1")
    (spec,) = metadata["inputs"]
    batched = metadata["task"] != "detector" and not isinstance(spec["shape"][0], int)
    lines = [f"name: {_quote(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size if batched else 0}"]

    def tensor(t: dict[str, Any]) -> str:
        if t["dtype"] not in TRITON_TYPES:
            raise ConfigError(f"tensor {t['name']} has dtype {t['dtype']} with no Triton type")
        shape = t["shape"][1:] if batched else t["shape"]
        return (f"  {{\n    name: {_quote(t['name'])}\n    data_type: {TRITON_TYPES[t['dtype']]}\n"
                f"    dims: {_dims(shape)}\n  }}")

    lines.append("input [\n" + ",\n".join(tensor(t) for t in metadata["inputs"]) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(t) for t in metadata["outputs"]) + "\n]")
    if batched:
        preferred = [b for b in (4, 8, 16, 32) if b <= max_batch_size] or [max_batch_size]
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                     f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {INSTANCE_KINDS[kind]}\n  }}\n]")
    params = encode({"task": metadata["task"], "preprocessing": metadata.get("preprocessing", {}),
                     "model_name": metadata.get("model_name", ""), "class_names": metadata.get("class_names")})
    for key, value in params.items():
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    inside = "resizing, normalisation and post-processing happen" if metadata["task"] == "detector" \
        else "normalisation happens"
    header = f"# Written by insloc-export triton. Clients send uint8 RGB pixels; {inside} inside the graph.\n"
    return header + "\n".join(lines) + "\n"


def write_triton_repository(
    onnx_path: str | os.PathLike[str],
    repository: str | os.PathLike[str],
    name: str | None = None,
    *,
    max_batch_size: int = 32,
    instances: int = 1,
    kind: str = "auto",
    version: int = 1,
) -> Path:
    """Write ``<repository>/<name>/{version}/model.onnx`` and ``config.pbtxt``; return the model folder.

    Example:
        >>> write_triton_repository("r50.onnx", "models", "insloc-r50")  # doctest: +SKIP
        PosixPath('models/insloc-r50')
    """
    metadata = read_metadata(onnx_path)
    name = name or Path(onnx_path).stem
    if not _NAME.match(name):
        raise ConfigError(f"model name {name!r} must be letters, digits, '_', '-' or '.', starting with a letter/digit")
    if version < 1:
        raise ConfigError(f"version must be at least 1, got {version}")
    config = render_config(metadata, name, max_batch_size=max_batch_size, instances=instances, kind=kind)
    folder = Path(repository) / name
    try:
        (folder / str(version)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx_path, folder / str(version) / "model.onnx")
        (folder / "config.pbtxt").write_text(config)
    except OSError as exc:
        raise ConfigError(f"cannot write the model repository {folder}: {exc.strerror or exc}") from exc
    return folder
