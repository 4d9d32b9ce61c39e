"""``/v1``: our own protocol (detect, features, models) and the Hugging Face-style route per model."""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from insloc_hub.serve.errors import ServiceError
from insloc_hub.serve.inputs import (
    b64_image,
    decode_all,
    images_and_options,
    looks_like_json,
    model_option,
    parse_json,
    parse_options,
    read_body,
)
from insloc_hub.serve.negotiate import preferred_type
from insloc_hub.serve.render import annotated_png, filter_detections, safetensors_bytes
from insloc_hub.serve.service import ModelRuntime, Service

router = APIRouter()

#: what /v1/features answers, the default (on a tie or without Accept) first
_FEATURE_TYPES = ("application/json", "application/octet-stream")

_IMAGE_BODY = {
    "requestBody": {
        "description": "images as multipart files, one raw image body, or JSON {\"images\": [\"<base64>\"]}",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"}, "score_threshold": {"type": "number"},
                "max_detections": {"type": "integer"}, "classes": {"type": "string"}}}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                "max_detections": {"type": "integer", "minimum": 0},
                "classes": {"type": "array", "items": {"type": "string"}},
                "model": {"type": "string"}}}},
        },
    },
    "responses": {"400": {"description": "corrupt image"}, "413": {"description": "too large"},
                  "415": {"description": "not an image"}, "422": {"description": "invalid request"},
                  "503": {"description": "busy or not ready"}, "504": {"description": "deadline passed"}},
}


def _service(request: Request) -> Service:
    return request.app.state.service


async def _prepare(request: Request) -> tuple[Service, ModelRuntime, list, Any, dict[str, float]]:
    service = _service(request)
    s = service.settings
    started, deadline = time.perf_counter(), service.deadline()
    body = await read_body(request, s.max_body_bytes, deadline)
    images, raw_options = await images_and_options(request, body, s.max_images)
    # the model must be known before its class names can validate ``classes``
    runtime = service.model(model_option(raw_options))
    opts = parse_options(raw_options, runtime.info.class_names)
    arrays = await decode_all(images, service.decode_limiter, max_pixels=s.max_pixels, max_bytes=s.max_body_bytes)
    return service, runtime, arrays, opts, {"started": started, "deadline": deadline,
                                            "decode_ms": (time.perf_counter() - started) * 1e3}


def _timings(t: dict[str, float], inference_started: float) -> dict[str, float]:
    now = time.perf_counter()
    return {"decode_ms": round(t["decode_ms"], 2), "inference_ms": round((now - inference_started) * 1e3, 2),
            "total_ms": round((now - t["started"]) * 1e3, 2)}


@router.post("/v1/detect", summary="Detect objects in one or more images", openapi_extra=_IMAGE_BODY)
async def detect(request: Request, annotated: bool = False) -> Response:
    """Detections per image (label, score, box in original pixels); ``?annotated=1`` answers a PNG."""
    service, runtime, arrays, opts, t = await _prepare(request)
    if annotated and len(arrays) != 1:
        raise ServiceError(422, "invalid_option", f"annotated=1 draws one image; this request has {len(arrays)}")
    inference_started = time.perf_counter()
    results = await service.run(runtime, "detect", arrays, t["deadline"])
    names = runtime.info.class_names
    per_image = [filter_detections(det, opts, names) for det in results]
    if annotated:
        png = await anyio.to_thread.run_sync(annotated_png, arrays[0], per_image[0],
                                             limiter=service.decode_limiter)
        return Response(png, media_type="image/png", headers={"X-Model": runtime.info.tag})
    return JSONResponse({
        "model": runtime.info.tag,
        "results": [{"index": i, "width": int(a.shape[1]), "height": int(a.shape[0]), "detections": d}
                    for i, (a, d) in enumerate(zip(arrays, per_image))],
        "timings": _timings(t, inference_started),
    })


@router.post("/v1/features", summary="Embeddings (JSON) or FPN maps (safetensors) per image",
             openapi_extra=_IMAGE_BODY)
async def features(request: Request) -> Response:
    """Pooled embedding per image as JSON; with ``Accept: application/octet-stream`` every map as safetensors."""
    accept = ", ".join(request.headers.getlist("accept"))
    answer = preferred_type(accept, _FEATURE_TYPES)
    if answer is None:  # refused before the body is read: nothing would be worth computing
        raise ServiceError(406, "not_acceptable", f"nothing in Accept: {accept[:200]!r} is offered; /v1/features "
                                                  "answers application/json (embeddings) or "
                                                  "application/octet-stream (safetensors maps)")
    service, runtime, arrays, _opts, t = await _prepare(request)
    binary = answer == "application/octet-stream"
    inference_started = time.perf_counter()
    if binary:
        results = await service.run(runtime, "features", arrays, t["deadline"])
        data = await anyio.to_thread.run_sync(safetensors_bytes, results, runtime.info.tag)
        return Response(data, media_type="application/octet-stream", headers={"X-Model": runtime.info.tag})
    embeddings = await service.run(runtime, "embed", arrays, t["deadline"])
    return JSONResponse({
        "model": runtime.info.tag,
        "results": [{"index": i, "width": int(a.shape[1]), "height": int(a.shape[0]),
                     "embedding": [round(float(x), 6) for x in e]} for i, (a, e) in enumerate(zip(arrays, embeddings))],
        "timings": _timings(t, inference_started),
    })


@router.get("/v1/models", summary="What is loaded")
async def models(request: Request) -> JSONResponse:
    service = _service(request)
    return JSONResponse({"ready": service.ready, "models": [m.info.to_dict() for m in service.models.values()]})


@router.post("/hf/{model_name}", summary="Hugging Face Inference Endpoint-style route for one model",
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": {"type": "object", "properties": {
                     "inputs": {"type": "string", "format": "byte"}, "parameters": {"type": "object"}}}},
                 "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
async def hugging_face(request: Request, model_name: str) -> JSONResponse:
    """What ``huggingface_hub.InferenceClient(url).object_detection / feature_extraction`` send and expect.

    The body is either raw image bytes (any or no Content-Type) or ``{"inputs": "<base64>", "parameters":
    {"threshold": t}}``. Detectors answer ``[{"label", "score", "box"}]``; backbones ``[[floats]]``.
    """
    service = _service(request)
    s, deadline = service.settings, service.deadline()
    runtime = service.model(model_name)
    body = await read_body(request, s.max_body_bytes, deadline)
    raw_options: dict[str, Any] = {}
    if looks_like_json(body, request.headers.get("content-type", "").lower()):
        payload = parse_json(body)
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise ServiceError(422, "invalid_json", "expected {\"inputs\": \"<base64 image>\", \"parameters\": {...}}")
        parameters = payload.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ServiceError(422, "invalid_option", "\"parameters\" must be an object")
        # the client sends every parameter it knows, unset ones as null; only the threshold matters here
        raw_options = {k: v for k, v in parameters.items() if k == "threshold" and v is not None}
        images = [b64_image(payload["inputs"], 0)]
    else:
        images = [body]
    opts = parse_options(raw_options, runtime.info.class_names)
    arrays = await decode_all(images, service.decode_limiter, max_pixels=s.max_pixels, max_bytes=s.max_body_bytes)
    if runtime.info.task == "detection":
        (det,) = await service.run(runtime, "detect", arrays, deadline)
        return JSONResponse([{k: d[k] for k in ("label", "score", "box")}
                             for d in filter_detections(det, opts, runtime.info.class_names)])
    (embedding,) = await service.run(runtime, "embed", arrays, deadline)
    return JSONResponse([[float(x) for x in embedding]])
