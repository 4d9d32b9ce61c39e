"""1,000 requests at concurrency 32 on a tiny detector: no failure, and the batcher really batches."""

from __future__ import annotations

import asyncio
import re

import httpx

from insloc_hub.serve.settings import Settings
from tests.serve.conftest import image_bytes

REQUESTS, CONCURRENCY = 1000, 32


def test_thousand_requests_at_concurrency_32(tiny_models, start_server):
    server = start_server(Settings(models=[str(tiny_models.detector)], max_batch_size=16, max_wait_ms=5))
    bodies = [image_bytes(64, 48, seed=i) for i in range(8)]

    async def drive() -> list[int]:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(REQUESTS):
                queue.put_nowait(i)
            statuses: list[int] = []

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    response = await client.post("/v1/detect", content=bodies[i % len(bodies)])
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        assert response.json()["results"][0]["width"] == 64

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return statuses

    statuses = asyncio.run(drive())
    assert len(statuses) == REQUESTS and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    metrics = httpx.get(server.url + "/metrics").text
    count = float(re.search(r'insloc_batch_size_count\{model="tiny-detector",operation="detect"\} (\S+)', metrics)[1])
    total = float(re.search(r'insloc_batch_size_sum\{model="tiny-detector",operation="detect"\} (\S+)', metrics)[1])
    singles = float(re.search(r'insloc_batch_size_bucket\{le="1.0",model="tiny-detector",operation="detect"\} (\S+)',
                              metrics)[1])
    assert total == REQUESTS
    assert count < REQUESTS and singles < count, (count, singles)  # batches larger than 1 happened
    assert f'insloc_requests_total{{method="POST",route="/v1/detect",status="200"}} {float(REQUESTS)}' in metrics
