"""Anchor-based box jitter: the official anchor set, IoU > 0.5, NMS 0.7 with random scores, one pick."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, nms

from insloc_hub.training.pretraining.boxaug import BoxJitter, grid_anchors
from insloc_hub.training.pretraining.compose import CompositionConfig, sample_composition_params


def _gt_boxes(n: int, cfg: CompositionConfig, seed: int = 0) -> torch.Tensor:
    """Boxes as the composition produces them (post-flip query boxes)."""
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (512, 512), (375, 500), (640, 427)]
    return torch.tensor(
        [sample_composition_params(sizes[i % 4], cfg, rng).query.box(cfg.canvas) for i in range(n)],
        dtype=torch.float32,
    )


def test_anchor_grid_matches_mmdet_v2() -> None:
    jitter = BoxJitter()
    assert jitter.grid_size == 16 and jitter.num_anchors == 16 * 16 * 20 == 5120
    a = jitter.anchors
    # location 0: 20 base anchors centred on (0, 0); ratio-major, scale-minor
    first = a[:20]
    centres = (first[:, :2] + first[:, 2:]) / 2
    assert torch.allclose(centres, torch.zeros(20, 2), atol=1e-5)
    w = first[:, 2] - first[:, 0]
    h = first[:, 3] - first[:, 1]
    for ri, r in enumerate((0.5, 0.75, 1.0, 1.5, 2.0)):
        for si, s in enumerate((2, 4, 8, 16)):
            i = ri * 4 + si
            assert math.isclose(float(h[i]), 16 * s * math.sqrt(r), rel_tol=1e-5)
            assert math.isclose(float(w[i]), 16 * s / math.sqrt(r), rel_tol=1e-5)
    # second location is one stride to the right (row-major grid), last is at (240, 240)
    assert torch.allclose(a[20:40] - a[:20], torch.tensor([16.0, 0.0, 16.0, 0.0]).expand(20, 4))
    last_centre = (a[-20:, :2] + a[-20:, 2:]) / 2
    assert torch.allclose(last_centre, torch.full((20, 2), 240.0))
    assert float(a.min()) < 0 and float(a.max()) > 256  # not clipped
    assert BoxJitter(canvas=250).grid_size == 16 and BoxJitter(canvas=257).grid_size == 17


def test_every_jittered_box_overlaps_its_gt_by_more_than_half() -> None:
    gt = _gt_boxes(128, CompositionConfig())
    out = BoxJitter()(gt, generator=torch.Generator().manual_seed(0))
    assert out.shape == gt.shape and out.dtype == gt.dtype
    iou = box_iou(gt, out).diagonal()
    assert bool((iou > 0.5).all())
    # every output is one of the anchors
    assert bool((box_iou(out, BoxJitter().anchors).max(dim=1).values > 1 - 1e-5).all())
    # the jitter is strong: chosen IoU is just above 0.5 on average (method notes: mean ~0.55)
    assert 0.5 < float(iou.mean()) < 0.65
    # not always the best anchor
    best = box_iou(gt, BoxJitter().anchors).max(dim=1).values
    assert float((iou < best - 1e-4).float().mean()) > 0.5


def test_deterministic_given_a_generator() -> None:
    gt = _gt_boxes(32, CompositionConfig(), seed=1)
    jitter = BoxJitter()
    a = jitter(gt, generator=torch.Generator().manual_seed(3))
    b = jitter(gt, generator=torch.Generator().manual_seed(3))
    c = jitter(gt, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nms_survivors_per_image() -> None:
    gt = _gt_boxes(16, CompositionConfig(), seed=2)
    jitter = BoxJitter()
    kept, image_index = jitter.survivors(gt, generator=torch.Generator().manual_seed(5))
    # replay: same candidates and scores, plain per-image NMS
    cand_img, cand_anchor = jitter.candidates(gt)
    scores = torch.rand(cand_img.numel(), generator=torch.Generator().manual_seed(5))
    for i in range(16):
        mine = kept[image_index == i]
        assert mine.shape[0] >= 1
        iou = box_iou(mine, mine)
        iou.fill_diagonal_(0)
        assert float(iou.max()) <= 0.7 + 1e-6
        assert bool((box_iou(gt[i : i + 1], mine) > 0.5).all())
        sel = cand_img == i
        boxes_i = jitter.anchors[cand_anchor[sel]]
        ref = boxes_i[nms(boxes_i, scores[sel], 0.7)]
        assert torch.equal(mine, ref)  # no suppression across images
    # roughly the method notes' numbers: ~72 candidates, ~15 survivors per image
    assert 30 < cand_img.numel() / 16 < 150 and 5 < kept.shape[0] / 16 < 30


def test_fallback_when_no_anchor_overlaps_enough() -> None:
    tiny = torch.tensor([[100.0, 100.0, 104.0, 104.0], [10.0, 10.0, 120.0, 130.0]])
    jitter = BoxJitter()
    img_idx, _ = jitter.candidates(tiny)
    assert int((img_idx == 0).sum()) == 4000  # top nms_pre by IoU
    out = jitter(tiny, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4) and float(box_iou(tiny[1:], out[1:])) > 0.5


def test_tiny_canvas() -> None:
    cfg = CompositionConfig.for_canvas(64)
    gt = _gt_boxes(64, cfg, seed=4)
    scaled = BoxJitter.for_canvas(64)  # the 256 px anchor set divided by 4
    assert scaled.stride == 4 and scaled.grid_size == 16 and scaled.num_anchors == 5120
    assert torch.allclose(scaled.anchors * 4, BoxJitter().anchors)
    out = scaled(gt, generator=torch.Generator().manual_seed(1))
    assert bool((box_iou(gt, out).diagonal() > 0.5).all())
    # same stride, smaller scales: a coarse 4 x 4 grid; works, falls back for some boxes
    coarse = BoxJitter(scales=(0.5, 1, 2, 4), canvas=64)
    assert coarse.grid_size == 4 and coarse.num_anchors == 4 * 4 * 20
    out = coarse(gt, generator=torch.Generator().manual_seed(1))
    assert float((box_iou(gt, out).diagonal() > 0.5).float().mean()) > 0.7


def test_empty_and_bad_input() -> None:
    assert BoxJitter()(torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError):
        BoxJitter()(torch.zeros(3))
    assert grid_anchors(16, (8,), (1.0,), 2).tolist() == [
        [-64.0, -64.0, 64.0, 64.0],
        [-48.0, -64.0, 80.0, 64.0],
        [-64.0, -48.0, 64.0, 80.0],
        [-48.0, -48.0, 80.0, 80.0],
    ]
