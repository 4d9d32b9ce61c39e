"""A service that cannot serve every model it was given does not start: one line, non-zero exit, no port."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from insloc_hub.serve import cli, service
from insloc_hub.serve.app import create_app
from insloc_hub.serve.backends import Backend, ModelInfo
from insloc_hub.serve.settings import Settings
from tests.serve.conftest import RunningServer


class _BrokenBackend(Backend):
    """Loads fine, fails its first image (as a graph ONNX Runtime cannot run would)."""

    def __init__(self, spec: str) -> None:
        self.info = ModelInfo(name="broken", revision="local", sha256="", task="features", backend="onnxruntime",
                              device="cpu", source=spec)

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions\nsecond line")


@pytest.fixture
def never_listen(monkeypatch):
    import uvicorn

    def listen(*args, **kwargs):
        raise AssertionError("uvicorn.run was reached: the port would be listening")

    monkeypatch.setattr(uvicorn, "run", listen)
    monkeypatch.delenv("INSLOC_SERVE_MODELS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_name_clash_stops_the_cli_before_listening(tiny_models, tiny_onnx, never_listen, capsys):
    # the folder and its export are both named "tiny-backbone" by their metadata, not by their paths
    argv = ["--model", str(tiny_models.backbone), "--model", str(tiny_onnx.features_fixed), "--threads", "1"]
    assert cli.main(argv) == 2
    line = _one_line_error(capsys)
    assert "two models are named 'tiny-backbone'" in line and "NAME=PATH" in line
    assert f"--model features={tiny_onnx.features_fixed}" in line  # a suggestion that would work


def test_warm_up_failure_stops_the_cli_before_listening(monkeypatch, never_listen, capsys):
    monkeypatch.setattr(service, "load_backend", lambda spec, **kwargs: _BrokenBackend(spec))
    assert cli.main(["--model", "emb.onnx"]) == 2
    line = _one_line_error(capsys)
    assert "broken@local (emb.onnx) failed its warm-up" in line and "Got invalid dimensions" in line


def test_a_failing_startup_ends_the_server_instead_of_answering_503(tiny_models):
    app = create_app(Settings(models=[str(tiny_models.backbone), f"{tiny_models.backbone}/"], threads=1))
    with pytest.raises(RuntimeError, match="failed to start: two models are named 'tiny-backbone'"):
        RunningServer(app).start(timeout=60)


def test_the_uvicorn_factory_exits_non_zero_with_one_line(tmp_path):
    env = {**os.environ, "INSLOC_SERVE_MODELS": "./nope", "HF_HUB_OFFLINE": "1", "INSLOC_SERVE_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "uvicorn", "--factory", "insloc_hub.serve.app:app_from_env",
                              "--port", "0"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = process.stdout + process.stderr
    assert process.returncode != 0, output
    errors = [line for line in output.splitlines() if "insloc-serve: error:" in line]
    assert len(errors) == 1 and "nope" in errors[0] and "Traceback" not in output, output
    assert "Uvicorn running" not in output
