"""Fixtures for the service tests: tiny hub folders and a real uvicorn server on 127.0.0.1.

- ``tiny_models``: a tiny-fpn backbone folder and a tiny faster_rcnn_fpn detector folder (session).
- ``tiny_onnx``: those folders exported by ``insloc-export`` (no parity run): the detector with dynamic
  sides, and fixed-shape graphs as users export them for TensorRT/Triton (session).
- ``start_server(settings)``: starts ``create_app(settings)`` under uvicorn on an ephemeral port, waits
  until /readyz answers 200 and returns a :class:`RunningServer` (``.url``); stopped after the test
  module, or earlier with ``.stop()``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from insloc_hub import InsLocBackbone, build_detector, save_pretrained
from insloc_hub.serve.app import create_app
from insloc_hub.serve.settings import Settings

CLASS_NAMES = ["cat", "dog", "raccoon"]
#: fast, deterministic tiny detector: small resize, every box kept (random weights score ~1/num_classes)
DETECTOR_OPTIONS = {"min_size": 96, "max_size": 128, "box_score_thresh": 0.0, "box_detections_per_img": 20,
                    "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}


@dataclass
class TinyModels:
    backbone: Path
    detector: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("serve-models")
    torch.manual_seed(0)
    backbone = save_pretrained(InsLocBackbone("tiny-fpn"), root / "tiny-backbone", name="tiny-backbone")
    detector = build_detector("faster_rcnn_fpn", class_names=CLASS_NAMES, preset="tiny-fpn", **DETECTOR_OPTIONS)
    detector_dir = save_pretrained(detector, root / "tiny-detector", name="tiny-detector")
    return TinyModels(backbone=backbone, detector=detector_dir)


@dataclass
class TinyOnnx:
    detector: Path  # dynamic height and width (the default export)
    embedding_fixed: Path  # --task embedding --batch 4 --height 64 --width 64 --opset 17
    features_fixed: Path  # --task features --batch 2 --height 64 --width 96
    detector_fixed: Path  # --height 96 --width 128


@pytest.fixture(scope="session")
def tiny_onnx(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> TinyOnnx:
    from insloc_hub.export import export_onnx

    root = tmp_path_factory.mktemp("serve-onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # parity is insloc-export's own test; here the files only need to be what it writes
        return TinyOnnx(
            detector=export_onnx(tiny_models.detector, root / "det.onnx", verify=False).path,
            embedding_fixed=export_onnx(tiny_models.backbone, root / "emb.onnx", task="embedding", batch=4,
                                        height=64, width=64, opset=17, verify=False).path,
            features_fixed=export_onnx(tiny_models.backbone, root / "features.onnx", task="features", batch=2,
                                       height=64, width=96, verify=False).path,
            detector_fixed=export_onnx(tiny_models.detector, root / "det-fixed.onnx", height=96, width=128,
                                       verify=False).path,
        )
    finally:
        torch.set_num_threads(threads)


def image_bytes(width: int = 80, height: int = 60, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small random RGB image, encoded."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


class RunningServer:
    """A uvicorn server running ``app`` in a thread on 127.0.0.1:<ephemeral port>."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10,
                                limit_concurrency=None, backlog=256)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's exit on a failed startup; start() reports it
            self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 60.0, wait_ready: bool = True) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():  # uvicorn exits when the lifespan startup (loading) fails
                self.sock.close()
                raise RuntimeError(f"the service failed to start: {self.app.state.service.load_error}")
            try:
                response = httpx.get(self.url + ("/readyz" if wait_ready else "/healthz"), timeout=2)
                if response.status_code == 200:
                    return self
                if response.json().get("status") == "failed":
                    raise RuntimeError(f"the service failed to load: {response.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the service did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def start_server() -> Iterator[Callable[..., RunningServer]]:
    servers: list[RunningServer] = []

    def start(settings: Settings, wait_ready: bool = True, **kwargs) -> RunningServer:
        if not settings.threads:  # 2 shared cores: torch's default 2 threads oversubscribe them badly
            settings.threads = 1
        server = RunningServer(create_app(settings, **kwargs)).start(wait_ready=wait_ready)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
