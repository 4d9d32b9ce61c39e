"""The service's one error shape: ``{"error": {"code", "message"}}`` (KServe v2 routes: ``{"error": "..."}``)."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from insloc_hub.errors import InvalidImageError


class ServiceError(Exception):
    """An error answered to the client: HTTP ``status``, a stable ``code`` and a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2")


def error_response(request: Request, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message} if is_v2(request) else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def image_error(exc: InvalidImageError, index: int) -> ServiceError:
    """Map the shared decoder's error to 413 (over a limit), 415 (not an image) or 400 (corrupt, empty).

    Uses ``exc.reason`` when the decoder sets one, else the decoder's message.
    """
    reason = str(getattr(exc, "reason", "") or "").lower()
    text = str(exc)
    where = f"image {index}: {text}"
    if reason in ("too_large", "too_many_pixels", "pixels", "bytes", "limit", "over_limit") or (
            not reason and ("over the limit" in text or "decompression-bomb" in text)):
        return ServiceError(413, "image_too_large", where)
    if reason in ("unsupported", "not_image", "unsupported_format", "format") or (
            not reason and "not a recognised image format" in text):
        return ServiceError(415, "unsupported_image", where)
    return ServiceError(400, "corrupt_image", where)


def _status_code_name(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            406: "not_acceptable", 408: "request_timeout", 413: "too_large", 415: "unsupported_media_type",
            422: "invalid_request", 503: "unavailable"}.get(status, "error")


def install_error_handlers(app) -> None:
    """Every error (ours, FastAPI's validation, Starlette's 404/405, anything unexpected) in the one shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return error_response(request, 422, "invalid_request", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, _status_code_name(exc.status_code), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: logged, never a traceback
        import logging

        logging.getLogger("insloc_hub.serve").exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, "internal_error", f"internal error ({type(exc).__name__}); see the log")
