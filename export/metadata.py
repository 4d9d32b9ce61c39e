"""``metadata_props`` of exported ONNX files (CONTRACT part 2), with onnx: written here, read by serving.

The keys and their encoding (``insloc.`` prefix, JSON for structured values) live in
:mod:`insloc_hub.exported`, which serving reads too. :func:`read_metadata` returns them decoded, so
``read_metadata(path)["class_names"]`` is a list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from insloc_hub.errors import ConfigError
from insloc_hub.exported import PREFIX, decode, encode


def set_metadata(model: Any, fields: dict[str, Any]) -> None:
    """Replace the ``insloc.*`` entries of an ``onnx.ModelProto``'s metadata_props with ``fields``."""
    import onnx

    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in keep + sorted(encode(fields).items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The insloc metadata of an exported ONNX file, decoded (``task``, ``class_names``, ``parity``...).

    Reads only the model header (weights are not loaded into memory as tensors).

    Raises:
        ConfigError: the file is missing, is not ONNX, or was not written by ``insloc-export``.

    Example:
        >>> read_metadata("r50.onnx")["outputs"]  # doctest: +SKIP
        [{'name': 'p2', 'dtype': 'float32', 'shape': ['batch', 256, 'height/4', 'width/4']}, ...]
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; export a model first (insloc-export onnx NAME --output {path})")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / ValueError for non-ONNX bytes
        raise ConfigError(f"{path} is not a readable ONNX file: {exc}") from exc
    fields = decode({p.key: p.value for p in model.metadata_props})
    if "task" not in fields:
        raise ConfigError(f"{path} has no insloc metadata (insloc.task); it was not written by insloc-export")
    return fields


def tensor_specs(values: Any) -> list[dict[str, Any]]:
    """``[{name, dtype, shape}]`` of an ONNX graph's inputs or outputs; dynamic dims as their strings."""
    import onnx

    specs = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        specs.append({"name": value.name, "dtype": dtype, "shape": dims})
    return specs


def format_metadata(fields: dict[str, Any]) -> str:
    """Human-readable listing for ``insloc-export inspect``."""
    lines = []
    for key in sorted(fields):
        value = fields[key]
        if key in ("inputs", "outputs") and isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  {t['name']}: {t['dtype']} {t['shape']}" for t in value]
        elif key == "parity" and isinstance(value, dict) and "cases" in value:
            lines.append(f"parity: {'passed' if value.get('passed') else 'FAILED'} on {value.get('images')}")
            for case in value["cases"]:
                figures = {k: v for k, v in case.items() if k not in ("case", "outputs")}
                for name, out in case.get("outputs", {}).items():
                    figures[name] = out
                lines.append(f"  {case.get('case')}: {json.dumps(figures)}")
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {json.dumps(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            lines.append(f"{key}: {json.dumps(value)}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
