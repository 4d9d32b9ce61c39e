"""The app factory: ``create_app(settings)`` builds the FastAPI app any ASGI server can run.

    uvicorn --factory insloc_hub.serve.app:app_from_env   # settings from INSLOC_SERVE_* variables

Models load and warm up during the lifespan startup (before the server listens); a failure fails the
startup, so the server exits with its one-line reason instead of answering 503 forever.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from insloc_hub.serve import routes_v1, routes_v2
from insloc_hub.serve.backends import Backend
from insloc_hub.serve.errors import install_error_handlers
from insloc_hub.serve.service import Service
from insloc_hub.serve.settings import Settings
from insloc_hub.version import __version__

#: paths anyone may call without the API key (load balancers, Prometheus, the docs)
OPEN_PATHS = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics", "/docs", "/openapi.json",
              "/docs/oauth2-redirect"}
#: paths that carry images (counted against max_inflight_requests)
_HEAVY_PREFIXES = ("/v1/detect", "/v1/features", "/hf/", "/v2/models/")


def create_app(settings: Settings | None = None, *, backends: list[Backend] | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: the configuration (default: from ``INSLOC_SERVE_*`` environment variables).
        backends: already-loaded backends to serve instead of loading ``settings.models`` (tests, embedding).

    Example:
        >>> app = create_app(Settings(models=["out/tiny-detector"]))  # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    settings = settings or Settings.from_env()
    api_key = settings.api_key()  # read once at start: a missing key file fails here, clearly
    service = Service(settings, backends)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # a model that fails to load or warm up fails the startup: uvicorn exits, nothing half-serves
            await service.start()
        except BaseException:
            await service.stop()
            raise
        try:
            yield
        finally:  # the server stopped accepting and finished open requests; drain the queues
            await service.stop()

    app = FastAPI(title="insloc-serve", version=__version__, lifespan=lifespan,
                  description="InsLoc detection and feature service: /v1 (ours), a Hugging Face-style route "
                              "per model (/hf/{model}) and KServe v2 (/v2).")
    app.state.service = service
    install_error_handlers(app)
    app.include_router(routes_v1.router)
    app.include_router(routes_v2.router)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every model loaded and warmed up")
    async def readyz() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready", "models": sorted(service.models)})
        status = "failed" if service.load_error else "loading"
        return JSONResponse({"status": status, "error": service.load_error}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_EdgeMiddleware, service=service, api_key=api_key)
    return app


def app_from_env() -> FastAPI:
    """``create_app`` with settings from the environment (for ``uvicorn --factory`` / gunicorn workers)."""
    return create_app(Settings.from_env())


class _EdgeMiddleware:
    """Per request: API key, in-flight limit, and metrics (route template, status, latency).

    A plain ASGI middleware (not BaseHTTPMiddleware) so streaming bodies and cancellation pass through.
    """

    def __init__(self, app: ASGIApp, service: Service, api_key: str | None) -> None:
        self.app, self.service, self.api_key = app, service, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._one_line_startup_failure(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        started = time.perf_counter()
        status = {"code": 500}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        heavy = path.startswith(_HEAVY_PREFIXES) and scope["method"] == "POST"
        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorised(scope):
                await self._reject(scope, send_recording, 401, "unauthorized",
                                   "missing or wrong API key; send Authorization: Bearer <key> or X-API-Key: <key>",
                                   {"WWW-Authenticate": "Bearer"})
            elif heavy and self.service.inflight >= self.service.settings.max_inflight_requests:
                await self._reject(scope, send_recording, 503, "busy",
                                   f"{self.service.inflight} requests are in progress; retry shortly",
                                   {"Retry-After": "1"})
            else:
                if heavy:
                    self.service.inflight += 1
                try:
                    await self.app(scope, receive, send_recording)
                finally:
                    if heavy:
                        self.service.inflight -= 1
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status["code"] == 404 else "other")
            metrics = self.service.metrics
            metrics.requests.labels(template, scope["method"], str(status["code"])).inc()
            metrics.latency.labels(template).observe(time.perf_counter() - started)

    def _one_line_startup_failure(self, send: Send) -> Send:
        """The server logs a failed startup's message: the load error's one line, not Starlette's traceback."""

        async def send_lifespan(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.service.load_error:
                message = {**message, "message": f"insloc-serve: error: {self.service.load_error}"}
            await send(message)

        return send_lifespan

    def _authorised(self, scope: Scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest((given or "").encode(), self.api_key.encode())  # type: ignore[union-attr]

    async def _reject(self, scope: Scope, send: Send, status: int, code: str, message: str,
                      headers: dict[str, str]) -> None:
        request = Request(scope)
        from insloc_hub.serve.errors import error_response

        response = error_response(request, status, code, message, headers)
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
