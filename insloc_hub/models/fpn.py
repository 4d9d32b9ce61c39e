"""The FPN neck exactly as InsLoc pretrains it: BN on lateral and output convs, no activation.

Official code: mmdet ``FPN(in=[256,512,1024,2048], out=256, num_outs=4)`` with ``norm_cfg=BN`` and
``act_cfg=None``, nearest-neighbour top-down upsampling and Xavier-uniform conv init. It produces
P2-P5 only; detectors that want P6 (RPN) or P6/P7 (RetinaNet) add them outside this module, so the
pretrained weights are exactly this module's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvNorm(nn.Sequential):
    """Conv (no bias) followed by BatchNorm; children are named ``conv`` and ``norm``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm=nn.BatchNorm2d(out_channels),
        ))


class FPN(nn.Module):
    """Feature pyramid over trunk stages, returning ``{"p2": ..., "p5": ...}``.

    Modules are keyed by output level (``lateral.p3``, ``output.p3``), so a pyramid that starts at
    P3 (RetinaNet) shares names with the pretrained P2-P5 pyramid and the unused P2 weights are
    visible by name.

    Args:
        in_channels: channels of each input stage, in order (e.g. c2..c5: 256, 512, 1024, 2048).
        out_channels: pyramid width (256 in the paper).
        levels: output level names, one per input (default ``p2``.. in order).

    Example:
        >>> fpn = FPN([64, 128, 256, 512], 32)
        >>> feats = {f"c{i + 2}": torch.zeros(1, c, 32 // 2**i, 32 // 2**i)
        ...          for i, c in enumerate([64, 128, 256, 512])}
        >>> [tuple(v.shape[1:]) for v in fpn(list(feats.values())).values()]
        [(32, 32, 32), (32, 16, 16), (32, 8, 8), (32, 4, 4)]
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, levels: Sequence[str] | None = None
                 ) -> None:
        super().__init__()
        self.levels = list(levels) if levels is not None else [f"p{i + 2}" for i in range(len(in_channels))]
        self.out_channels = out_channels
        self.lateral = nn.ModuleDict(
            {lv: ConvNorm(c, out_channels, 1) for lv, c in zip(self.levels, in_channels)}
        )
        self.output = nn.ModuleDict({lv: ConvNorm(out_channels, out_channels, 3) for lv in self.levels})
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, features: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        laterals = [self.lateral[lv](x) for lv, x in zip(self.levels, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        return OrderedDict((lv, self.output[lv](x)) for lv, x in zip(self.levels, laterals))
