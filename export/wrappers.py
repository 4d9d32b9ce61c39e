"""The modules that get exported: pixels in, everything a client needs out.

Clients of an exported graph send uint8 RGB pixels; the conversion to the model's input
(``/255``, and mean/std for backbones) is part of the graph, so no runtime can normalise twice or
forget to. Detectors keep torchvision's own resize, normalisation and post-processing inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from insloc_hub.errors import ConfigError
from insloc_hub.models import InsLocBackbone

TASKS = ("features", "embedding", "detector")


def feature_names(backbone: InsLocBackbone) -> list[str]:
    """The maps a ``features`` export returns: P2-P5 when the bundle has its FPN, else the trunk's maps."""
    if backbone.fpn is not None:
        return [f"p{i}" for i in range(2, 6)]
    return [info["name"] for info in backbone.trunk.feature_info]


def has_embedding(backbone: InsLocBackbone) -> bool:
    """Whether ``forward_embedding`` is defined (a C4 bundle needs its res5 head)."""
    return backbone.config.variant == "fpn" or backbone.box_head is not None


class PixelBackbone(nn.Module):
    """uint8 ``images [N, 3, H, W]`` RGB -> feature maps and/or the pooled embedding, as a tuple.

    Args:
        backbone: the bundle (eval mode).
        outputs: names in output order: map names from :func:`feature_names` and/or ``"embedding"``.
        mean, std: per-channel statistics in [0, 1] units (from the folder's preprocessing block).
    """

    def __init__(self, backbone: InsLocBackbone, outputs: Sequence[str], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.outputs = list(outputs)
        maps = [n for n in self.outputs if n != "embedding"]
        unknown = set(maps) - set(feature_names(backbone))
        if unknown:
            raise ConfigError(f"unknown feature maps {sorted(unknown)}; this bundle has {feature_names(backbone)}")
        # folded into one multiply-add on 0-255 values: (x/255 - mean)/std = x*scale + shift
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = self.scale.dtype
        x = images.to(dtype) * self.scale + self.shift
        results: list[torch.Tensor] = []
        maps = [n for n in self.outputs if n != "embedding"]
        if maps:
            c = self.backbone.trunk(x)
            feats = self.backbone.fpn(list(c.values())) if self.backbone.fpn is not None else c
            for name in self.outputs:
                if name == "embedding":
                    results.append(_embedding_from(self.backbone, c))
                else:
                    results.append(feats[name])
        else:
            results.append(self.backbone.forward_embedding(x))
        return tuple(results)


def _embedding_from(backbone: InsLocBackbone, trunk_maps: dict[str, torch.Tensor]) -> torch.Tensor:
    # the same as forward_embedding, reusing the trunk pass the feature maps already paid for
    if backbone.config.variant == "c4":
        return backbone.box_head(trunk_maps["c4"])
    return trunk_maps["c5"].mean(dim=(2, 3))


class PixelDetector(nn.Module):
    """uint8 ``image [3, H, W]`` RGB -> ``boxes, labels, scores`` (``, masks``) in the image's pixels.

    torchvision's ``GeneralizedRCNNTransform`` resizes and normalises the ``[0, 1]`` image and maps
    the boxes back to the input size, so all of it is inside the exported graph.
    """

    def __init__(self, detector: nn.Module, with_masks: bool) -> None:
        super().__init__()
        self.detector = detector
        self.with_masks = with_masks

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.detector([image.float() / 255.0])[0]
        result = (out["boxes"], out["labels"], out["scores"])
        return result + (out["masks"],) if self.with_masks else result
