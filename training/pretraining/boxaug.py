"""Anchor-based box jitter of the query view (insloc-method.md, section 2).

InsLoc does not pool the query's P5 feature with the ground-truth box but with a *jittered* box:
one box drawn from a fixed anchor set around the ground truth. This is the official
``AnchorAugHead.get_fixed_bboxes`` (``mmdet/models/dense_heads/anchor_aug.py`` L40-92) followed by
``InsLocFPN.get_stage2_bboxes`` (``mmdet/models/detectors/insloc_fpn.py`` L237-246), at
limbo0000/InstanceLoc @ a419bb6, with the config of ``configs/FPN/insloc_fpn_200ep.py`` L59-66 and
L93-106. It has no parameters and needs no features: only the canvas size.

Steps, per image:

1. anchors: ``AnchorGenerator(strides=[16], scales=[2, 4, 8, 16], ratios=[0.5, 0.75, 1, 1.5, 2])``,
   base size = stride, centres at ``(j * 16, i * 16)`` (mmdet v2 ``center_offset=0``),
   ``h = 16 * s * sqrt(r)``, ``w = 16 * s / sqrt(r)`` (ratio = h/w), **not clipped**, on the P4 grid
   (``generate_from_single_level=2``): ``ceil(canvas / 16)`` squared positions, 20 anchors each;
2. IoU of the ground-truth box with every anchor (``BboxOverlaps2D``, no +1 == ``torchvision.ops.box_iou``);
3. candidates: anchors with IoU > 0.5, or, if there are none, the top ``nms_pre=4000`` by IoU;
4. uniform random scores, NMS at IoU 0.7 (``batched_nms`` over the batch);
5. one survivor picked uniformly at random.

The official batched NMS separates images by adding ``idx * (max_coord + 1)`` to the boxes, which
assumes non-negative coordinates; unclipped anchors can be negative, so boxes of neighbouring images
could (rarely) suppress each other. Here all candidates are first translated so that the smallest
coordinate is 0 (IoU is translation invariant), which removes that cross-image quirk.

Tiny canvases: on a 64 px canvas the default anchors (32 to 256 px on a 4 x 4 grid) are mostly
larger than the pasted boxes (32-62 px) and too sparse; without candidates at IoU > 0.5 the top-4000
fallback picks almost arbitrary anchors. Either scale the whole anchor set with the canvas,
``BoxJitter.for_canvas(64)`` (stride 4, same scales: every anchor divided by 4, so the jitter has the
same statistics as at 256), or keep the stride and pass smaller ``scales`` (e.g. ``(0.5, 1, 2, 4)``:
the same anchor sizes on a coarser grid, where some boxes fall back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms, box_iou

__all__ = ["BoxJitter", "grid_anchors"]


def grid_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float], grid_size: int) -> torch.Tensor:
    """Anchors ``[grid_size**2 * len(ratios) * len(scales), 4]`` (x1, y1, x2, y2), float32, CPU.

    Order as mmdet v2 ``AnchorGenerator``: location-major (rows of the grid, then columns), then
    ratio-major base anchors (``scale_major=True``: index = ratio_index * len(scales) + scale_index).
    """
    base = float(stride)
    scales_t = torch.tensor(list(scales), dtype=torch.float32)
    ratios_t = torch.tensor(list(ratios), dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1.0 / h_ratios
    ws = (base * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (base * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    # center_offset = 0: the base anchor is centred on (0, 0), the top-left corner of its cell.
    base_anchors = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
    shifts_1d = torch.arange(grid_size, dtype=torch.float32) * stride
    shift_y, shift_x = torch.meshgrid(shifts_1d, shifts_1d, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + base_anchors[None]).reshape(-1, 4)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` uniform numbers from ``generator`` (drawn on the generator's device) or the global RNG."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


class BoxJitter:
    """Pick, per image, one anchor with IoU > ``iou_threshold`` with the ground-truth box.

    Example::

        jitter = BoxJitter()                      # the official configuration, 256 px canvas
        g = torch.Generator().manual_seed(0)
        q_boxes_p5 = jitter(q_boxes, generator=g)  # [B, 4] -> [B, 4]

    Works on any device (anchors are cached per device); deterministic given a ``torch.Generator``
    (CPU or on the boxes' device). On a GPU it waits for the device (the candidates and the NMS have
    data-dependent sizes), so the trainer runs it on the host (``engine.jitter_on_host``).
    """

    def __init__(self, stride: int = 16, scales: Sequence[float] = (2, 4, 8, 16),
                 ratios: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0), iou_threshold: float = 0.5,
                 nms_threshold: float = 0.7, canvas: int = 256, nms_pre: int = 4000) -> None:
        if stride <= 0 or canvas <= 0 or not scales or not ratios:
            raise ValueError("BoxJitter needs a positive stride and canvas and non-empty scales and ratios")
        self.stride = int(stride)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        self.iou_threshold = float(iou_threshold)  # train_cfg.rpn_proposal.iou_thr
        self.nms_threshold = float(nms_threshold)  # train_cfg.rpn_proposal.nms_thr
        self.nms_pre = int(nms_pre)  # train_cfg.rpn_proposal.nms_pre: fallback size
        self.canvas = int(canvas)
        # Feature map of P4 (stride 16) on the canvas; 16 x 16 on 256 px.
        self.grid_size = math.ceil(canvas / stride)
        self.anchors = grid_anchors(self.stride, self.scales, self.ratios, self.grid_size)
        self._anchor_cache: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_canvas(cls, canvas: int, **overrides: float) -> BoxJitter:
        """The official anchor set scaled with the canvas: stride ``16 * canvas / 256``, same scales.

        ``for_canvas(256)`` is the default; ``for_canvas(64)`` has stride 4, a 16 x 16 grid and anchor
        sizes 8-64 px, i.e. exactly the 256 px geometry divided by 4.
        """
        stride = 16 * canvas / 256
        if stride != int(stride) or stride < 1:
            raise ValueError(f"for_canvas needs a canvas that is a multiple of 16, got {canvas}")
        return cls(stride=int(stride), canvas=canvas, **overrides)  # type: ignore[arg-type]

    @property
    def num_anchors(self) -> int:
        """Total anchors: grid_size**2 * len(scales) * len(ratios) (5120 with the defaults)."""
        return int(self.anchors.shape[0])

    def anchors_on(self, device: torch.device | str) -> torch.Tensor:
        """The anchor set on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._anchor_cache:
            self._anchor_cache[device] = self.anchors.to(device)
        return self._anchor_cache[device]

    def candidates(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_index, anchor_index)`` of the candidates of every image (anchor_aug.py L62-70).

        Candidates are the anchors with IoU > ``iou_threshold``; an image without any gets its
        ``nms_pre`` anchors of highest IoU instead.
        """
        anchors = self.anchors_on(boxes.device)
        iou = box_iou(boxes.float(), anchors)  # [B, A]
        mask = iou > self.iou_threshold
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            rows = torch.nonzero(empty).squeeze(1)
            k = min(self.nms_pre, anchors.shape[0])
            top = iou[rows].topk(k, dim=1).indices
            mask[rows.unsqueeze(1), top] = True
        return torch.nonzero(mask, as_tuple=True)

    def survivors(self, boxes: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """NMS survivors of every image: ``(boxes [N, 4], image_index [N])``, grouped by image.

        Scores are uniform random (``torch.rand``), NMS at ``nms_threshold`` per image.
        """
        _check_boxes(boxes)
        image_index, anchor_index = self.candidates(boxes)
        cand = self.anchors_on(boxes.device)[anchor_index]
        scores = _rand(cand.shape[0], generator, boxes.device)
        # Translate so every coordinate is >= 0 before batched_nms (see the module docstring).
        keep = batched_nms(cand - cand.min(), scores, image_index, self.nms_threshold)
        # Group the survivors by image (stable: within an image they stay in score order).
        order = torch.sort(image_index[keep], stable=True).indices
        keep = keep[order]
        return cand[keep], image_index[keep]

    def __call__(self, boxes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One jittered box per input box: ``[B, 4]`` -> ``[B, 4]`` (same dtype and device)."""
        _check_boxes(boxes)
        num = boxes.shape[0]
        if num == 0:
            return boxes.clone()
        kept, image_index = self.survivors(boxes, generator)
        # get_stage2_bboxes: idx = np.random.randint(0, n_survivors) per image.
        counts = torch.bincount(image_index, minlength=num)
        starts = torch.cumsum(counts, 0) - counts
        pick = (_rand(num, generator, boxes.device) * counts).long()
        pick = torch.minimum(pick, counts - 1)  # guards u * n == n in float
        return kept[starts + pick].to(boxes.dtype)

    def __repr__(self) -> str:
        return (f"BoxJitter(stride={self.stride}, scales={self.scales}, ratios={self.ratios}, "
                f"iou_threshold={self.iou_threshold}, nms_threshold={self.nms_threshold}, canvas={self.canvas}, "
                f"grid={self.grid_size}x{self.grid_size}, anchors={self.num_anchors})")


def _check_boxes(boxes: torch.Tensor) -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be a [B, 4] tensor, got {getattr(boxes, 'shape', type(boxes))}")
