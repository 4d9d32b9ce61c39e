"""The box-head statistics count dead units and measure spread as documented."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from insloc_hub import build_detector

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import head_units  # noqa: E402


def test_units_switched_off_are_counted_dead() -> None:
    torch.manual_seed(0)
    detector = build_detector("faster_rcnn_fpn", 2, preset="tiny-fpn", min_size=64, max_size=64)
    images = [torch.rand(3, 64, 80) for _ in range(2)]
    healthy = head_units.head_statistics(detector, images, boxes_per_image=16)
    fc1 = detector.roi_heads.box_head.fc1
    with torch.no_grad():
        fc1.bias[: fc1.out_features // 2] = -1e6  # these units can never activate
    broken = head_units.head_statistics(detector, images, boxes_per_image=16)
    assert healthy["dead_fc_units"] < 0.5  # random init: a few units are off on every box
    assert broken["dead_fc_units"] >= 0.5 + healthy["dead_fc_units"] / 4  # half, plus those of the rest already dead
    assert broken["effective_rank"] <= healthy["effective_rank"]
    assert -1.0 <= broken["mean_cosine"] <= 1.0 and broken["dead_conv_channels"] == healthy["dead_conv_channels"]
