"""Model modules shared by pretraining, detectors, export and serving."""

from insloc_hub.models.backbone import PRESETS, BackboneConfig, InsLocBackbone, backbone_config
from insloc_hub.models.fpn import FPN
from insloc_hub.models.heads import BoxHead, Res5Head
from insloc_hub.models.resnet import ResNetTrunk, stage_channels

__all__ = [
    "PRESETS", "BackboneConfig", "BoxHead", "FPN", "InsLocBackbone", "Res5Head", "ResNetTrunk",
    "backbone_config", "stage_channels",
]
