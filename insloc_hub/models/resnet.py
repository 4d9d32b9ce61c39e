"""ResNet trunk with torchvision's layout and parameter names, returning stage outputs c2..c5.

The stride sits in the 3x3 conv of each bottleneck (torchvision's ResNet v1.5, detectron2's
``STRIDE_IN_1X1=False``, mmdet's ``style="pytorch"``), which is what the official InsLoc code
pretrains. ``width`` scales every stage (64 is the standard width) so tests can use tiny trunks.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from insloc_hub.errors import ConfigError

# depth -> (block type, blocks per stage), as torchvision's resnet18..resnet101
RESNET_SPECS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def stage_channels(depth: int, width: int = 64) -> list[int]:
    """Output channels of stages c2..c5 for a ResNet of this depth and width.

    >>> stage_channels(50)
    [256, 512, 1024, 2048]
    """
    block, _ = _spec(depth)
    return [width * 2**i * block.expansion for i in range(4)]


def _spec(depth: int) -> tuple[type[nn.Module], tuple[int, int, int, int]]:
    if depth not in RESNET_SPECS:
        raise ConfigError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNET_SPECS)}")
    return RESNET_SPECS[depth]


def make_stage(depth: int, stage: int, width: int = 64) -> nn.Sequential:
    """Build stage ``stage`` (1..4, i.e. torchvision's ``layer1``..``layer4``) on its own.

    The C4 detector and pretraining use ``make_stage(depth, 4)`` as the res5 RoI head.
    """
    block, layers = _spec(depth)
    planes = width * 2 ** (stage - 1)
    inplanes = width if stage == 1 else width * 2 ** (stage - 2) * block.expansion
    stride = 1 if stage == 1 else 2
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    blocks = [block(inplanes, planes, stride, downsample)]
    blocks += [block(planes * block.expansion, planes) for _ in range(1, layers[stage - 1])]
    return nn.Sequential(*blocks)


def init_resnet_weights(module: nn.Module) -> None:
    """Official InsLoc / torchvision init: fan-out He-normal convs, BN gamma=1 and beta=0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetTrunk(nn.Module):
    """ResNet without its classifier, returning ``{"c2": ..., "c5": ...}`` (strides 4..32).

    Parameter names equal torchvision's ``resnet{depth}`` (``conv1``, ``bn1``, ``layer1``...), so a
    torchvision state dict loads directly once ``fc.*`` is dropped.

    Args:
        depth: 18, 34, 50 or 101.
        width: channels of the first stage before expansion (64 standard; 16 for tests).
        num_stages: 4 for c2..c5, 3 for a C4 trunk ending at res4 (res5 is then the RoI head).

    Example:
        >>> trunk = ResNetTrunk(18, width=16)
        >>> {k: tuple(v.shape) for k, v in trunk(torch.zeros(1, 3, 64, 64)).items()}["c5"]
        (1, 128, 2, 2)
    """

    def __init__(self, depth: int = 50, width: int = 64, num_stages: int = 4) -> None:
        super().__init__()
        if num_stages not in (3, 4):
            raise ConfigError(f"num_stages must be 3 (C4 trunk) or 4, got {num_stages}")
        self.depth, self.width, self.num_stages = depth, width, num_stages
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for stage in range(1, num_stages + 1):
            self.add_module(f"layer{stage}", make_stage(depth, stage, width))
        channels = stage_channels(depth, width)
        self.feature_info = [
            {"name": f"c{stage + 1}", "module": f"layer{stage}", "num_chs": channels[stage - 1],
             "reduction": 2 ** (stage + 1)}
            for stage in range(1, num_stages + 1)
        ]
        init_resnet_weights(self)

    @property
    def out_channels(self) -> int:
        """Channels of the last returned stage."""
        return self.feature_info[-1]["num_chs"]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
            features[f"c{stage + 1}"] = x
        return features
