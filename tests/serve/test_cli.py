"""insloc-serve as a user starts it: flags, environment variables, one-line errors, a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from insloc_hub.errors import ConfigError
from insloc_hub.serve.cli import main
from insloc_hub.serve.settings import Settings
from tests.serve.conftest import image_bytes


def test_settings_from_environment_and_overrides():
    env = {"INSLOC_SERVE_MODELS": "a, b=c.onnx", "INSLOC_SERVE_MAX_BATCH_SIZE": "4", "INSLOC_SERVE_WARMUP": "0",
           "INSLOC_SERVE_MAX_WAIT_MS": "2.5"}
    settings = Settings.from_env(env, max_batch_size=8, port=None)
    assert settings.models == ["a", "b=c.onnx"] and settings.max_batch_size == 8 and settings.port == 8000
    assert settings.warmup is False and settings.max_wait_ms == 2.5
    with pytest.raises(ConfigError, match="INSLOC_SERVE_MAX_QUEUE"):
        Settings.from_env({"INSLOC_SERVE_MAX_QUEUE": "lots"})
    with pytest.raises(ConfigError, match="max_batch_size"):
        Settings(max_batch_size=0)


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no model to serve"),
    (["--model", "missing-folder/"], "missing-folder"),
    (["--model", "nothing.onnx"], "does not exist"),
    (["--model", "x", "--backend", "onnxruntime"], "serves exported .onnx files"),
])
def test_user_errors_are_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("INSLOC_SERVE_MODELS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("insloc-serve: error:") and message in err and "Traceback" not in err


def test_missing_api_key_file_is_a_clear_error(tiny_models, capsys):
    assert main(["--model", str(tiny_models.detector), "--api-key-file", "/nonexistent/key"]) == 2
    assert "cannot read the API key file" in capsys.readouterr().err


def test_the_console_script_serves_until_sigterm(tiny_models, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INSLOC_SERVE_THREADS": "1", "INSLOC_SERVE_MODELS": f"det={tiny_models.detector}",
           "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "insloc_hub.serve.cli", "--port", str(port),
                                "--max-batch-size", "4"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        response = httpx.post(url + "/v1/detect", content=image_bytes())
        assert response.status_code == 200 and response.json()["model"] == "det@local"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    # uvicorn re-raises the signal it handled once shut down, so the exit status is SIGTERM's
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "ready: det@local" in output and "Application shutdown complete" in output
