"""One small runner for every benchmark script: time a workload, print the same markdown table.

Each script measures its baseline and its variants in the same run (these machines are noisy) and
prints one table: workload, variant, throughput or latency, ratio to the same-run baseline, peak
memory, machine. ``--json`` output is the same rows as a list of dicts.

    from benchmarks.runner import Row, measure, print_table

    rows = [measure("r50 features 224px b32", "torch eager fp32", fn, images=32, baseline=True),
            measure("r50 features 224px b32", "onnxruntime cpu", fn2, images=32)]
    print_table(rows)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts run as ``python benchmarks/x.py`` import ``benchmarks.runner``
    sys.path.insert(0, str(REPO))


@dataclass
class Row:
    """One measured variant of one workload."""

    workload: str
    variant: str
    seconds: float  # median seconds per call
    images: int = 1  # images processed per call (for img/s)
    baseline: bool = False  # the row the other variants of this workload are compared with
    peak_memory_mb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def machine() -> str:
    """A short description of where this ran: the GPU name if one is used, else the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
        threads = torch.get_num_threads()
    except ImportError:
        threads = 1
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {threads} threads"


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's max RSS on the CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                   sync: Callable[[], object] | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``fn`` over ``repeats`` calls after ``warmup`` calls (``sync`` after each).

    ``clock`` is wall time by default; ``time.process_time`` times the process's CPU time instead, which a
    neighbour's load on a shared machine barely changes when each runtime uses one thread and does not spin.
    """
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        if sync:
            sync()
        times.append(clock() - start)
    return statistics.median(times)


def measure(workload: str, variant: str, fn: Callable[[], object], *, images: int = 1, repeats: int = 5,
            warmup: int = 1, baseline: bool = False, device: str = "cpu",
            clock: Callable[[], float] = time.perf_counter, **extra: object) -> Row:
    """Time ``fn`` (with ``clock``, see :func:`median_seconds`) and return its :class:`Row` (peak memory read
    after the timing)."""
    sync = None
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        sync = torch.cuda.synchronize
    seconds = median_seconds(fn, repeats, warmup, sync, clock)
    return Row(workload, variant, seconds, images, baseline, peak_memory_mb(device), dict(extra))


def ratios(rows: Iterable[Row]) -> dict[int, float | None]:
    """Throughput ratio of each row to its workload's baseline row (``None`` without one)."""
    rows = list(rows)
    base = {r.workload: r for r in rows if r.baseline}
    return {id(r): (r.images_per_second / base[r.workload].images_per_second if r.workload in base else None)
            for r in rows}


def format_table(rows: Iterable[Row], title: str | None = None) -> str:
    """The markdown table every benchmark prints."""
    rows = list(rows)
    ratio = ratios(rows)
    lines = [f"{title}" if title else "", f"machine: {machine()}", "",
             "| workload | variant | img/s | median ms | vs baseline | peak MB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = ratio[id(r)]
        rel_text = "baseline" if r.baseline else (f"{rel:.2f}x" if rel is not None else "-")
        peak = f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "-"
        lines.append(f"| {r.workload} | {r.variant} | {r.images_per_second:.1f} | {r.seconds * 1e3:.1f} | "
                     f"{rel_text} | {peak} |")
    return "\n".join(line for line in lines if line is not None).lstrip("\n")


def print_table(rows: Iterable[Row], title: str | None = None, json_path: str | os.PathLike[str] | None = None) -> None:
    """Print the table (and write the rows as JSON when ``json_path`` is given)."""
    rows = list(rows)
    print(format_table(rows, title), flush=True)
    if json_path:
        ratio = ratios(rows)
        data = [{**asdict(r), "images_per_second": r.images_per_second, "ratio": ratio[id(r)]} for r in rows]
        Path(json_path).write_text(json.dumps({"machine": machine(), "rows": data}, indent=2) + "\n")
