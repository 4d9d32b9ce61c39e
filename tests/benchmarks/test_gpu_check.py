"""The prepared GPU check runs end to end in its smoke mode (the same code on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_smoke_mode_writes_the_table_json_and_profile(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(str(out), "--smoke", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    workloads = {row["workload"].split(",")[0] for row in data["rows"]}
    assert {"FPN step", "FPN whole pipeline (JPEG bytes -> step)", "C4 whole pipeline (JPEG bytes -> step)",
            "Faster R-CNN R50-FPN inference", "ResNet-50 features"} <= workloads
    assert all(row["images_per_second"] > 0 for row in data["rows"])
    baselines = [row for row in data["rows"] if row["baseline"]]
    assert all(row["variant"].startswith("fp32 eager") for row in baselines) and len(baselines) == 4
    assert all(g["status"].startswith("n/a") for g in data["goals"])  # no GPU figure from a smoke run
    assert data["sections"]["sync"]["profiler_sync_calls_total"] == 0
    assert (out / "trace_pipeline_steps.json.gz").stat().st_size > 0 and (out / "profile_pipeline_steps.txt").is_file()
    table = (out / "gpu_check.md").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last
    assert "| goal (issue #13) |" in table


def test_asking_for_gpu_work_without_cuda_fails_clearly(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        return  # only meaningful where there is no GPU (CI, the development machine)
    done = _run(str(tmp_path / "out"), tmp_path=tmp_path)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--smoke" in done.stderr and "Traceback" not in done.stderr
    usage = _run("--smoke", tmp_path=tmp_path)
    assert usage.returncode == 2 and "usage:" in usage.stderr
