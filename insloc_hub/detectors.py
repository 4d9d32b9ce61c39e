"""``build_detector``: torchvision detectors assembled from insloc-hub's modules.

The detectors are torchvision's own classes (``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``) with the
trunk, FPN and box head of :mod:`insloc_hub.models`, so a pretrained bundle's weights drop in by
prefix: ``trunk.*`` -> ``backbone.trunk.*``, ``fpn.*`` -> ``backbone.fpn.*``, ``box_head.*`` ->
``roi_heads.box_head.*``.

Architectures:
- ``faster_rcnn_fpn``: torchvision's ``fasterrcnn_resnet50_fpn_v2`` structure (FPN with BN, P6 by
  max-pool, 2-conv RPN head, 4conv1fc box head with BN).
- ``mask_rcnn_fpn``: likewise ``maskrcnn_resnet50_fpn_v2`` (4-conv mask head with BN).
- ``faster_rcnn_c4``: detectron2's R50-C4: trunk to res4, single-level RPN, RoIAlign 14x14, res5
  head with average pooling. torchvision has none; this one is ours.
- ``retinanet_fpn``: ``retinanet_resnet50_fpn_v2``'s head (GroupNorm, GIoU) on the pretrained FPN's
  P3-P5 plus P6/P7 from C5.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from insloc_hub.configs import JsonConfig
from insloc_hub.errors import ConfigError, WeightsMismatchError
from insloc_hub.models import FPN, BackboneConfig, BoxHead, InsLocBackbone, Res5Head, ResNetTrunk, backbone_config

logger = logging.getLogger(__name__)

ARCHITECTURES = ("faster_rcnn_fpn", "mask_rcnn_fpn", "faster_rcnn_c4", "retinanet_fpn")
NORM_MODES = ("bn", "frozen", "sync")
# where each part of a pretrained bundle lives inside a detector
PART_PREFIXES = {"trunk": "backbone.trunk.", "fpn": "backbone.fpn.", "box_head": "roi_heads.box_head."}
FPN_LEVELS = ["p2", "p3", "p4", "p5"]
#: the most classes a detector may have (LVIS has 1203): the predictor is allocated from it
MAX_NUM_CLASSES = 10_000
#: the longest image side a detector may resize to
MAX_IMAGE_SIDE = 10_000
#: torchvision's resize options: ``min_size`` one size or several (multi-scale training), ``max_size`` one
SIZE_OPTIONS = ("min_size", "max_size")


def size_option_problem(name: str, value: Any) -> str | None:
    """What the resize option ``name`` must be, when ``value`` is not that; ``None`` when it is fine.

    The one rule for ``build_detector`` and for config.json (``from_pretrained``).
    """
    many = name == "min_size" and isinstance(value, (list, tuple))
    sizes = list(value) if many else [value]
    if sizes and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in sizes):
        return None
    return f"an integer in [1, {MAX_IMAGE_SIDE}]" + (" or a non-empty list of them" if name == "min_size" else "")


def check_class_names(names: Any, field: str = "class_names", source: str = "") -> list[str]:
    """``names`` as a list, if it is a list or tuple of distinct non-empty strings; ConfigError naming ``field``.

    Label ``i`` is ``names[i - 1]``: a bare string would become one class per letter, a repeated
    name two labels no one can tell apart.
    """
    where = f"{source}: {field}" if source else field
    if isinstance(names, str):
        raise ConfigError(f"{where} must be a list of names, got the bare string {names!r} (one class per letter); "
                          f"for one class use [{names!r}]")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{where} must be a list of non-empty strings, got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where} must be distinct names; {repeated} appear more than once in {list(names)!r}")
    return list(names)


@dataclass
class DetectorConfig(JsonConfig):
    """A detector's one metadata object (like timm's ``pretrained_cfg``), as ``model.insloc_config``.

    ``config.json`` of a detection folder stores exactly ``to_dict()`` under ``"detector"``. The first
    fields rebuild the model; ``inference`` records the *effective* resize, normalisation, threshold
    and NMS settings read from the built modules (torchvision's defaults included), so a runtime
    without PyTorch (ONNX Runtime, TensorRT, Triton, a server) knows everything it needs.
    ``architecture`` is the :class:`BackboneConfig` (as a dict) of the detector's trunk, FPN and box
    head. ``unsaved_options`` names options that are not JSON values (a custom anchor generator...):
    such a detector cannot be saved.
    """

    arch: str = "faster_rcnn_fpn"
    num_classes: int = 91
    class_names: list[str] | None = None
    architecture: dict[str, Any] = field(default_factory=lambda: BackboneConfig().to_dict())
    box_head_extra_norm: bool = False
    norm: str = "bn"
    options: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    unsaved_options: list[str] = field(default_factory=list)
    config_kind = "detector config"

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["unsaved_options"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """Also reads the configs of insloc-hub 0.1, which named ``architecture`` ``backbone``."""
        data = dict(data)
        if "backbone" in data and "architecture" not in data:
            data["architecture"] = data.pop("backbone")
        return super().from_dict(data)


@dataclass
class LoadReport:
    """What loading pretrained weights into a detector did: detector keys ``loaded`` from them, ``new``
    ones (RPN, predictor, mask head...), and ``ignored`` pretrained keys with the reason."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One paragraph for logs: counts and the new/ignored module prefixes."""
        new_modules = sorted({".".join(k.split(".")[:2]) for k in self.new})
        lines = [f"loaded {len(self.loaded)} pretrained tensors; {len(self.new)} new tensors in {new_modules}"]
        lines += [f"ignored {n} pretrained tensors: {r}" for r, n in Counter(self.ignored.values()).items()]
        return "\n".join(lines)


class FPNDetectorBackbone(nn.Module):
    """Trunk + pretrained FPN on ``levels`` + ``extra``, the levels a detector adds (torchvision's ``extra_blocks``)."""

    def __init__(self, config: BackboneConfig, levels: list[str], extra: ExtraFPNBlock) -> None:
        super().__init__()
        self.trunk = ResNetTrunk(config.depth, config.width, num_stages=4)
        first = int(levels[0][1:]) - 2
        self.stages = [f"c{i + 2}" for i in range(first, 4)]
        self.fpn = FPN(config.stage_channels[first:], config.fpn_channels, levels)
        self.out_channels = config.fpn_channels
        self.extra = extra

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c = self.trunk(images)
        feats = self.fpn([c[name] for name in self.stages])
        results, names = self.extra(list(feats.values()), [c[n] for n in self.stages], list(feats))
        return OrderedDict(zip(names, results))


class AlignedRoIPool(MultiScaleRoIAlign):
    """RoIAlign on one feature map with ``aligned=True`` and adaptive sampling (detectron2's ROIAlignV2).

    A ``MultiScaleRoIAlign`` (so torchvision's detectors accept it) whose forward pools one known
    stride with ``aligned=True``; torchvision's own always uses ``aligned=False``.
    """

    def __init__(self, feature: str, output_size: int, stride: int, sampling_ratio: int = 0) -> None:
        super().__init__([feature], output_size, sampling_ratio)
        self.feature, self.stride = feature, stride
        self.output_size = (output_size, output_size)

    def forward(self, features: Mapping[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feat = features[self.feature]
        return roi_align(feat, [p.to(feat.dtype) for p in proposals], self.output_size,
                         spatial_scale=1.0 / self.stride, sampling_ratio=self.sampling_ratio, aligned=True)


class C4DetectorBackbone(nn.Module):
    """Trunk up to res4 (stride 16), returning ``{"c4": ...}``."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.trunk = ResNetTrunk(config.depth, config.width, num_stages=3)
        self.out_channels = self.trunk.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(c4=self.trunk(images)["c4"])


def build_detector(
    arch: str = "faster_rcnn_fpn",
    num_classes: int | None = None,
    *,
    class_names: list[str] | None = None,
    preset: str | BackboneConfig | dict[str, Any] | None = None,
    pretrained: InsLocBackbone | None = None,
    norm: str = "bn",
    strict: bool = True,
    box_head_extra_norm: bool = False,
    reinit: Sequence[str] = (),
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision detector, optionally with InsLoc-pretrained trunk, FPN and box head.

    Args:
        arch: one of ``faster_rcnn_fpn``, ``mask_rcnn_fpn``, ``faster_rcnn_c4``, ``retinanet_fpn``.
        num_classes: torchvision's convention, background included (91 for COCO). Derived from
            ``class_names`` (``len + 1``) when omitted; 91 when both are omitted.
        class_names: foreground class names, a list of distinct non-empty strings, stored with the
            model (label ``i`` is ``class_names[i - 1]``).
        preset: architecture preset (``"r50-fpn"``, ``"r50-c4"``, ``"tiny-fpn"``...) or a
            :class:`BackboneConfig`; taken from ``pretrained`` when that is given. Default: ``r50-fpn`` /
            ``r50-c4`` by arch. ``backbone=`` is its deprecated old name.
        pretrained: a backbone bundle (``insloc_hub.from_pretrained(name)`` of a backbone folder or alias);
            names are resolved by the caller, so this module never loads files.
        norm: ``"bn"`` (plain, trained; the default, since frozen layers hurt self-supervised
            transfer), ``"frozen"`` (FrozenBatchNorm2d in the trunk, FPN and box head) or ``"sync"``
            (SyncBatchNorm everywhere, for DDP).
        strict: fail if a pretrained tensor would be dropped or has the wrong shape (default). With
            ``False``, what cannot be loaded is skipped and listed in the report.
        box_head_extra_norm: an extra BN in the RoI head, new (randomly initialised): after the 4conv1fc
            head's fc (the official InsLoc fine-tuning head, ``FastRCNNConvFCHeadExtraNorm``) or after
            res5 for C4 (MoCo's ``Res5ROIHeadsExtraNorm``). R-CNNs only.
        reinit: pretrained layers, by their name in the bundle (``"box_head.fc1"``, ``"box_head"``,
            ``"fpn"``...), that are not loaded: they keep the detector's fresh initialisation and the
            load report lists them. On raccoon, InsLoc's box-head convs with a fresh fc
            (``reinit=["box_head.fc1"]``) transferred best (docs/results.md). Needs ``pretrained``.
        **kwargs: passed to torchvision's detector class (``min_size``, ``max_size``: positive
            integers up to :data:`MAX_IMAGE_SIDE`,
            ``box_score_thresh``, ``box_detections_per_img``, ``rpn_*``, ``image_mean``...).

    Returns:
        The torchvision model; ``model.insloc_config`` holds its :class:`DetectorConfig` (the one
        metadata object, effective inference settings included) and ``model.load_report`` the
        :class:`LoadReport` (``None`` without ``pretrained``).

    Example:
        >>> model = build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn")
        >>> model.roi_heads.box_predictor.cls_score.out_features
        2
    """
    if "backbone" in kwargs:  # the old name of preset: kept, with a warning, for one release
        warnings.warn("build_detector(backbone=...) is deprecated; use preset=...", DeprecationWarning, stacklevel=2)
        if preset is not None:
            raise ConfigError("give the architecture preset once: preset=... (backbone= is its deprecated name)")
        preset = kwargs.pop("backbone")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown detector architecture {arch!r}; choose one of {ARCHITECTURES}")
    if norm not in NORM_MODES:
        raise ConfigError(f"unknown norm mode {norm!r}; choose one of {NORM_MODES}")
    if class_names is not None:
        class_names = check_class_names(class_names)
        if num_classes is not None and num_classes != len(class_names) + 1:
            raise ConfigError(
                f"num_classes={num_classes} disagrees with {len(class_names)} class names "
                "(num_classes counts the background: it should be len(class_names) + 1)"
            )
        num_classes = len(class_names) + 1
    num_classes = 91 if num_classes is None else int(num_classes)
    if not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise ConfigError(f"num_classes must be at least 2 (background + one class) and at most {MAX_NUM_CLASSES}, "
                          f"got {num_classes}")
    for name in SIZE_OPTIONS:  # checked here, not when forward or from_pretrained meets them
        problem = size_option_problem(name, kwargs[name]) if name in kwargs else None
        if problem:
            raise ConfigError(f"{name} must be {problem}, got {kwargs[name]!r}")

    if pretrained is not None and not isinstance(pretrained, InsLocBackbone):
        # names are resolved by the caller (this module never loads files): say exactly how
        name = repr(str(pretrained)) if isinstance(pretrained, (str, Path)) else "NAME"
        raise ConfigError(f"pretrained must be a loaded backbone bundle (InsLocBackbone), not a "
                          f"{type(pretrained).__name__}: load it first with build_detector(..., "
                          f"pretrained=from_pretrained({name})) (from insloc_hub import from_pretrained). A fine-tuned "
                          "detector needs no build_detector: from_pretrained returns it ready to use")
    variant = "c4" if arch == "faster_rcnn_c4" else "fpn"
    if pretrained is not None:
        cfg = dataclasses.replace(pretrained.config, parts=None)
        if preset is not None and dataclasses.replace(backbone_config(preset), parts=None) != cfg:
            raise ConfigError(
                f"preset={preset!r} conflicts with the pretrained weights' architecture "
                f"({cfg.to_dict()}); leave preset out to use the pretrained one"
            )
    else:
        cfg = backbone_config(preset if preset is not None else f"r50-{variant}")
    if cfg.variant != variant:
        raise ConfigError(f"{arch} needs a {variant} backbone, got a {cfg.variant} one (from the "
                          f"{'pretrained weights' if pretrained is not None else 'preset'}); use arch="
                          f"{'faster_rcnn_c4' if cfg.variant == 'c4' else 'faster_rcnn_fpn'} or a {variant} one")
    if box_head_extra_norm and arch == "retinanet_fpn":
        raise ConfigError("box_head_extra_norm applies to R-CNN box heads; retinanet_fpn has none")
    reinit = [reinit] if isinstance(reinit, str) else list(reinit)
    if reinit and pretrained is None:
        raise ConfigError(f"reinit={list(reinit)} names pretrained layers to leave out: it needs pretrained=")
    _check_options(arch, kwargs)

    model = _ASSEMBLERS[arch](cfg, num_classes, box_head_extra_norm, kwargs)
    model.insloc_config = DetectorConfig(
        arch=arch, num_classes=num_classes, class_names=class_names,
        architecture=dataclasses.replace(cfg, parts=None).to_dict(), box_head_extra_norm=box_head_extra_norm,
        norm=norm, options={k: v for k, v in kwargs.items() if _is_json_value(v)},
        unsaved_options=sorted(k for k, v in kwargs.items() if not _is_json_value(v)),
    )
    model.insloc_config.inference = inference_options(model)
    model.load_report = None
    if pretrained is not None:
        model.load_report = load_pretrained_into_detector(model, pretrained, strict=strict, reinit=reinit)
        logger.info("%s", model.load_report.summary())
    if norm == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if norm == "frozen":
        # like detectron2's FrozenBN: only the (pre)trained trunk, FPN and box head (RetinaNet has none); the new
        # RPN, predictor and mask head keep trainable BN
        parts = {prefix.rstrip(".") for prefix in PART_PREFIXES.values()}
        for module in [module for name, module in model.named_modules() if name in parts]:
            _freeze_batchnorm(module)
    return model


_DETECTOR_CLASSES = {"faster_rcnn_fpn": FasterRCNN, "mask_rcnn_fpn": MaskRCNN, "faster_rcnn_c4": FasterRCNN,
                     "retinanet_fpn": RetinaNet}
# keywords torchvision forwards to GeneralizedRCNNTransform through **kwargs
_TRANSFORM_OPTIONS = {"size_divisible", "fixed_size", "_skip_resize"}


def detector_options(arch: str) -> set[str]:
    """Keyword options ``build_detector`` passes to torchvision's class for ``arch``."""
    params = inspect.signature(_DETECTOR_CLASSES[arch].__init__).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return (named | _TRANSFORM_OPTIONS) - {"self", "backbone", "num_classes"}


def _check_options(arch: str, kwargs: Mapping[str, Any]) -> None:
    valid = detector_options(arch)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{key!r} is not an option of {arch} (torchvision {_DETECTOR_CLASSES[arch].__name__})"
                              f"{hint}")
    # a value of the wrong type would only fail inside torchvision, mid-training: judge it by the default's type
    params = inspect.signature(_DETECTOR_CLASSES[arch].__init__).parameters
    for key, value in kwargs.items():
        if key in SIZE_OPTIONS:  # build_detector judged them already (size_option_problem)
            continue
        default = params[key].default if key in params else None
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            wanted = "a finite number"
        elif isinstance(default, (list, tuple)):
            ok, wanted = isinstance(value, (list, tuple)), "a list"
        else:  # None or an object: torchvision checks what it takes
            continue
        if not ok:
            raise ConfigError(f"{key}={value!r}: torchvision {_DETECTOR_CLASSES[arch].__name__} takes {wanted} "
                              f"there (default {default!r})")


def _is_json_value(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool)) for v in value)
    )


def _rcnn_fpn(cfg: BackboneConfig, num_classes: int, extra_norm: bool, kwargs: dict, masks: bool = False
              ) -> nn.Module:
    """Faster R-CNN (or, with ``masks``, Mask R-CNN) on the FPN: torchvision's ``*_resnet50_fpn_v2`` structure."""
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    width = cfg.fpn_channels
    options = dict(
        rpn_anchor_generator=anchors, rpn_head=RPNHead(width, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_roi_pool=MultiScaleRoIAlign(FPN_LEVELS, output_size=cfg.roi_size, sampling_ratio=2),
        box_head=BoxHead(width, cfg.roi_size, cfg.head_channels, cfg.head_convs, cfg.head_fc, extra_norm=extra_norm),
        box_predictor=FastRCNNPredictor(cfg.head_fc, num_classes),
    )
    if masks:
        options.update(mask_roi_pool=MultiScaleRoIAlign(FPN_LEVELS, output_size=14, sampling_ratio=2),
                       mask_head=MaskRCNNHeads(width, [width] * 4, 1, norm_layer=nn.BatchNorm2d),
                       mask_predictor=MaskRCNNPredictor(width, width, num_classes))
    body = FPNDetectorBackbone(cfg, FPN_LEVELS, LastLevelMaxPool())  # P6 = subsampled P5, for the 512 anchors
    return (MaskRCNN if masks else FasterRCNN)(body, **{**options, **kwargs})


def _faster_rcnn_c4(cfg: BackboneConfig, num_classes: int, extra_norm: bool, kwargs: dict) -> nn.Module:
    body = C4DetectorBackbone(cfg)
    # detectron2 R50-C4: one level at stride 16, five sizes x three ratios, ROIAlignV2 14x14, and
    # its RPN top-k defaults for a single level (12000/6000 before NMS, 2000/1000 after)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    res5 = Res5Head(cfg.depth, cfg.width, extra_norm=extra_norm)
    options = dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(body.out_channels, anchors.num_anchors_per_location()[0], conv_depth=1),
        rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
        box_roi_pool=AlignedRoIPool("c4", cfg.roi_size, stride=16),
        box_head=res5, box_predictor=FastRCNNPredictor(res5.out_channels, num_classes),
    )
    return FasterRCNN(body, **{**options, **kwargs})


def _retinanet_fpn(cfg: BackboneConfig, num_classes: int, extra_norm: bool, kwargs: dict) -> nn.Module:
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    # torchvision's 32 groups of 8 channels at width 256; narrower test pyramids keep 8 channels a group
    groups = max(1, min(32, cfg.fpn_channels // 8))
    head = RetinaNetHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, groups))
    head.regression_head._loss_type = "giou"  # as torchvision's retinanet_resnet50_fpn_v2
    # P6/P7 by convs from C5, as torchvision's RetinaNet
    body = FPNDetectorBackbone(cfg, ["p3", "p4", "p5"], LastLevelP6P7(cfg.stage_channels[3], cfg.fpn_channels))
    return RetinaNet(body, num_classes, **{**dict(anchor_generator=anchors, head=head), **kwargs})


# pretrained parts an architecture has no place for, with the reason the load report gives
_UNUSED_PARTS = {
    "retinanet_fpn": {
        "fpn.lateral.p2.": "retinanet_fpn uses P3-P7; the pretrained P2 level is not part of it",
        "fpn.output.p2.": "retinanet_fpn uses P3-P7; the pretrained P2 level is not part of it",
        "box_head.": "retinanet_fpn has no RoI box head",
    },
}


_ASSEMBLERS = {
    "faster_rcnn_fpn": _rcnn_fpn,
    "mask_rcnn_fpn": partial(_rcnn_fpn, masks=True),
    "faster_rcnn_c4": _faster_rcnn_c4,
    "retinanet_fpn": _retinanet_fpn,
}


def load_pretrained_into_detector(
    detector: nn.Module,
    pretrained: InsLocBackbone | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    reinit: Sequence[str] = (),
) -> LoadReport:
    """Copy a bundle's trunk, FPN and box head into a detector built by :func:`build_detector`
    (except the layers named in ``reinit``, see there).

    Raises:
        WeightsMismatchError: (``strict=True``) a pretrained tensor has no place in the detector or
            another shape, or a detector tensor of a pretrained part is absent; the keys are listed.
        ConfigError: a ``reinit`` name matches no pretrained tensor.
    """
    bundle_state = pretrained.state_dict() if isinstance(pretrained, nn.Module) else dict(pretrained)
    for name in reinit:
        if not any(_is_under(key, name) for key in bundle_state):
            layers = sorted({".".join(key.split(".")[:2]) for key in bundle_state})
            raise ConfigError(f"reinit {name!r} names no pretrained layer; the bundle's layers are {layers}")
    target = detector.state_dict()
    unused_parts = _UNUSED_PARTS.get(detector.insloc_config.arch, {})
    report = LoadReport()
    source_of: dict[str, str] = {}  # detector key -> pretrained key
    left_fresh: set[str] = set()  # detector keys of reinit layers
    for key in bundle_state:
        part, _, rest = key.partition(".")
        dest = PART_PREFIXES[part] + rest if part in PART_PREFIXES else key
        reason = next((r for prefix, r in unused_parts.items() if key.startswith(prefix)), None)
        if reason is None and any(_is_under(key, name) for name in reinit):
            reason = "left at its fresh initialisation (reinit)"
            left_fresh.add(dest)
        if reason is None and dest not in target and key.endswith("num_batches_tracked"):
            reason = "the detector's norm layers keep no batch counter (frozen BN)"
        if reason is not None:
            report.ignored[key] = reason
        else:
            source_of[dest] = key
    given = {dest: bundle_state[key] for dest, key in source_of.items()}
    parts = tuple(PART_PREFIXES[p] for p in {k.split(".", 1)[0] for k in bundle_state} if p in PART_PREFIXES)
    expected = {k: v for k, v in target.items() if k.startswith(parts) and k not in left_fresh and (
        k in given or (".extra_norm." not in k and not k.endswith("num_batches_tracked")))}  # new layers, counters
    if strict:
        WeightsMismatchError.check(expected, given, "pretrained weights do not fit the detector (detector names):",
                                   "Check that the architectures match, or pass strict=False to load what fits.")
    to_load = {k: v for k, v in given.items() if k in target and target[k].shape == v.shape}
    for dest in set(given) - set(to_load):
        report.ignored[source_of[dest]] = "shape mismatch (strict=False)" if dest in target else \
            "no matching tensor in the detector (strict=False)"
    detector.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.new = sorted(k for k in target if k not in to_load)
    return report


def _is_under(key: str, name: str) -> bool:
    """``box_head.fc1.weight`` is under ``box_head.fc1`` and ``box_head``, not under ``box_head.fc``."""
    return key == name or key.startswith(name + ".")


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` with a FrozenBatchNorm2d holding its statistics and affine."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked itself
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


#: mask probabilities above this count as mask pixels (the usual threshold for torchvision's pasted masks)
MASK_THRESHOLD = 0.5


def inference_options(model: nn.Module) -> dict[str, Any]:
    """The effective inference settings of a detector from :func:`build_detector`, read from its modules
    (resize, normalisation the detector applies to RGB in [0, 1], thresholds, NMS, top-k).

    Example:
        >>> inference_options(build_detector("retinanet_fpn", 3, preset="tiny-fpn"))["detections_per_img"]
        300
    """
    transform = model.transform
    min_size = list(transform.min_size)
    options: dict[str, Any] = {
        "min_size": min_size[0] if len(min_size) == 1 else min_size,
        "max_size": int(transform.max_size),
        "image_mean": [float(v) for v in transform.image_mean],
        "image_std": [float(v) for v in transform.image_std],
        "size_divisible": int(transform.size_divisible),
    }
    if isinstance(model, RetinaNet):
        options.update(score_thresh=float(model.score_thresh), nms_thresh=float(model.nms_thresh),
                       detections_per_img=int(model.detections_per_img), topk_candidates=int(model.topk_candidates))
        return options
    heads, rpn = model.roi_heads, model.rpn
    options.update(
        score_thresh=float(heads.score_thresh), nms_thresh=float(heads.nms_thresh),
        detections_per_img=int(heads.detections_per_img),
        rpn_pre_nms_top_n_test=int(rpn._pre_nms_top_n["testing"]),
        rpn_post_nms_top_n_test=int(rpn._post_nms_top_n["testing"]), rpn_nms_thresh=float(rpn.nms_thresh),
    )
    if heads.has_mask():
        options["mask_thresh"] = MASK_THRESHOLD
    return options


def set_inference_options(model: nn.Module, *, min_size: int | None = None, max_size: int | None = None) -> None:
    """Change a detector's test-time resize in place, in its modules and its metadata together.

    Example:
        >>> model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn")
        >>> set_inference_options(model, min_size=600)
        >>> model.insloc_config.inference["min_size"], model.transform.min_size
        (600, (600,))
    """
    config: DetectorConfig = model.insloc_config
    if min_size is not None:
        model.transform.min_size = (int(min_size),)
        config.options["min_size"] = int(min_size)
    if max_size is not None:
        model.transform.max_size = int(max_size)
        config.options["max_size"] = int(max_size)
    config.inference = inference_options(model)


def build_detector_from_config(config: DetectorConfig | Mapping[str, Any]) -> nn.Module:
    """Rebuild a detector (random weights) from a :class:`DetectorConfig` or its dict."""
    cfg = config if isinstance(config, DetectorConfig) else DetectorConfig.from_dict(config)
    # ``inference`` is derived from the built modules, never an input
    return build_detector(
        cfg.arch, cfg.num_classes, class_names=cfg.class_names, preset=cfg.architecture, norm=cfg.norm,
        box_head_extra_norm=cfg.box_head_extra_norm, **cfg.options,
    )
