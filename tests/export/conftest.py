"""Fixtures for export tests: tiny hub folders saved once per session, offline, caches in tmp folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from insloc_hub import build_detector, save_pretrained
from insloc_hub.models import InsLocBackbone

# a small internal resize and 20 detections (masks to paste) keep each export + parity run short
_RCNN = {"min_size": 128, "max_size": 192, "box_detections_per_img": 20}
DETECTOR_OPTIONS = {
    "faster_rcnn_fpn": _RCNN,
    "mask_rcnn_fpn": _RCNN,
    "faster_rcnn_c4": _RCNN,
    # RetinaNet's fresh classification prior (0.01) is below the default 0.05: lower it to get boxes
    "retinanet_fpn": {"min_size": 128, "max_size": 192, "detections_per_img": 20, "score_thresh": 0.005},
}


@pytest.fixture(scope="session", autouse=True)
def _offline_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No network, and insloc-hub's verified-weights record in a temporary folder."""
    cache = tmp_path_factory.mktemp("insloc-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSLOC_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(cache / "hf"))
        yield


@pytest.fixture(scope="session")
def tiny_fpn_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path_factory.mktemp("folders") / "tiny-fpn")


@pytest.fixture(scope="session")
def detector_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny detector folder per architecture (random weights, two classes)."""
    root = tmp_path_factory.mktemp("detectors")
    folders = {}
    for arch, options in DETECTOR_OPTIONS.items():
        torch.manual_seed(0)
        preset = "tiny-c4" if arch == "faster_rcnn_c4" else "tiny-fpn"
        model = build_detector(arch, class_names=["cat", "mug"], preset=preset, **options)
        folders[arch] = save_pretrained(model, root / arch)
    return folders


@pytest.fixture(scope="session")
def features_onnx(tiny_fpn_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FPN folder exported through the CLI with everything dynamic (parity checked)."""
    from insloc_hub.export.cli import main

    out = tmp_path_factory.mktemp("onnx") / "tiny-features.onnx"
    assert main(["onnx", str(tiny_fpn_folder), "--output", str(out), "--threads", "1"]) == 0
    return out


def world_readable(path: os.PathLike[str]) -> bool:
    return bool(os.stat(path).st_mode & 0o004)
