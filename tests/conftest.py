"""Shared pytest fixtures.

Every test runs with its caches in a temporary folder (``isolated_caches``, autouse): INSLOC_HUB_CACHE,
HF_HOME, HF_HUB_CACHE, HF_XET_CACHE, XDG_CACHE_HOME, TORCH_HOME, MPLCONFIGDIR and
HUGGINGFACE_HUB_CACHE point under ``tmp_path``, so no test reads or writes the user's ~/.cache.

Hub fixtures (real HTTP on 127.0.0.1, never huggingface.co):

- ``hub_server``: a started :class:`hub_server.HubServer` (fresh, empty) with ``.endpoint``,
  ``.stop()``, ``.requests``; token ``"test-token"`` may write. Stopped after the test.
- ``hub_env``: ``hub_server`` plus huggingface_hub pointed at it for the duration of one test:
  HF_ENDPOINT, HF_HOME, HF_HUB_CACHE (a tmp folder), HF_TOKEN="test-token", telemetry off, offline
  mode off: the environment variables, and the public ``huggingface_hub.constants`` that
  huggingface_hub read from them when it was imported. All of it is undone after the test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # make ``import hub_server`` work whatever the rootdir/import mode
    sys.path.insert(0, _TESTS_DIR)

from hub_server import HubServer  # noqa: E402

TEST_TOKEN = "test-token"


#: cache locations a test could otherwise write to in the user's home (env var -> folder under the tmp cache)
_CACHE_VARIABLES = {
    "INSLOC_HUB_CACHE": "insloc_hub",
    "HF_HOME": "huggingface",
    "HF_HUB_CACHE": "huggingface/hub",
    "HUGGINGFACE_HUB_CACHE": "huggingface/hub",
    "HF_XET_CACHE": "huggingface/xet",
    "XDG_CACHE_HOME": "",
    "TORCH_HOME": "torch",
    "MPLCONFIGDIR": "matplotlib",
}


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every cache at a fresh temporary folder for one test (undone afterwards)."""
    root = tmp_path_factory.mktemp("cache")
    for name, sub in _CACHE_VARIABLES.items():
        monkeypatch.setenv(name, str(root / sub) if sub else str(root))
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test module: tiny convolutions run fastest so on a shared 2-core machine,
    and the same in subprocesses (bit-exact). Use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class HubEnv:
    """What ``hub_env`` set up: the server, and where huggingface_hub now points."""

    server: HubServer
    endpoint: str
    home: Path
    cache_dir: Path
    token: str


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A real Hub server on 127.0.0.1:<random port>, started for one test and stopped after it."""
    server = HubServer(tokens={TEST_TOKEN: "write", "read-token": "read"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> HubEnv:
    """Point huggingface_hub (env vars and import-time constants) at ``hub_server`` for one test."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    endpoint = hub_server.endpoint

    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_ETAG_TIMEOUT",
        "INSLOC_HUB_NAMESPACE",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN": TEST_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",  # uploads go through create_commit, the one path the test server serves
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("NO_PROXY", "no_proxy"):  # never send 127.0.0.1 / localhost through a proxy
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"])))

    # huggingface_hub reads these once, at import: patch the module attributes too.
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,  # also stops the per-request agent-registry fetch from ENDPOINT
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    return HubEnv(server=hub_server, endpoint=endpoint, home=home, cache_dir=cache, token=TEST_TOKEN)
