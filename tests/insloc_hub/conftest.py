"""Fixtures of the insloc_hub tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import save_pretrained


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-fpn backbone hub folder (seed 0), saved once per test module; copy it before changing it."""
    torch.manual_seed(0)
    return save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path_factory.mktemp("hub") / "tiny")
