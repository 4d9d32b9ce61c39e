"""MoCo v2 image-level baseline on the same trunk, data, queue and schedule as InsLoc.

``insloc-train pretrain --method moco`` trains this for a fair image-level comparison (InsLoc's
tables compare against MoCo v2, insloc-method.md section 7). What is shared with InsLoc:

* the ResNet trunk (``InsLocBackbone`` with ``parts=("trunk",)``; for a C4 arch trunk + res5), so the
  export is a trunk-only bundle that every detector loads;
* the momentum encoder, queue, shuffle-BN and InfoNCE machinery (this class subclasses
  :class:`~insloc_hub.training.pretraining.insloc.InsLoc` with a single "image" level and no boxes);
* K, m, T, optimizer, lr schedule and epochs (the same flags);
* the unlabelled images, and the per-view colour pipeline of the composition code
  (``ColorJitter(0.4, 0.4, 0.4, 0.1)`` p=0.8, grayscale p=0.2, PIL Gaussian blur sigma 0.1-2 p=0.5,
  horizontal flip p=0.5, ImageNet normalisation).

MoCo v2 specifics (facebookresearch/moco ``main_moco.py`` ``aug_plus``): each view is a
``RandomResizedCrop(canvas, scale=(0.2, 1.0))`` (aspect 3/4-4/3) of the **whole image**, resized to
the canvas; no copy-paste and no background. The projection is the MoCo v2 MLP
(C5 -> C5 -> 128, PyTorch's default ``nn.Linear`` init) on globally average-pooled C5.

This baseline is a reconstruction for comparison purposes; it is not part of the InsLoc code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from insloc_hub.models import BackboneConfig, InsLocBackbone
from insloc_hub.training.pretraining.compose import (
    CompositionConfig,
    CompositionParams,
    compose_pair_with_params,
    mmcv_rescale_size,
    random_resized_crop_params,
    sample_composition_params,
)
from insloc_hub.training.pretraining.insloc import Encoder, InsLoc, Projection
from insloc_hub.training.pretraining.pretrain_data import PretrainSampleDataset, UnlabelledImages, sample_rng

__all__ = ["MoCo", "ImageEncoder", "MOCO_CROP_SCALE", "MOCO_CROP_RATIO", "moco_view_params", "moco_backbone_config",
           "MocoPretrainDataset", "MocoDecodeDataset"]

MOCO_CROP_SCALE = (0.2, 1.0)
"""``RandomResizedCrop(224, scale=(0.2, 1.))`` in MoCo v2's ``aug_plus``."""
MOCO_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""torchvision's default RandomResizedCrop aspect range."""


class ImageEncoder(Encoder):
    """MoCo's encoder: global average pool of the trunk's last stage (no boxes), then the MLP projection."""

    def __init__(self, backbone: InsLocBackbone, projection: Projection) -> None:
        nn.Module.__init__(self)
        self.backbone, self.projection = backbone, projection
        self.pooling, self.levels, self.strides, self.roi_size = "image", ("image",), (), 0

    def features(self, images: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        return self.backbone.forward_embedding(images)


class MoCo(InsLoc):
    """MoCo v2 with the InsLoc machinery: one "image" level, one queue, no boxes.

    ``forward(q_img, None, k_img, None)`` returns ``{"loss", "loss_image", "acc_image"}``.
    """

    def __init__(self, arch: str | BackboneConfig = "r50-fpn", dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.2, **kwargs: Any) -> None:
        kwargs["box_jitter"] = None
        kwargs.pop("jitter_levels", None)
        super().__init__(arch, dim, K, m, T, **kwargs)

    def _build_encoder(self, cfg: BackboneConfig, dim: int, c4_roi_size: int) -> Encoder:
        backbone = InsLocBackbone(moco_backbone_config(cfg))
        width = backbone.embedding_dim  # C5 channels (2048 for R50)
        # the MoCo v2 MLP
        projection = Projection(width, width, dim, official_init=False, norm=self.projection_norm != "off")
        return ImageEncoder(backbone, projection)


def moco_backbone_config(arch: BackboneConfig) -> BackboneConfig:
    """What MoCo trains and exports of ``arch``: the trunk (FPN archs) or trunk + res5 (C4 archs)."""
    return dataclasses.replace(arch, parts=("trunk",) if arch.variant == "fpn" else ("trunk", "box_head"))


def moco_view_params(foreground_size: tuple[int, int], cfg: CompositionConfig,
                     rng: np.random.Generator) -> CompositionParams:
    """Two MoCo v2 views expressed as composition parameters.

    Each view crops ``RandomResizedCrop`` geometry from the whole image and "pastes" it over the
    entire canvas (so the background never shows); the colour, blur and flip draws are those of
    :func:`~insloc_hub.training.pretraining.compose.sample_composition_params`, so both pipelines share one
    implementation of the per-view augmentation.
    """
    width, height = int(foreground_size[0]), int(foreground_size[1])
    crops = [random_resized_crop_params(width, height, MOCO_CROP_SCALE, MOCO_CROP_RATIO, rng, cfg.crop_attempts)
             for _ in range(2)]
    colour = sample_composition_params((width, height), cfg, rng)
    size = cfg.canvas
    views = [
        dataclasses.replace(v, crop_top=c[0], crop_left=c[1], crop_height=c[2], crop_width=c[3], bound_w=size,
                            bound_h=size, paste_width=size, paste_height=size, paste_top=0, paste_left=0)
        for v, c in zip((colour.query, colour.key), crops)
    ]
    return CompositionParams(views[0], views[1], (width, height))


class MocoPretrainDataset(PretrainSampleDataset):
    """Two augmented views of image ``idx`` (PIL reference pipeline): ``dict(q_img, q_box, k_img, k_box, index)``.

    The boxes cover the whole canvas (after flip) and are unused by the model; they keep the batch
    layout of :class:`~insloc_hub.training.pretraining.pretrain_data.InsLocPretrainDataset`.
    """

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        _, image = self._load(index, rng, self.images.load)
        params = moco_view_params(image.size, self.cfg, rng)
        blank = Image.new("RGB", (self.cfg.canvas, self.cfg.canvas))
        q_img, q_box, k_img, k_box = compose_pair_with_params(image, blank, blank, params, self.cfg)
        return {"q_img": q_img, "q_box": q_box, "k_img": k_img, "k_box": k_box, "index": index}


class MocoDecodeDataset(PretrainSampleDataset):
    """Decode-only twin of :class:`MocoPretrainDataset` for composing on the device: batch with
    ``collate_decoded``, compose with ``compose_batch(fg, bg_q, bg_k, cfg, params=params, device=...)``.

    Returns ``dict(fg, bg_q, bg_k, params, index)``: the image (uint8 ``[3, h, w]``) downscaled so that its
    long side is at most ``max_side`` (bounds the memory of a batch), the views' parameters drawn for that
    size, and black backgrounds (fully covered by the views).
    """

    def __init__(self, images: UnlabelledImages, cfg: CompositionConfig | None = None, seed: int = 0, *,
                 max_side: int = 512) -> None:
        super().__init__(images, cfg, seed)
        self.max_side = int(max_side)

    def _load_downscaled(self, index: int) -> Image.Image:
        image = self.images.load(index)
        if max(image.size) > self.max_side:  # long side to max_side, rounded as mmcv rounds
            size = mmcv_rescale_size(*image.size, self.max_side, self.max_side)
            image = image.resize(size, Image.Resampling.BILINEAR)
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        _, image = self._load(index, rng, self._load_downscaled)
        params = moco_view_params(image.size, self.cfg, rng)
        blank = torch.zeros(3, self.cfg.canvas, self.cfg.canvas, dtype=torch.uint8)
        return {"fg": pil_to_tensor(image), "bg_q": blank, "bg_k": blank, "params": params, "index": index}
