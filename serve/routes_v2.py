"""KServe v2 / Open Inference Protocol, with Triton's binary tensor data extension.

Input: one BYTES tensor of encoded images (shape ``[N]``), as JSON strings (base64, what tritonclient
sends with ``binary_data=False``) or as binary data (4-byte little-endian length + bytes per element,
the body after ``Inference-Header-Content-Length`` bytes of JSON). Outputs, binary when asked
(``binary_data`` per output or ``binary_data_output``): detectors ``boxes`` FP32 [K, 4], ``scores`` FP32
[K], ``labels`` INT64 [K], ``label_names`` BYTES [K], ``batch_index`` INT64 [K] (which input image);
backbones ``embedding`` FP32 [N, D]. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from insloc_hub.serve.errors import ServiceError
from insloc_hub.serve.inputs import (
    MAX_DETECTIONS,
    Options,
    b64_image,
    decode_all,
    float_option,
    int_option,
    parse_json,
    read_body,
)
from insloc_hub.serve.render import label_name, select_detections
from insloc_hub.serve.service import ModelRuntime, Service
from insloc_hub.version import __version__

router = APIRouter(prefix="/v2")

_DTYPES = {"FP32": np.float32, "INT64": np.int64}


def _service(request: Request) -> Service:
    return request.app.state.service


def _outputs_metadata(runtime: ModelRuntime) -> list[dict[str, Any]]:
    if runtime.info.task == "detection":
        return [{"name": "boxes", "datatype": "FP32", "shape": [-1, 4]},
                {"name": "scores", "datatype": "FP32", "shape": [-1]},
                {"name": "labels", "datatype": "INT64", "shape": [-1]},
                {"name": "label_names", "datatype": "BYTES", "shape": [-1]},
                {"name": "batch_index", "datatype": "INT64", "shape": [-1]}]
    return [{"name": "embedding", "datatype": "FP32", "shape": [-1, runtime.info.embedding_dim or -1]}]


@router.get("", summary="KServe v2 server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "insloc-serve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="KServe v2 liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="KServe v2 readiness")
async def ready(request: Request) -> JSONResponse:
    is_ready = _service(request).ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


def _runtime(request: Request, model_name: str) -> ModelRuntime:
    return _service(request).model(model_name)


@router.get("/models/{model_name}", summary="KServe v2 model metadata")
@router.get("/models/{model_name}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, model_name: str, version: str | None = None) -> dict[str, Any]:
    runtime = _runtime(request, model_name)
    return {"name": runtime.info.name, "versions": [runtime.info.revision],
            "platform": f"insloc-hub_{runtime.info.backend}",
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}],
            "outputs": _outputs_metadata(runtime),
            "parameters": {"task": runtime.info.task, "class_names": json.dumps(runtime.info.class_names)}}


@router.get("/models/{model_name}/ready", summary="KServe v2 model readiness")
@router.get("/models/{model_name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, model_name: str, version: str | None = None) -> JSONResponse:
    service = _service(request)
    is_ready = service.ready and model_name in service.models
    if service.ready and not is_ready:
        raise ServiceError(404, "model_not_found", f"no model named {model_name!r}")
    return JSONResponse({"name": model_name, "ready": is_ready}, status_code=200 if is_ready else 503)


def _split_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a uint32 little-endian length then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ServiceError(400, "invalid_tensor", "BYTES tensor data is truncated (incomplete length prefix)")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ServiceError(400, "invalid_tensor", "BYTES tensor data is truncated (element longer than the data)")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def _parse_request(body: bytes, header_length: str | None, max_images: int) -> tuple[dict[str, Any], list[bytes]]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as exc:
            raise ServiceError(400, "invalid_header", f"Inference-Header-Content-Length {header_length!r} "
                                                      "is not an integer") from exc
        if not 0 < n <= len(body):
            raise ServiceError(400, "invalid_header", f"Inference-Header-Content-Length {n} does not fit the "
                                                      f"{len(body)}-byte body")
        header_bytes, binary = body[:n], body[n:]
    else:
        header_bytes, binary = body, b""
    header = parse_json(header_bytes, status=400)
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ServiceError(400, "invalid_request", "expected exactly one input: a BYTES tensor of encoded images "
                                                   "named \"images\"")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ServiceError(400, "invalid_request", f"input datatype must be BYTES (encoded images), got "
                                                   f"{tensor.get('datatype')!r}")
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ServiceError(400, "invalid_request", "input parameters must be an object")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise ServiceError(400, "invalid_tensor", f"binary_data_size {size!r} does not match the "
                                                      f"{len(binary)} bytes after the JSON header")
        images = _split_bytes_tensor(binary)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ServiceError(400, "invalid_tensor", "the input has neither \"data\" nor binary data")
        flat = data
        while flat and isinstance(flat[0], list):  # nested JSON tensors are flattened, row-major
            flat = [x for row in flat for x in (row if isinstance(row, list) else [row])]
        images = [b64_image(v, i, status=400) for i, v in enumerate(flat)]
    if not images:
        raise ServiceError(400, "no_images", "the input tensor is empty")
    if len(images) > max_images:
        raise ServiceError(413, "too_many_images", f"{len(images)} images in one request; the limit is {max_images}")
    return header, images


def _tensor_outputs(runtime: ModelRuntime, results: list[Any], opts: Options) -> dict[str, np.ndarray]:
    if runtime.info.task != "detection":
        return {"embedding": np.stack(results).astype(np.float32)}
    boxes, scores, labels, names, index = [], [], [], [], []
    for i, det in enumerate(results):
        keep = select_detections(det, opts, runtime.info.class_names)
        boxes.append(det.boxes[keep])
        scores.append(det.scores[keep])
        labels.append(det.labels[keep])
        names += [label_name(int(x), runtime.info.class_names) for x in det.labels[keep]]
        index.append(np.full(len(keep), i, dtype=np.int64))
    return {"boxes": np.concatenate(boxes).astype(np.float32).reshape(-1, 4),
            "scores": np.concatenate(scores).astype(np.float32), "labels": np.concatenate(labels).astype(np.int64),
            "label_names": np.array(names, dtype=object), "batch_index": np.concatenate(index)}


def _datatype(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    return {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[array.dtype]


def _binary(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in array.tolist())
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


@router.post("/models/{model_name}/infer", summary="KServe v2 inference (BYTES input of encoded images)")
@router.post("/models/{model_name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, model_name: str, version: str | None = None) -> Response:
    service = _service(request)
    s, deadline = service.settings, service.deadline()
    runtime = _runtime(request, model_name)
    body = await read_body(request, s.max_body_bytes, deadline)
    header, images = _parse_request(body, request.headers.get("inference-header-content-length"), s.max_images)
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServiceError(400, "invalid_request", "request parameters must be an object")
    opts = Options()
    if "score_threshold" in params:
        opts.score_threshold = float_option("score_threshold", params["score_threshold"], 0.0, 1.0, status=400)
    if "max_detections" in params:
        opts.max_detections = int_option("max_detections", params["max_detections"], 0, MAX_DETECTIONS, status=400)
    arrays = await decode_all(images, service.decode_limiter, max_pixels=s.max_pixels, max_bytes=s.max_body_bytes)
    operation = "detect" if runtime.info.task == "detection" else "embed"
    tensors = _tensor_outputs(runtime, await service.run(runtime, operation, arrays, deadline), opts)

    requested = header.get("outputs")
    binary_default = bool(params.get("binary_data_output", False))
    wanted: list[tuple[str, bool]] = []
    if isinstance(requested, list) and requested:
        for out in requested:
            name = out.get("name") if isinstance(out, dict) else None
            if name not in tensors:
                raise ServiceError(400, "unknown_output", f"unknown output {name!r}; this model has {sorted(tensors)}")
            out_params = out.get("parameters") or {}
            wanted.append((name, bool(out_params.get("binary_data", binary_default))
                           if isinstance(out_params, dict) else binary_default))
    else:
        wanted = [(name, binary_default) for name in tensors]

    outputs, chunks = [], []
    for name, as_binary in wanted:
        array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": _datatype(array), "shape": list(array.shape)}
        if as_binary:
            raw = _binary(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    result: dict[str, Any] = {"model_name": runtime.info.name, "model_version": runtime.info.revision,
                              "outputs": outputs}
    if "id" in header:
        result["id"] = header["id"]
    header_bytes = json.dumps(result).encode()
    if not chunks:
        return Response(header_bytes, media_type="application/json")
    return Response(header_bytes + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header_bytes))})
