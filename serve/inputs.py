"""Reading requests: the body under a size limit, images from multipart / raw / JSON base64, options.

Only image *bytes* are accepted: never a file path or URL (a string must be base64).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from fastapi import Request

from insloc_hub.errors import InvalidImageError
from insloc_hub.serve.errors import ServiceError, image_error
from insloc_hub.transforms import decode_image

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")  # str.isspace and \s would also pass Unicode spaces
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/= \t\n\r\f\v]")
_INTEGER_TEXT = re.compile(r"[+-]?\d{1,18}")
#: the most detections a request may ask for
MAX_DETECTIONS = 10_000
#: content types read as one raw image body, sniffed by content. curl's --data-binary and -d send
#: application/x-www-form-urlencoded unless told otherwise, and no route here takes HTML forms.
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")


@dataclass
class Options:
    """Per-request options of /v1/detect (and the other protocols' equivalents)."""

    model: str | None = None
    score_threshold: float = 0.0
    max_detections: int | None = None
    classes: list[str] | None = None


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The whole body, refusing (413) more than ``limit`` bytes as soon as the header or stream shows it.

    A body still incomplete at ``deadline`` (``time.monotonic()`` seconds, the request's deadline) is a
    408 that closes the connection, so a client that stalls mid-upload cannot hold an in-flight slot
    past it.
    """
    timeout_s = max(deadline - time.monotonic(), 0.0)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise ServiceError(400, "bad_request", f"invalid Content-Length header {declared!r}") from exc
        if size > limit:
            raise ServiceError(413, "body_too_large", f"request body is {size:,} bytes, over the limit of {limit:,}")
    chunks, total = [], 0
    with anyio.move_on_after(timeout_s) as reading:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ServiceError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
    if reading.cancelled_caught:
        # the rest of the body may still come: the connection cannot carry another request, so it closes
        raise ServiceError(408, "request_timeout", f"the request body did not arrive within {timeout_s:.1f} s, "
                                                   f"the request's deadline ({total:,} bytes received); send it "
                                                   "at once",
                           {"Connection": "close"})
    body = b"".join(chunks)
    request._body = body  # lets Starlette's form parser read the body we already hold
    return body


def b64_image(value: Any, index: int, status: int = 422) -> bytes:
    """Decode one base64 image string (a ``data:...;base64,`` prefix is allowed); error ``status`` otherwise.

    ASCII whitespace inside is skipped, as MIME decoders do, so line-wrapped base64 (Python's
    ``base64.encodebytes``, GNU ``base64`` without ``-w0``) is accepted; any other character outside
    the standard alphabet is refused, naming the character and its position.
    """
    if not isinstance(value, str):
        raise ServiceError(status, "invalid_image_field",
                           f"image {index} must be a base64 string, got {type(value).__name__}")
    text = _DATA_URL.sub("", value.strip())
    stray = _NOT_BASE64.search(text)
    if stray is not None:
        hint = " (file paths and URLs are not accepted: send the image bytes)" if ("/" in text[:200] and "." in
                                                                                  text[:200]) else ""
        raise ServiceError(status, "invalid_base64", f"image {index} is not valid base64{hint}: character "
                                                     f"{stray.group()!r} at position {stray.start()} is not in "
                                                     "the base64 alphabet (A-Z a-z 0-9 + / =)")
    try:
        return base64.b64decode(_ASCII_SPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError) as exc:  # wrong length or misplaced padding
        raise ServiceError(status, "invalid_base64", f"image {index} is not valid base64: {exc}") from exc


def parse_json(body: bytes, status: int = 422) -> Any:
    """The JSON document in ``body``, or error ``status`` with code ``invalid_json`` (v1 and /hf: 422, KServe v2: 400).

    The one JSON reader of every protocol, so all of them refuse the same documents the same way.
    """
    try:
        return json.loads(body)
    except RecursionError as exc:  # the decoder recurses once per [ or {: deep nesting hits Python's stack guard
        raise ServiceError(status, "invalid_json", "the JSON body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise ServiceError(status, "invalid_json", f"the body is not valid JSON: {exc}") from exc


def looks_like_json(body: bytes, content_type: str) -> bool:
    """True for a JSON content type, or an untyped body starting with ``{`` (no image format does)."""
    if content_type.startswith("application/json") or content_type.endswith("+json"):
        return True
    return not content_type.startswith("image/") and body.lstrip()[:1] == b"{"


async def images_and_options(request: Request, body: bytes, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """Encoded images and raw option values from a multipart, raw-image or JSON body (plus query options).

    JSON: ``{"images": ["<base64>", ...]}`` (or ``"image"``/``"inputs"`` with one string) and options
    beside them. Multipart: every file part is an image; text fields are options.
    """
    content_type = request.headers.get("content-type", "").lower()
    options: dict[str, Any] = {k: v for k, v in request.query_params.items() if k != "annotated"}
    if "classes" in request.query_params:
        options["classes"] = split_classes(request.query_params.getlist("classes"))
    images: list[bytes]
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=max_images + 1, max_fields=64)
        except Exception as exc:  # python-multipart / Starlette raise several types for malformed bodies
            if "too many files" in str(exc).lower():
                raise ServiceError(413, "too_many_images", f"more than {max_images} images in one request") from exc
            raise ServiceError(422, "invalid_multipart", f"malformed multipart body: {exc}") from exc
        images = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                images.append(await value.read())
            elif key == "classes":  # repeated fields add up, like a repeated query parameter
                options["classes"] = options.get("classes", []) + split_classes([str(value)])
            else:
                options[key] = value
        await form.close()
        if not images:
            raise ServiceError(422, "no_images", "the multipart body has no file part; send images as files "
                                                 "(curl -F image=@photo.jpg)")
    elif looks_like_json(body, content_type):
        payload = parse_json(body)
        if not isinstance(payload, dict):
            raise ServiceError(422, "invalid_json", "the JSON body must be an object like {\"images\": [\"<base64>\"]}")
        keys = [k for k in ("images", "image", "inputs") if k in payload]
        if len(keys) != 1:
            raise ServiceError(422, "no_images", "the JSON body needs exactly one of \"images\" (a list of base64 "
                                                 "strings), \"image\" or \"inputs\" (one base64 string)")
        raw = payload.pop(keys[0])
        raw_list = raw if isinstance(raw, list) else [raw]
        if len(raw_list) > max_images:
            raise ServiceError(413, "too_many_images",
                               f"{len(raw_list)} images in one request; the limit is {max_images}")
        images = [b64_image(v, i) for i, v in enumerate(raw_list)]
        parameters = payload.pop("parameters", None)
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ServiceError(422, "invalid_option", "\"parameters\" must be an object")
            options.update(parameters)
        options.update(payload)
    elif not content_type or content_type.startswith(RAW_TYPES):
        images = [body]
    else:
        raise ServiceError(415, "unsupported_media_type",
                           f"unsupported Content-Type {content_type!r}; send multipart/form-data, an image body "
                           "(image/jpeg, image/png..., application/octet-stream) or application/json with base64 "
                           "images")
    if not images:
        raise ServiceError(422, "no_images", "the request has no image")
    if len(images) > max_images:
        raise ServiceError(413, "too_many_images", f"{len(images)} images in one request; the limit is {max_images}")
    return images, options


def split_classes(texts: list[str]) -> list[str]:
    """``["cat,dog", "raccoon"]`` -> ``["cat", "dog", "raccoon"]``.

    The one reading of class names given as text: query values, form fields and a JSON string alike
    (a JSON list is taken as it is).
    """
    return [name.strip() for text in texts for name in text.split(",") if name.strip()]


def model_option(raw: dict[str, Any]) -> str | None:
    """The served model a request names (None: not named); a name of the wrong type is a 422 that says so."""
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise ServiceError(422, "invalid_option", f"model must be a string (a served model name), "
                                                  f"got {type(model).__name__} {_shown(model)}")
    return model


def _shown(value: Any) -> str:
    """A client's value for an error message, cut short (it may be megabytes long)."""
    try:
        text = repr(value)
    except ValueError:  # an integer over Python's digit limit for str()
        text = f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def float_option(name: str, value: Any, low: float, high: float, status: int = 422) -> float:
    """``value`` (a JSON number or the text of a form field / query value) as a float in [low, high].

    Everything else is error ``status`` with code ``invalid_option``: bools, non-numbers, NaN, infinities
    (a JSON ``1e999`` reads as inf) and integers too large for a float.
    """
    problem = ServiceError(status, "invalid_option", f"{name} must be a number within [{low:g}, {high:g}], "
                                                     f"got {_shown(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise problem
    try:
        number = float(value)
    except (ValueError, OverflowError) as exc:  # not a number; an integer beyond float's range
        raise problem from exc
    if not low <= number <= high:  # also false for NaN and the infinities
        raise problem
    return number


def int_option(name: str, value: Any, low: int, high: int, status: int = 422) -> int:
    """``value`` (a JSON integer or the text of one) as an int in [low, high]; else error ``status``.

    Floats are refused even when whole (``2.0``, ``1e999``), as are bools and texts that are not plain integers.
    """
    problem = ServiceError(status, "invalid_option", f"{name} must be an integer within [{low}, {high}], "
                                                     f"got {_shown(value)}")
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        value = int(value)  # at most 18 digits: never near Python's conversion limit
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise problem
    return value


def parse_options(raw: dict[str, Any], class_names: list[str]) -> Options:
    """Validate option values (422 on anything wrong or unknown)."""
    known = {"model", "score_threshold", "threshold", "max_detections", "classes"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ServiceError(422, "invalid_option", f"unknown option(s) {unknown}; allowed: {sorted(known)}")
    opts = Options()
    opts.model = model_option(raw)
    threshold = raw.get("score_threshold", raw.get("threshold"))
    if threshold is not None:
        opts.score_threshold = float_option("score_threshold", threshold, 0.0, 1.0)
    if raw.get("max_detections") is not None:
        opts.max_detections = int_option("max_detections", raw["max_detections"], 0, MAX_DETECTIONS)
    if raw.get("classes") is not None:
        classes = raw["classes"]
        if isinstance(classes, str):
            classes = split_classes([classes])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ServiceError(422, "invalid_option", "classes must be a list of class names")
        missing = [c for c in classes if c not in class_names]
        if missing:
            raise ServiceError(422, "invalid_option", f"unknown classes {missing}; this model knows {class_names}")
        opts.classes = classes
    return opts


def decode_to_array(data: bytes, index: int, *, max_pixels: int, max_bytes: int) -> np.ndarray:
    """Decode with the shared decoder into an RGB ``uint8`` array ``[H, W, 3]``; errors mapped to 4xx."""
    try:
        image = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except InvalidImageError as exc:
        raise image_error(exc, index) from exc
    array = np.array(image, dtype=np.uint8)  # writable: torch.from_numpy shares it without a warning
    image.close()
    return array


async def decode_all(images: list[bytes], limiter: anyio.CapacityLimiter, *, max_pixels: int,
                     max_bytes: int) -> list[np.ndarray]:
    """Decode every image in worker threads (never on the event loop), at most ``limiter`` at once."""
    arrays = []
    for index, data in enumerate(images):
        arrays.append(await anyio.to_thread.run_sync(
            lambda d=data, i=index: decode_to_array(d, i, max_pixels=max_pixels, max_bytes=max_bytes),
            limiter=limiter))
    return arrays
