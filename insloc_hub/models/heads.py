"""RoI heads shared by pretraining and the detectors.

``BoxHead`` is the 4conv + fc box head with BN (torchvision's ``FastRCNNConvFCHead`` of the v2
detectors, detectron2's ``NUM_CONV 4, NUM_FC 1`` with norm). InsLoc pretrains its convs and its fc
(``fc1``); the pretraining projection (fc2 + 128-d embedding) lives in ``training/pretraining/insloc.py`` and is
not part of the transferred weights, as in the official ``convert_pretrained.py``.

``Res5Head`` is ResNet's last stage used as the RoI head of C4 detectors (detectron2's R50-C4,
InsLoc's ``roi_head.shared_head.layer4``).
"""

from __future__ import annotations

import torch
from torch import nn

from insloc_hub.models.fpn import ConvNorm
from insloc_hub.models.resnet import init_resnet_weights, make_stage, stage_channels


class ConvNormReLU(ConvNorm):
    """3x3 conv (no bias) -> BN -> ReLU; children ``conv``, ``norm``, ``relu``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3)
        self.add_module("relu", nn.ReLU(inplace=True))


class BoxHead(nn.Module):
    """4 x [conv3x3, BN, ReLU] -> flatten -> fc -> ReLU (-> optional BN, detectron2's ExtraNorm).

    Args:
        in_channels: channels of the pooled RoI features (the FPN width).
        resolution: RoI pooling size (7).
        conv_channels: width of the convs (256).
        num_convs: number of convs (4).
        fc_dim: output features (1024).
        extra_norm: add BatchNorm1d after the fc's ReLU, as the official InsLoc fine-tuning
            config does (``FastRCNNConvFCHeadExtraNorm``); off by default to match torchvision.

    Example:
        >>> head = BoxHead(32, 7, 32, 4, 64)
        >>> head(torch.zeros(5, 32, 7, 7)).shape
        torch.Size([5, 64])
    """

    def __init__(
        self, in_channels: int = 256, resolution: int = 7, conv_channels: int = 256, num_convs: int = 4,
        fc_dim: int = 1024, extra_norm: bool = False,
    ) -> None:
        super().__init__()
        channels = [in_channels] + [conv_channels] * num_convs
        self.convs = nn.Sequential(*[ConvNormReLU(a, b) for a, b in zip(channels, channels[1:])])
        self.fc1 = nn.Linear(channels[-1] * resolution * resolution, fc_dim)
        self.relu = nn.ReLU(inplace=True)
        self.extra_norm = nn.BatchNorm1d(fc_dim) if extra_norm else None
        self.out_channels = fc_dim
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.convs(roi_features).flatten(1)))
        return self.extra_norm(x) if self.extra_norm is not None else x


class Res5Head(nn.Module):
    """ResNet stage 5 over pooled RoI features, then global average pooling.

    ``extra_norm`` adds BatchNorm2d on res5's output before pooling, as detectron2's
    ``Res5ROIHeadsExtraNorm`` in MoCo's VOC/COCO C4 fine-tuning configs; off by default.

    Example:
        >>> head = Res5Head(18, width=16)
        >>> head(torch.zeros(2, 64, 14, 14)).shape
        torch.Size([2, 128])
    """

    def __init__(self, depth: int = 50, width: int = 64, extra_norm: bool = False) -> None:
        super().__init__()
        self.layer4 = make_stage(depth, 4, width)
        self.out_channels = stage_channels(depth, width)[3]
        self.extra_norm = nn.BatchNorm2d(self.out_channels) if extra_norm else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        init_resnet_weights(self)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        x = self.layer4(roi_features)
        if self.extra_norm is not None:
            x = self.extra_norm(x)
        return self.pool(x).flatten(1)
