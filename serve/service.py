"""The running service: loaded models, their batchers, the device thread, readiness.

Protocol layers (``/v1``, the Hugging Face route, ``/v2``) call :meth:`Service.run`; they never touch
a model, and backends never see HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from insloc_hub.errors import ConfigError, InsLocError
from insloc_hub.serve.backends import Backend, load_backend
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
        self._preloaded = backends
        # one thread feeds the device: batches never compete for it
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insloc-device")
        self.decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.inflight = 0  # requests past the edge (reading, decoding, queued or running); set by the app
        self.queued_requests = 0  # of those, requests waiting in a batcher
        self._load_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up every model in the background; ``ready`` turns true when all are."""
        self._load_task = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.settings.threads:
                import torch

                await loop.run_in_executor(self.device_thread, torch.set_num_threads, self.settings.threads)
            backends = self._preloaded
            if backends is None:
                backends = []
                for spec in self.settings.models:
                    backends.append(await loop.run_in_executor(self.device_thread, self._load_one, spec))
            if not backends:
                raise ConfigError("no model to serve; pass --model NAME (a hub name, folder or .onnx file)")
            for backend in backends:
                if backend.info.name in self.models:
                    raise ConfigError(f"two models are named {backend.info.name!r}; name them with --model NAME=SPEC")
                if self.settings.warmup:
                    started = time.monotonic()
                    await loop.run_in_executor(self.device_thread, backend.warmup)
                    logger.info("warmed up %s in %.2f s", backend.info.tag, time.monotonic() - started)
                self.models[backend.info.name] = ModelRuntime(backend, self._batchers(backend))
            self.ready = True
            logger.info("ready: %s", ", ".join(m.info.tag for m in self.models.values()))
        except (InsLocError, OSError) as exc:
            self.load_error = str(exc)
            logger.error("could not load the models: %s", exc)
        except Exception as exc:  # an unexpected failure still ends as a clear "not ready" with the reason
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("could not load the models")

    def _load_one(self, spec: str) -> Backend:
        s = self.settings
        started = time.monotonic()
        backend = load_backend(spec, backend=s.backend, revision=s.revision, device=s.device, compile=s.compile,
                               threads=s.threads, precision=s.precision)
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
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
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

    async def run(self, runtime: ModelRuntime, operation: str, images: list[np.ndarray]) -> list[Any]:
        """Queue the images for ``operation`` and wait; 503 when the queue is full, 504 past the deadline."""
        batcher = runtime.batchers.get(operation)
        if batcher is None:
            what = "a detector" if runtime.info.task == "detection" else f"a {runtime.info.task} model"
            raise ServiceError(422, "wrong_task", f"model {runtime.info.name!r} is {what}; it cannot {operation}")
        deadline = time.monotonic() + self.settings.request_timeout_s
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
