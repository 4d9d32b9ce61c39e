"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 10.0


class ServiceMetrics:
    """Requests by route and status, latency, batch sizes, queue depth and images per second."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("insloc_requests", "HTTP requests by route template and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("insloc_request_latency_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("insloc_batch_size", "images per device batch", ["model", "operation"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("insloc_batch_seconds", "device time per batch", ["model", "operation"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("insloc_queue_depth", "images waiting for the device", ["model"],
                                 registry=self.registry)
        self.images = Counter("insloc_images", "images run through a model", ["model"], registry=self.registry)
        self.images_per_second = Gauge("insloc_images_per_second",
                                       f"images run per second over the last {RATE_WINDOW_S:.0f} s",
                                       registry=self.registry)
        self.images_per_second.set_function(self._rate)
        self._recent: deque[tuple[float, int]] = deque()

    def record_batch(self, model: str, operation: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model, operation).observe(size)
        self.batch_seconds.labels(model, operation).observe(seconds)
        self.images.labels(model).inc(size)
        self._recent.append((time.monotonic(), size))

    def _rate(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
