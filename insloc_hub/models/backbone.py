"""The backbone bundle: exactly what InsLoc pretraining produces and what detectors consume.

``InsLocBackbone`` = ResNet trunk (+ FPN) (+ box head). Its state-dict keys (``trunk.*``, ``fpn.*``,
``box_head.*``) are the keys of ``model.safetensors`` in a hub folder, so weights move from
pretraining to detectors, export and serving without any key map.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from insloc_hub.configs import JsonConfig, flag
from insloc_hub.errors import ConfigError
from insloc_hub.models.fpn import FPN
from insloc_hub.models.heads import BoxHead, Res5Head
from insloc_hub.models.resnet import ResNetTrunk, stage_channels

VARIANTS = ("fpn", "c4")
ALL_PARTS = ("trunk", "fpn", "box_head")


@dataclass
class BackboneConfig(JsonConfig):
    """Architecture of a backbone bundle; serialised into ``config.json["architecture"]``.

    ``variant`` ``"fpn"``: trunk c2-c5 + FPN + 4conv1fc box head (``roi_size`` 7); ``"c4"``: trunk to
    res4 + res5 RoI head (``roi_size`` 14). ``width`` is the first stage's (64 standard; 16 in tests).
    ``parts`` says which of ``trunk``, ``fpn``, ``box_head`` the bundle holds (a converted supervised
    or MoCo ResNet holds the trunk only for ``fpn``; trunk and res5 for ``c4``).
    """

    # the limits are those config.json files are checked against before anything is built
    depth: int = flag(50, min=18, max=152)
    width: int = flag(64, min=1, max=1024)
    variant: str = flag("fpn", choices=VARIANTS)
    fpn_channels: int = flag(256, min=1, max=4096)
    head_channels: int = flag(256, min=1, max=4096)
    head_convs: int = flag(4, min=0, max=16)
    head_fc: int = flag(1024, min=1, max=16384)
    roi_size: int = flag(7, min=1, max=64)
    parts: tuple[str, ...] | None = None
    config_kind = "architecture"

    def __post_init__(self) -> None:
        if self.parts is None:
            self.parts = ALL_PARTS if self.variant == "fpn" else ("trunk", "box_head")
        self.parts = tuple(self.parts)
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown backbone variant {self.variant!r}; choose one of {VARIANTS}")
        unknown = set(self.parts) - set(ALL_PARTS)
        if unknown or "trunk" not in self.parts:
            raise ConfigError(f"parts must include 'trunk' and come from {ALL_PARTS}, got {self.parts}")
        if self.variant == "c4" and "fpn" in self.parts:
            raise ConfigError("a c4 backbone has no FPN; drop 'fpn' from parts")
        stage_channels(self.depth, self.width)  # validates depth

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parts"] = list(self.parts)
        return d

    @property
    def stage_channels(self) -> list[int]:
        return stage_channels(self.depth, self.width)


PRESETS: dict[str, BackboneConfig] = {
    "r50-fpn": BackboneConfig(),
    "r50-c4": BackboneConfig(variant="c4", roi_size=14),
    "r18-fpn": BackboneConfig(depth=18),
    "r101-fpn": BackboneConfig(depth=101),
    # tiny widths for tests and CPU smoke runs
    "tiny-fpn": BackboneConfig(depth=18, width=16, fpn_channels=32, head_channels=32, head_fc=64),
    "tiny-c4": BackboneConfig(depth=18, width=16, variant="c4", roi_size=14),
}


def backbone_config(arch: str | BackboneConfig | dict[str, Any]) -> BackboneConfig:
    """Resolve a preset name (``"r50-fpn"``, ``"tiny-c4"``...), a dict or a config to a config."""
    if isinstance(arch, BackboneConfig):
        return arch
    if isinstance(arch, dict):
        return BackboneConfig.from_dict(arch)
    if arch not in PRESETS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[arch])


class InsLocBackbone(nn.Module):
    """Trunk (+ FPN) (+ box head), as produced by pretraining.

    Example:
        >>> model = InsLocBackbone("tiny-fpn")
        >>> feats = model.forward_features(torch.zeros(1, 3, 64, 64))
        >>> list(feats)
        ['c2', 'c3', 'c4', 'c5', 'p2', 'p3', 'p4', 'p5']
        >>> model.forward_embedding(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 128])
    """

    def __init__(self, config: str | BackboneConfig | dict[str, Any] = "r50-fpn") -> None:
        super().__init__()
        self.config = cfg = backbone_config(config)
        self.trunk = ResNetTrunk(cfg.depth, cfg.width, num_stages=4 if cfg.variant == "fpn" else 3)
        self.fpn = FPN(cfg.stage_channels, cfg.fpn_channels) if "fpn" in cfg.parts else None
        self.box_head: nn.Module | None = None
        if "box_head" in cfg.parts:
            if cfg.variant == "fpn":
                self.box_head = BoxHead(cfg.fpn_channels, cfg.roi_size, cfg.head_channels, cfg.head_convs,
                                        cfg.head_fc)
            else:
                self.box_head = Res5Head(cfg.depth, cfg.width)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The maps ``forward_features`` returns, timm-style: ``name``, ``module``, ``num_chs``, ``reduction``."""
        info = list(self.trunk.feature_info)
        if self.fpn is not None:
            info += [{"name": f"p{i + 2}", "module": f"fpn.output.p{i + 2}", "num_chs": self.config.fpn_channels,
                      "reduction": 2 ** (i + 2)} for i in range(4)]
        return info

    @property
    def embedding_dim(self) -> int:
        """Size of :meth:`forward_embedding`'s output."""
        return stage_channels(self.config.depth, self.config.width)[3]

    def forward_features(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Feature maps for normalised RGB images ``[B, 3, H, W]``: c2..c5 (c4 for C4), then p2..p5."""
        feats = self.trunk(images)
        if self.fpn is not None:
            feats.update(self.fpn(list(feats.values())))
        return feats

    forward = forward_features

    def forward_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last-stage features ``[B, C5]`` (res5 run on c4 for C4 bundles)."""
        c_last = self.trunk(images)
        if self.config.variant == "c4":
            if not isinstance(self.box_head, Res5Head):
                raise ConfigError("this C4 bundle has no res5 head; its embedding would be undefined")
            return self.box_head(c_last["c4"])
        return c_last["c5"].mean(dim=(2, 3))

    def roi_features(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Box-head features ``[sum(N_i), D]`` for boxes (xyxy pixels) on each image.

        FPN bundles pool with torchvision's level mapping (as the detectors do), C4 bundles pool
        14x14 on c4 and run res5.
        """
        if self.box_head is None:
            raise ConfigError("this bundle has no pretrained box head; use forward_embedding instead")
        feats = self.forward_features(images)
        image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        if self.config.variant == "fpn":
            names, ratio = ["p2", "p3", "p4", "p5"], 2
        else:
            names, ratio = ["c4"], 0
        pooler = MultiScaleRoIAlign(names, self.config.roi_size, ratio)
        pooled = pooler({k: feats[k] for k in names}, [b.to(images.dtype) for b in boxes], image_sizes)
        return self.box_head(pooled)
