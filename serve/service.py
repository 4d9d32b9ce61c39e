"""The running service: loaded models, their batchers, the device thread, readiness.

Protocol layers (``/v1``, the Hugging Face route, ``/v2``) call :meth:`Service.run`; they never touch
a model, and backends never see HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from insloc_hub.errors import ConfigError, ImageGeometryError, InsLocError
from insloc_hub.serve.backends import WARMUP_SIZE, Backend, load_backend, served_name
from insloc_hub.serve.batching import Batcher, DeadlineExceeded, QueueFull
from insloc_hub.serve.errors import ServiceError
from insloc_hub.serve.metrics import ServiceMetrics
from insloc_hub.serve.settings import Settings

logger = logging.getLogger("insloc_hub.serve")

OPERATIONS = ("detect", "embed", "features")


@dataclass
class ModelRuntime:
    """One served model: its backend and one batcher per operation it supports."""

    backend: Backend
    batchers: dict[str, Batcher]

    @property
    def info(self):
        return self.backend.info


class Service:
    """Holds every model of one app; created by ``create_app`` and started by its lifespan."""

    def __init__(self, settings: Settings, backends: list[Backend] | None = None) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.models: dict[str, ModelRuntime] = {}
        self.ready = False
        self.load_error: str | None = None
        self._given = backends
        self._prepared: list[Backend] | None = None
        # one thread feeds the device: batches never compete for it
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insloc-device")
        self.decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.inflight = 0  # requests past the edge (reading, decoding, queued or running); set by the app
        self.queued_requests = 0  # of those, requests waiting in a batcher

    # -- lifecycle ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load every model, check their names and warm them up, on the device thread; once.

        The CLI calls this before the port listens, so every way a model can fail ends the process with
        one line; the app's lifespan calls it (through :meth:`start`) for servers that build the app.

        Raises:
            InsLocError: a model that cannot be loaded or warmed up, two models with one name, no model.
        """
        try:
            self.device_thread.submit(self._prepare).result()
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, InsLocError) else _first_line(exc)
            raise

    async def start(self) -> None:
        """Prepare (unless the CLI already did), then start a batcher per model: ready, or raise.

        Raising here fails the ASGI lifespan startup, so uvicorn exits instead of serving a service that
        can never become ready.
        """
        await asyncio.to_thread(self.prepare)  # waits for the device thread without blocking the loop
        for backend in self._prepared or []:
            self.models[backend.info.name] = ModelRuntime(backend, self._batchers(backend))
        self.ready = True
        logger.info("ready: %s", ", ".join(m.info.tag for m in self.models.values()))

    def _prepare(self) -> None:
        if self._prepared is not None:
            return
        if self.settings.threads:  # on this thread: the one that runs every batch
            import torch

            torch.set_num_threads(self.settings.threads)
        if self._given is not None:
            backends = list(self._given)
            _check_names(backends, [b.info.source for b in backends])
        else:
            backends = []
            for spec in self.settings.models:
                backends.append(self._load_one(spec))
                _check_names(backends, self.settings.models)  # before loading (and warming) the rest
        if not backends:
            raise ConfigError("no model to serve; pass --model NAME (a hub name, folder or .onnx file) or set "
                              "INSLOC_SERVE_MODELS")
        if self.settings.warmup:
            for backend in backends:
                _warm_up(backend)
        self._prepared = backends

    def _load_one(self, spec: str) -> Backend:
        s = self.settings
        started = time.monotonic()
        try:
            backend = load_backend(spec, backend=s.backend, revision=s.revision, device=s.device,
                                   compile=s.compile, threads=s.threads, precision=s.precision)
        except InsLocError:
            raise
        except Exception as exc:  # a library's own error type: still one line naming the model
            raise ConfigError(f"could not load --model {spec}: {_first_line(exc)}") from exc
        logger.info("loaded %s (%s on %s) in %.2f s", backend.info.tag, backend.info.backend, backend.info.device,
                    time.monotonic() - started)
        return backend

    def _batchers(self, backend: Backend) -> dict[str, Batcher]:
        s = self.settings
        operations = ["detect"] if backend.info.task == "detection" else ["embed", "features"]
        batchers = {}
        for op in operations:
            def on_batch(size: int, seconds: float, op: str = op) -> None:
                self.metrics.record_batch(backend.info.name, op, size, seconds)

            batcher = Batcher(getattr(backend, op), self.device_thread, max_batch_size=s.max_batch_size,
                              max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, on_batch=on_batch,
                              more_coming=self._more_coming)
            batcher.start()
            batchers[op] = batcher
        self.metrics.queue_depth.labels(backend.info.name).set_function(
            lambda: sum(b.depth for b in batchers.values()))
        return batchers

    def _more_coming(self) -> bool:
        """Requests still being read or decoded: a batch is worth waiting for only then."""
        return self.inflight > self.queued_requests

    async def stop(self) -> None:
        """Finish queued work, then release the device thread."""
        for runtime in self.models.values():
            for batcher in runtime.batchers.values():
                await batcher.close()
        self.device_thread.shutdown(wait=True, cancel_futures=False)

    # -- requests ----------------------------------------------------------------------------
    def model(self, name: str | None) -> ModelRuntime:
        """The model a request names (or the only one); 503 before ready, 404 unknown, 422 ambiguous."""
        if not self.ready:
            reason = f": {self.load_error}" if self.load_error else " (loading and warming up)"
            raise ServiceError(503, "not_ready", f"the service is not ready{reason}", {"Retry-After": "1"})
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ServiceError(422, "model_required", f"several models are served; name one with model= "
                                                      f"({sorted(self.models)})")
        if name not in self.models:
            raise ServiceError(404, "model_not_found", f"no model named {name!r}; served: {sorted(self.models)}")
        return self.models[name]

    def deadline(self) -> float:
        """The ``time.monotonic()`` by which a request arriving now must be answered (``--request-timeout-s``)."""
        return time.monotonic() + self.settings.request_timeout_s

    async def run(self, runtime: ModelRuntime, operation: str, images: list[np.ndarray], deadline: float
                  ) -> list[Any]:
        """Queue the images for ``operation`` and wait; 503 when the queue is full, 504 past ``deadline``
        (from :meth:`deadline` when the request arrived: reading and decoding its body count too)."""
        batcher = runtime.batchers.get(operation)
        if batcher is None:
            what = "a detector" if runtime.info.task == "detection" else f"a {runtime.info.task} model"
            raise ServiceError(422, "wrong_task", f"model {runtime.info.name!r} is {what}; it cannot {operation}")
        if operation == "detect":
            try:  # here, where the index is the request's own, not the batch's
                runtime.backend.check_images(images)
            except ImageGeometryError as exc:
                raise ServiceError(422, "unsupported_image_size", str(exc)) from exc
        self.queued_requests += 1
        try:
            results = await batcher.submit(images, deadline)
        except QueueFull as exc:
            raise ServiceError(503, "queue_full", f"the service is busy ({exc}); retry shortly",
                               {"Retry-After": "1"}) from exc
        except DeadlineExceeded as exc:
            raise ServiceError(504, "deadline_exceeded", f"the request took longer than "
                                                         f"{self.settings.request_timeout_s:g} s: {exc}") from exc
        except InsLocError as exc:
            raise ServiceError(422, "wrong_task", str(exc)) from exc
        except Exception as exc:  # the model failed on these images alone (the batcher isolates them)
            raise ServiceError(422, "inference_failed", f"the model could not process the image: {exc}") from exc
        finally:
            self.queued_requests -= 1
        return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _check_names(backends: list[Backend], specs: list[str]) -> None:
    """Two models under one name would shadow each other: refuse, suggesting NAME=PATH for each."""
    seen: dict[str, int] = {}
    for index, backend in enumerate(backends):
        name = backend.info.name
        if name in seen:
            first, second = specs[seen[name]], specs[index]
            raise ConfigError(f"two models are named {name!r} (from their config or ONNX metadata): {first} and "
                              f"{second}; name each with NAME=PATH, e.g. --model {_suggest(first, name, '1')} "
                              f"--model {_suggest(second, name, '2')}")
        seen[name] = index


def _suggest(spec: str, name: str, suffix: str) -> str:
    """``NAME=PATH`` for one clashing model: its file or folder name, unless that is the clashing name too."""
    match = re.fullmatch(r"[A-Za-z0-9._-]+=(.+)", spec)
    path = match.group(1) if match else spec
    stem = served_name(Path(path.rstrip("/")).stem or name)
    return f"{stem if stem != name else f'{name}-{suffix}'}={path}"


def _warm_up(backend: Backend) -> None:
    """One warm-up pass; a model that cannot run its first image will not run a client's either."""
    started = time.monotonic()
    try:
        backend.warmup()
    except Exception as exc:
        raise ConfigError(f"model {backend.info.tag} ({backend.info.source}) failed its warm-up pass on a "
                          f"{WARMUP_SIZE}x{WARMUP_SIZE} image: {_first_line(exc)}; it cannot serve requests: "
                          "re-export or re-save it, or check --device and --backend") from exc
    logger.info("warmed up %s in %.2f s", backend.info.tag, time.monotonic() - started)
