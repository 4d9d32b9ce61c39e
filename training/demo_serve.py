"""The demo's last stage: export the fine-tuned detector, serve it, and ask it about one photo over HTTP.

Runs ``insloc-export onnx`` (with its parity check) and ``insloc-serve`` as subprocesses, the way a
user would (training never imports the export or serve packages), and talks to the service with the
standard library's HTTP client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from insloc_hub.errors import InsLocError

#: detections drawn and printed by the demo: confident ones only (a barely trained detector has many weak boxes)
CONFIDENT_SCORE = 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(argv: list[str], what: str) -> None:
    completed = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if completed.returncode != 0:
        raise InsLocError(f"the demo's {what} stage failed (exit {completed.returncode}):\n{completed.stdout[-2000:]}")


def _post(url: str, data: bytes, timeout: float = 120) -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InsLocError(f"insloc-serve exited (code {process.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise InsLocError("insloc-serve did not become ready in time")


def export_and_serve(detector: Path, photo: Path, out: Path, threads: int = 1) -> dict[str, Any]:
    """Export ``detector`` to ``out/detector.onnx``, serve it, detect on ``photo``; returns the JSON answer.

    Writes ``out/served_detections.json`` and ``out/served_annotated.png`` (confident boxes only).
    """
    out.mkdir(parents=True, exist_ok=True)
    onnx_file = out / "detector.onnx"
    _run([sys.executable, "-m", "insloc_hub.export.cli", "onnx", str(detector), "--output", str(onnx_file),
          "--threads", str(threads)], "export")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INSLOC_SERVE_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "insloc_hub.serve.cli", "--model", f"demo={onnx_file}",
                                "--port", str(port), "--log-level", "warning"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(url, process)
        image = photo.read_bytes()
        query = f"score_threshold={CONFIDENT_SCORE}"
        answer = json.loads(_post(f"{url}/v1/detect?{query}", image))
        (out / "served_annotated.png").write_bytes(_post(f"{url}/v1/detect?{query}&annotated=1", image))
    except urllib.error.HTTPError as exc:
        raise InsLocError(f"insloc-serve answered HTTP {exc.code}: {exc.read()[:500]!r}") from exc
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    (out / "served_detections.json").write_text(json.dumps(answer, indent=2) + "\n")
    return answer
