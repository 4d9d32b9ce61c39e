"""Stand-in for ``insloc-export onnx`` in the service tests: .onnx files that follow CONTRACT part 2.

Used only until ``insloc_hub.export`` lands on main; the graphs take uint8 RGB pixels and carry the
``insloc.*`` metadata_props the onnxruntime backend reads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from insloc_hub import InsLocBackbone
from insloc_hub.transforms import IMAGENET_MEAN, IMAGENET_STD


class _PixelFeatures(nn.Module):
    def __init__(self, backbone: InsLocBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        x = (images.float() / 255.0 - self.mean) / self.std
        feats = self.backbone.forward_features(x)
        return feats["p2"], feats["p3"], feats["p4"], feats["p5"], feats["c5"].mean(dim=(2, 3))


class _PixelDetector(nn.Module):
    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        out = self.detector([image.float() / 255.0])[0]
        return out["boxes"], out["labels"], out["scores"]


def _metadata(path: Path, fields: dict) -> None:
    model = onnx.load(str(path))
    for key, value in fields.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def export_features(backbone: InsLocBackbone, path: Path, name: str = "tiny-backbone-onnx") -> Path:
    names = ["p2", "p3", "p4", "p5", "embedding"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_PixelFeatures(backbone).eval(), (torch.zeros(1, 3, 64, 64, dtype=torch.uint8),), str(path),
                          input_names=["images"], output_names=names, opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}, **{n: {0: "N"} for n in names}})
    _metadata(path, {"insloc.task": "features", "insloc.model_name": name, "insloc.revision": "test",
                     "insloc.weights_sha256": "0" * 64, "insloc.arch": "tiny-fpn", "insloc.exporter": "torchscript",
                     "insloc.opset": "17"})
    return path


def export_detector(detector: nn.Module, class_names: list[str], path: Path,
                    name: str = "tiny-detector-onnx") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_PixelDetector(detector).eval(), (torch.zeros(3, 96, 128, dtype=torch.uint8),), str(path),
                          input_names=["image"], output_names=["boxes", "labels", "scores"], opset_version=17,
                          dynamo=False, dynamic_axes={"image": {1: "H", 2: "W"}, "boxes": {0: "K"},
                                                      "labels": {0: "K"}, "scores": {0: "K"}})
    _metadata(path, {"insloc.task": "detector", "insloc.model_name": name, "insloc.revision": "test",
                     "insloc.weights_sha256": "0" * 64, "insloc.arch": "faster_rcnn_fpn",
                     "insloc.class_names": class_names, "insloc.exporter": "torchscript", "insloc.opset": "17"})
    return path
