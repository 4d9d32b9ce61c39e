"""insloc-serve under HTTP load vs the model alone in-process (the ceiling), in the same run.

Starts ``insloc-serve`` as a subprocess per (backend, batching) pair, drives ``/v1/detect`` over HTTP at
each concurrency with a real photograph, and prints img/s with p50/p95/p99 latency beside the
in-process model-only throughput (batch 1 is the baseline of the ratio column). Batching off and on
run as two servers at once, driven in alternating rounds (the fastest round counts), so that other
jobs on a shared machine disturb both alike. Goals on the CPU:
HTTP at concurrency 8 >= 85 % of in-process batch 1; batching on not slower than off.

    python benchmarks/serve_load.py                         # ResNet-50 Faster R-CNN, 320 px, 1 thread
    python benchmarks/serve_load.py --backends torch --concurrency 1,8 --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``python benchmarks/serve_load.py`` imports ``benchmarks.runner``
    sys.path.insert(0, str(REPO))

from benchmarks.runner import Row, measure, print_table  # noqa: E402


def photograph(width: int, height: int) -> bytes:
    """A real photograph (scikit-image's astronaut) as JPEG; random pixels when scikit-image is missing."""
    try:
        from skimage import data

        array = data.astronaut()
    except ImportError:
        array = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).resize((width, height)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_model(folder: Path, arch: str, size: int) -> Path:
    """A ResNet-50 Faster R-CNN (random weights: speed does not depend on them) saved as a hub folder."""
    import torch

    from insloc_hub import build_detector, save_pretrained

    torch.manual_seed(0)
    # fewer RPN proposals than torchvision's 1000: the 4conv1fc box head on 1000 RoIs dominates CPU time
    model = build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset=arch, min_size=size,
                           max_size=int(size * 1.5), rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=100)
    return save_pretrained(model, folder / "detector", name="r50-detector")


def export_onnx(folder: Path, out: Path) -> Path | None:
    """The folder exported by insloc-export (the onnxruntime backend's input), or None if export is missing."""
    try:
        from insloc_hub.export import export_onnx as export
    except ImportError:
        print("insloc_hub.export is not available: onnxruntime rows skipped", file=sys.stderr)
        return None
    # parity off: random weights give near-tied scores whose order float noise flips (speed does not depend on
    # it; parity is insloc-export's own test on trained models)
    result = export(str(folder), out, task="detector", verify=False)
    return Path(getattr(result, "path", out))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``insloc-serve`` in a subprocess, ready when /readyz says so."""

    def __init__(self, model: Path, threads: int, batch: int, wait_ms: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "insloc_hub.serve.cli", "--model", str(model), "--port", str(self.port),
                   "--threads", str(threads), "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms),
                   "--max-queue", "4096", "--max-inflight-requests", "4096", "--request-timeout-s", "3600",
                   "--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.process.stderr.read().decode())
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("insloc-serve did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


async def drive(url: str, body: bytes, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send ``requests`` POSTs with ``concurrency`` in flight; wall seconds and per-request latencies."""
    latencies: list[float] = []
    remaining = list(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        async def worker() -> None:
            while remaining:
                remaining.pop()
                start = time.perf_counter()
                response = await client.post(url + "/v1/detect", content=body, headers={"content-type": "image/jpeg"})
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="r50-fpn", help="backbone preset of the Faster R-CNN (default r50-fpn)")
    parser.add_argument("--size", type=int, default=320, help="detector min_size and the photo's short side")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads, same everywhere")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--max-batch-size", type=int, default=8, help="batching on (off is 1)")
    parser.add_argument("--max-requests", type=int, default=32, help="requests per concurrency level (at most)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating off/on rounds; the fastest counts")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from insloc_hub.serve.backends import load_backend
    from insloc_hub.serve.inputs import decode_to_array

    levels = [int(c) for c in args.concurrency.split(",")]
    body = photograph(round(args.size * 4 / 3), args.size)
    image = decode_to_array(body, 0, max_pixels=10**8, max_bytes=10**8)
    workload = f"faster_rcnn {args.arch} {args.size}px"
    rows: list[Row] = []
    latency_lines = ["| backend | batching | concurrency | requests | img/s | p50 ms | p95 ms | p99 ms |",
                     "|---|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp), args.arch, args.size)
        models = {"torch": folder} if "torch" in args.backends else {}
        if "onnxruntime" in args.backends:
            onnx_file = export_onnx(folder, Path(tmp) / "detector.onnx")
            if onnx_file is not None:
                models["onnxruntime"] = onnx_file
        for backend_name, model in models.items():
            backend = load_backend(str(model), backend=backend_name, device="cpu", threads=args.threads)
            # both servers stay up (idle when not driven); rounds alternate off/on so that the other jobs of a
            # shared machine disturb both alike; the fastest round of each cell counts
            servers = {"off": Server(model, args.threads, 1, 5.0), "on": Server(model, args.threads,
                                                                               args.max_batch_size, 5.0)}
            try:
                for server in servers.values():
                    server.wait_ready()
                    asyncio.run(drive(server.url, body, 2, 1))  # connection and first-request warm-up
                best: dict[tuple[str, int], tuple[float, list[float], int]] = {}
                ceiling: dict[int, Row] = {}
                for round_index in range(args.rounds):
                    for batch in (1, 4):  # the model alone, in this process, in the same rounds
                        row = measure(workload, f"in-process {backend_name} batch {batch} (ceiling)",
                                      lambda b=batch, be=backend: be.detect([image] * b), images=batch, repeats=2,
                                      warmup=1 if round_index == 0 else 0,
                                      baseline=(backend_name == next(iter(models)) and batch == 1))
                        print(f"round {round_index + 1} {row.variant}: {row.images_per_second:.3f} img/s", flush=True)
                        if batch not in ceiling or row.seconds < ceiling[batch].seconds:
                            ceiling[batch] = row
                    for concurrency in levels:
                        requests = min(args.max_requests, max(4, 2 * concurrency))
                        for batching, server in servers.items():
                            wall, latencies = asyncio.run(drive(server.url, body, requests, concurrency))
                            print(f"round {round_index + 1} {backend_name} c={concurrency} batching {batching}: "
                                  f"{requests / wall:.3f} img/s", flush=True)
                            if (batching, concurrency) not in best or wall < best[(batching, concurrency)][0]:
                                best[(batching, concurrency)] = (wall, latencies, requests)
            finally:
                for server in servers.values():
                    server.stop()
            del backend
            rows += [ceiling[1], ceiling[4]]
            for concurrency in levels:
                for batching in ("off", "on"):
                    wall, latencies, requests = best[(batching, concurrency)]
                    p50, p95, p99 = (percentile(latencies, q) * 1e3 for q in (50, 95, 99))
                    rows.append(Row(workload, f"HTTP {backend_name} c={concurrency} batching {batching}",
                                    wall / requests, 1, extra={"p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                                                               "requests": requests}))
                    latency_lines.append(f"| {backend_name} | {batching} | {concurrency} | {requests} | "
                                         f"{requests / wall:.3f} | {p50:.0f} | {p95:.0f} | {p99:.0f} |")
    print()
    print_table(rows, title=f"insloc-serve load vs in-process ({args.threads} thread(s); ratio vs in-process "
                            f"{next(iter(models))} batch 1)", json_path=args.json)
    print()
    print("\n".join(latency_lines))
    base = next(r for r in rows if r.baseline).images_per_second
    for backend_name in models:
        c8 = {r.variant.rsplit(" ", 1)[-1]: r for r in rows if r.variant.startswith(f"HTTP {backend_name} c=8 ")}
        if c8:
            best = max(r.images_per_second for r in c8.values())
            own = next(r for r in rows if r.variant == f"in-process {backend_name} batch 1 (ceiling)")
            print(f"{backend_name}: HTTP c=8 best {best:.2f} img/s = {best / own.images_per_second:.0%} of its "
                  f"in-process batch 1 (goal >= 85%), {best / base:.0%} of the baseline's; batching on/off at c=8: "
                  f"{c8['on'].images_per_second / c8['off'].images_per_second:.2f}x (goal >= 1)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
