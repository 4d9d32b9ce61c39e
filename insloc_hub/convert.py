"""Key maps at the borders: foreign checkpoints in, detectron2 ``.pkl`` out; the only place other names appear.

In: :func:`convert_official` (official InstanceLoc mmdet/mmcv checkpoints, FPN or C4),
:func:`convert_torchvision_resnet`, :func:`convert_moco`; each returns ``(InsLocBackbone,
ConversionReport)`` and accounts for every source tensor (mapped, or dropped with a reason; an
unknown key is an error unless ``strict=False``). :func:`convert_to_folder` also writes the hub
folder, the conversion recorded in ``config.json["provenance"]``. Out: :func:`export_detectron2`
writes the pickle of the official ``convert_pretrained.py``. Foreign files are read with
``torch.load(weights_only=True)`` only (:class:`~insloc_hub.errors.CheckpointError` otherwise).

Example:
    >>> bundle, report = convert_official("insloc_fpn_200ep.pth")  # doctest: +SKIP
    >>> export_detectron2(bundle, "insloc_fpn_200ep.pkl")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from insloc_hub.errors import CheckpointError, ConfigError, WeightsMismatchError
from insloc_hub.models import BackboneConfig, InsLocBackbone
from insloc_hub.models.resnet import RESNET_SPECS
from insloc_hub.pretrained import from_pretrained, save_pretrained, sha256_file

__all__ = [
    "ConversionReport", "convert_moco", "convert_official", "convert_to_folder", "convert_torchvision_resnet",
    "describe_unpickling_refusal", "export_detectron2", "load_foreign_checkpoint",
]

PathLike = str | os.PathLike[str]
StateDict = Mapping[str, torch.Tensor]

# reasons, shared by the report and the provenance record
MOMENTUM = "momentum (key) encoder; only the query encoder is transferred, as the official converter does"
QUEUE = "negative-key queue / pointer of the contrastive loss (pretraining state)"
PROJ_FC2 = ("second fc of the pretraining projection (shared_fcs.1); not transferred: the official converter "
            "leaves it under its mmdet name, which detectron2 ignores")
PROJ_CLS = "128-d embedding layer of the pretraining projection (fc_cls); the official converter skips it"
C4_PROJ = "C4 pretraining projection head (bbox_head); the official converter with --c4 copies no bbox_head weight"
CLASSIFIER = "ImageNet classifier (fc); a backbone has none"
MOCO_MLP = "MoCo projection head (encoder_q.fc); not part of the backbone"
UNKNOWN = "unknown key, dropped because strict=False"
NUM_BATCHES = "BN num_batches_tracked counter; detectron2 has no such buffer"


@dataclass
class ConversionReport:
    """What a conversion did with every source tensor: ``mapped`` (source key -> target key), ``dropped``
    (source key -> why), ``notes`` (filled buffers, casts...) and the resulting ``architecture``.

    Example:
        >>> report = ConversionReport("x.pth", "torchvision", mapped={"conv1.weight": "trunk.conv1.weight"},
        ...                           dropped={"fc.weight": CLASSIFIER, "fc.bias": CLASSIFIER})
        >>> print(report.summary().splitlines()[0])
        torchvision x.pth -> insloc-hub: 1 tensors mapped, 2 dropped
    """

    source: str
    source_format: str
    target_format: str = "insloc-hub"
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    architecture: dict[str, Any] | None = None

    def dropped_by_reason(self) -> dict[str, list[str]]:
        """Dropped keys grouped by reason, in first-seen order."""
        groups: dict[str, list[str]] = defaultdict(list)
        for key, reason in self.dropped.items():
            groups[reason].append(key)
        return dict(groups)

    def summary(self) -> str:
        """A few human-readable lines: counts, and the dropped keys per reason (abbreviated)."""
        lines = [f"{self.source_format} {self.source} -> {self.target_format}: "
                 f"{len(self.mapped)} tensors mapped, {len(self.dropped)} dropped"]
        if self.architecture:
            arch = self.architecture
            lines.append(f"  architecture: ResNet-{arch['depth']} width {arch['width']}, variant {arch['variant']}, "
                         f"parts {', '.join(arch['parts'])}")
        for reason, keys in self.dropped_by_reason().items():
            shown = _prefixes(keys)
            more = f" (+{len(shown) - 4} more)" if len(shown) > 4 else ""
            lines.append(f"  dropped {len(keys)}: {reason}: {', '.join(shown[:4])}{more}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def provenance(self) -> dict[str, Any]:
        """The record ``convert_*_to_folder`` stores in ``config.json["provenance"]``."""
        return {
            "source_file": Path(self.source).name,
            "source_format": self.source_format,
            "conversion": f"{len(self.mapped)} tensors mapped, {len(self.dropped)} dropped",
            "dropped": [{"reason": reason, "count": len(keys), "keys": _prefixes(keys)}
                        for reason, keys in self.dropped_by_reason().items()],
            "conversion_notes": list(self.notes),
        }


def _prefixes(keys: list[str]) -> list[str]:
    """Keys as short patterns: whole keys when few, else their module prefixes (``backbone_k.*``)."""
    if len(keys) <= 8:
        return list(keys)
    seen: dict[str, None] = {}
    for key in keys:
        head = key.split(".")[0]
        if head in ("roi_head", "roi_head_k", "module") and key.count(".") > 2:
            head = ".".join(key.split(".")[:2])
        seen[f"{head}.*" if "." in key else head] = None
    return list(seen)


def load_foreign_checkpoint(path: PathLike) -> Any:
    """``torch.load`` a foreign file safely (``weights_only=True``, on the CPU).

    Raises:
        CheckpointError: the file is missing or unreadable, or it needs arbitrary Python objects
            (custom classes, functions) to unpickle. We refuse those: unpickling runs code the file
            chooses, so a checkpoint from the internet could do anything on this machine.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a pickle of objects: we never run it
            raise CheckpointError(f"refusing to load {path}: {describe_unpickling_refusal(exc)}") from exc
        error: Exception = exc  # not a pickle of objects: garbage or a damaged file
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:  # garbage bytes
        error = exc
    reason = _unpickler_detail(str(error)) or f"{type(error).__name__}: {error}"
    raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({reason}); it is not a PyTorch checkpoint "
                          "file, or it is damaged") from error


def _unpickler_detail(message: str) -> str | None:
    """The reason torch's weights-only unpickler gave, without the advice around it."""
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    return detail.group(1).strip() if detail else None


def describe_unpickling_refusal(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to unpickle it.

    torch's message suggests rerunning with ``weights_only=False``; for a file from elsewhere that
    runs code the file chooses, so insloc-hub never repeats it (nor any other way to unpickle).
    """
    text = str(exc)
    needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if needs is not None:
        what = f"it needs the Python object {needs.group(1)} beyond tensors and plain containers"
    else:
        reason = _unpickler_detail(text) or "unknown content"
        what = f"it holds data that is not tensors and plain containers ({reason})"
    return (
        f"{what}, and unpickling it would run code chosen by the file. insloc-hub never unpickles such files: "
        "ask its author for a weights-only file (tensors saved with torch.save, or safetensors)"
    )


def _state_dict_of(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: ``checkpoint["state_dict"]`` (mmcv, MoCo), ``["model"]`` or itself, without
    the ``module.`` prefix DistributedDataParallel adds."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    state: Any = checkpoint
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            state = checkpoint[wrapper]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} has no tensors (top-level keys: {sorted(map(str, checkpoint))[:10]})")
    others = sorted(set(state) - set(tensors))
    if others:
        raise CheckpointError(f"{source}: state dict entries that are not tensors: {others[:10]}")
    consume_prefix_in_state_dict_if_present(tensors, "module.")
    return tensors


def _blocks(keys: list[str], prefix: str) -> int:
    """Number of residual blocks under ``prefix`` (e.g. ``trunk.layer3.``)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _infer_resnet(state: StateDict, variant: str, depth: int | None, source: str) -> tuple[int, int]:
    """(depth, width) of a bundle's ResNet from its tensors: blocks per stage, bottleneck or basic, stem width."""
    if "trunk.conv1.weight" not in state:
        raise WeightsMismatchError(f"{source} has no ResNet stem (trunk.conv1.weight); is it the right format?")
    width = int(state["trunk.conv1.weight"].shape[0])
    layer4 = "box_head.layer4." if variant == "c4" else "trunk.layer4."
    counts = tuple(_blocks(list(state), p) for p in ["trunk.layer1.", "trunk.layer2.", "trunk.layer3.", layer4])
    bottleneck = "trunk.layer1.0.conv3.weight" in state
    inferred = [d for d, (block, layers) in RESNET_SPECS.items()
                if layers == counts and (block.expansion == 4) == bottleneck]
    if not inferred:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConfigError(f"{source}: a ResNet with {kind} blocks {list(counts)} per stage is not supported "
                          f"(supported depths: {sorted(RESNET_SPECS)})")
    if depth is not None and depth != inferred[0]:
        raise ConfigError(f"{source} holds a ResNet-{inferred[0]} (blocks {list(counts)}), not the ResNet-{depth} "
                          "you asked for; leave depth unset to use what the file holds")
    return inferred[0], width


def _infer_config(mapped: StateDict, variant: str, depth: int | None, report: ConversionReport) -> BackboneConfig:
    """The architecture the mapped tensors hold: the ResNet, and which parts (with their sizes) are there."""
    depth, width = _infer_resnet(mapped, variant, depth, report.source)
    if variant == "c4":
        report.notes.append("C4 RoIAlign size is not stored in the checkpoint; set to 14 (mmdet/detectron2 C4)")
        parts = ("trunk", "box_head") if any(k.startswith("box_head.") for k in mapped) else ("trunk",)
        return BackboneConfig(depth=depth, width=width, variant="c4", roi_size=14, parts=parts)
    parts = ["trunk"]
    sizes: dict[str, Any] = {}
    if "fpn.lateral.p2.conv.weight" in mapped:
        parts.append("fpn")
        sizes["fpn_channels"] = int(mapped["fpn.lateral.p2.conv.weight"].shape[0])
    if "box_head.convs.0.conv.weight" in mapped:
        parts.append("box_head")
        head_channels = int(mapped["box_head.convs.0.conv.weight"].shape[0])
        fc_in = int(mapped["box_head.fc1.weight"].shape[1]) if "box_head.fc1.weight" in mapped else 0
        roi_size = math.isqrt(fc_in // head_channels) if head_channels else 0
        if roi_size * roi_size * head_channels != fc_in:
            raise WeightsMismatchError(f"{report.source}: box head fc input {fc_in} is not "
                                       f"{head_channels} x roi_size^2; the box head is incomplete")
        sizes.update(head_convs=_blocks(list(mapped), "box_head.convs."), head_channels=head_channels,
                     roi_size=roi_size, head_fc=int(mapped["box_head.fc1.weight"].shape[0]))
    return BackboneConfig(depth=depth, width=width, variant="fpn", parts=tuple(parts), **sizes)


def _convert(state: StateDict, report: ConversionReport, variant: str, depth: int | None, strict: bool, *,
             drop: Callable[[str], str | None], rename: Callable[[str], str | None], expected: str) -> InsLocBackbone:
    """Map or drop (with a reason) every tensor of ``state``, infer the architecture and build the bundle.

    ``drop`` gives the reason a key is left out (None: keep it), ``rename`` its bundle key (None: unknown);
    unknown keys are an error naming ``expected`` (the layout the converter knows) unless ``strict=False``.
    """
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        reason = drop(key)
        target = rename(key) if reason is None else None
        if reason is not None:
            report.dropped[key] = reason
        elif target is None:
            unknown.append(key)
        else:
            mapped[target] = value
            report.mapped[key] = target
    if unknown and strict:
        raise WeightsMismatchError(
            f"{report.source} ({report.source_format}) has {len(unknown)} keys this converter does not know: "
            f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}. {expected} "
            "Pass strict=False to drop them (they are listed in the report)."
        )
    report.dropped.update(dict.fromkeys(unknown, UNKNOWN))
    return _build(_infer_config(mapped, variant, depth, report), mapped, report)


def _build(config: BackboneConfig, state: dict[str, torch.Tensor], report: ConversionReport) -> InsLocBackbone:
    """An InsLocBackbone holding exactly ``state`` (every tensor of the model must be there)."""
    with torch.device("meta"):  # no random init: every tensor comes from the source
        model = InsLocBackbone(config)
    expected = model.state_dict()
    filled = [k for k in expected if k.endswith("num_batches_tracked") and k not in state]
    for key in filled:
        state[key] = torch.tensor(0, dtype=torch.long)
    if filled:
        report.notes.append(f"{len(filled)} BN num_batches_tracked counters absent from the source; set to 0")
    WeightsMismatchError.check(expected, state, f"{report.source} does not convert to a complete {config.variant} "
                               f"bundle (ResNet-{config.depth}, width {config.width}, parts {list(config.parts)}):")
    cast = sorted({str(v.dtype) for v in state.values() if v.is_floating_point() and v.dtype != torch.float32})
    if cast:
        report.notes.append(f"floating-point tensors cast from {', '.join(cast)} to float32")
    state = {k: (v.float() if v.is_floating_point() else v).clone().contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    report.architecture = config.to_dict()
    return model.eval()


def _official_drop(key: str, variant: str) -> str | None:
    """Why a key of an official checkpoint is not transferred (None: it is), as the official converter decides."""
    if key in ("queue", "queues", "queue_ptr") or key.startswith(("queue.", "queues.")):
        return QUEUE
    if key.startswith(("backbone_k.", "neck_k.", "roi_head_k.", "rpn_head_k.")):
        return MOMENTUM
    if variant == "c4":
        return C4_PROJ if key.startswith("roi_head.bbox_head.") else None
    if key.startswith("roi_head.bbox_head.shared_fcs.") and not key.startswith("roi_head.bbox_head.shared_fcs.0."):
        return PROJ_FC2
    return PROJ_CLS if key.startswith("roi_head.bbox_head.fc_cls.") else None


@functools.cache
def _official_names(variant: str) -> tuple[tuple[str, str], ...]:
    """``(official prefix, our prefix)`` of every module whose name differs between the layouts.

    The one table both directions use (:func:`_from_official_key`; the tests' official-layout maker); the
    rest of a key (``weight``, ``running_var``...) is the same on both sides.
    """
    stages = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.") + (("layer4.",) if variant == "fpn" else ())
    names = [(f"backbone.{stage}", f"trunk.{stage}") for stage in stages]
    if variant == "c4":
        return (*names, ("roi_head.shared_head.layer4.", "box_head.layer4."))
    for level in range(4):
        for official, ours in (("lateral_convs", "lateral"), ("fpn_convs", "output")):
            names += [(f"neck.{official}.{level}.conv.", f"fpn.{ours}.p{level + 2}.conv."),
                      (f"neck.{official}.{level}.bn.", f"fpn.{ours}.p{level + 2}.norm.")]
    for index in range(8):  # more convs than any box head has: absent ones simply never match
        names += [(f"roi_head.bbox_head.shared_convs.{index}.conv.", f"box_head.convs.{index}.conv."),
                  (f"roi_head.bbox_head.shared_convs.{index}.bn.", f"box_head.convs.{index}.norm.")]
    return (*names, ("roi_head.bbox_head.shared_fcs.0.", "box_head.fc1."))


def _from_official_key(key: str, variant: str) -> str | None:
    """Our name of one query-side key of an official checkpoint, or None if it is not a transferred key."""
    return next((ours + key[len(official):] for official, ours in _official_names(variant)
                 if key.startswith(official)), None)


def _detect_variant(state: StateDict, variant: str, source: str) -> str:
    has_c4 = any(k.startswith("roi_head.shared_head.") for k in state)
    has_fpn = any(k.startswith("neck.") for k in state)
    if variant == "auto":
        if has_c4 and not has_fpn:
            return "c4"
        if has_fpn and not has_c4:
            return "fpn"
        raise ConfigError(f"{source}: cannot tell FPN from C4 (neck.* present: {has_fpn}, "
                          f"roi_head.shared_head.* present: {has_c4}); pass variant='fpn' or 'c4'")
    if variant not in ("fpn", "c4"):
        raise ConfigError(f"variant must be 'auto', 'fpn' or 'c4', got {variant!r}")
    if (variant == "fpn" and has_c4) or (variant == "c4" and has_fpn):
        found = "roi_head.shared_head.* (a C4 res5 head)" if variant == "fpn" else "neck.* (an FPN)"
        raise ConfigError(f"{source} has {found}, so it is not a {variant} checkpoint; use variant='auto'")
    return variant


def convert_official(
    path: PathLike, *, variant: str = "auto", depth: int | None = None, strict: bool = True,
) -> tuple[InsLocBackbone, ConversionReport]:
    """Convert an official InstanceLoc checkpoint (mmcv ``.pth``) to an :class:`InsLocBackbone`.

    Only the query encoder is kept, named by :func:`_official_names`. Dropped with a reason, exactly
    what the official ``convert_pretrained.py`` leaves out: the momentum copies (``*_k``), the queues,
    ``shared_fcs.1`` and ``fc_cls`` (FPN), the whole ``roi_head.bbox_head`` (C4).

    Args:
        path: the ``.pth`` file (``{"state_dict": ..., "meta": ...}``; a bare state dict works too).
        variant: ``"auto"`` (from the keys), ``"fpn"`` or ``"c4"``.
        depth: expected ResNet depth; None infers it (and the width) from the tensors.
        strict: unknown keys are an error (True) or dropped and reported (False).

    Raises:
        CheckpointError: unreadable file, or one that needs pickle beyond weights_only.
        WeightsMismatchError: unknown keys (strict), or tensors that do not form a complete bundle.
        ConfigError: variant or depth that do not fit the file.

    Example:
        >>> bundle, report = convert_official("insloc_c4_400ep.pth")  # doctest: +SKIP
        >>> bundle.config.variant, bundle.config.parts  # doctest: +SKIP
        ('c4', ('trunk', 'box_head'))
    """
    source = str(path)
    checkpoint = load_foreign_checkpoint(path)
    state = _state_dict_of(checkpoint, source)
    report = ConversionReport(source, "insloc-official")
    meta = checkpoint.get("meta")  # a Mapping: _state_dict_of checked it
    if isinstance(meta, Mapping) and "epoch" in meta:
        report.notes.append(f"checkpoint saved after epoch {meta['epoch']}")
    variant = _detect_variant(state, variant, source)
    bundle = _convert(state, report, variant, depth, strict, drop=functools.partial(_official_drop, variant=variant),
                      rename=functools.partial(_from_official_key, variant=variant),
                      expected="Expected the mmdet layout of limbo0000/InstanceLoc (backbone, neck, roi_head and "
                      "their *_k momentum copies, queues).")
    return bundle, report


def _convert_resnet(source: PathLike | StateDict, source_format: str, variant: str, depth: int | None,
                    strict: bool, drop: Callable[[str], str | None], prefix: str = "",
                    ) -> tuple[InsLocBackbone, ConversionReport]:
    """A torchvision ResNet under ``prefix`` (``layer4`` in the res5 head for C4); ``drop`` says what else is there."""
    if variant not in ("fpn", "c4"):
        raise ConfigError(f"variant must be 'fpn' or 'c4', got {variant!r}")
    in_memory = isinstance(source, Mapping)
    report = ConversionReport("<state dict>" if in_memory else str(source), source_format)
    state = _state_dict_of(source if in_memory else load_foreign_checkpoint(source), report.source)
    if prefix and not any(k.startswith(prefix) for k in state):
        raise CheckpointError(f"{report.source} has no {prefix}* keys: not a MoCo checkpoint "
                              "(use convert_torchvision_resnet for a plain ResNet state dict)")

    def rename(key: str) -> str | None:
        local = key.removeprefix(prefix)
        if not key.startswith(prefix) or not re.match(r"(conv1|bn1|layer[1-4])\.", local):
            return None
        return f"box_head.{local}" if variant == "c4" and local.startswith("layer4.") else f"trunk.{local}"

    expected = f"Expected a torchvision ResNet under {prefix or 'the top level'!r}."
    return _convert(state, report, variant, depth, strict, drop=drop, rename=rename, expected=expected), report


def convert_torchvision_resnet(
    path_or_state_dict: PathLike | StateDict, *, variant: str = "fpn", depth: int | None = None,
    strict: bool = True,
) -> tuple[InsLocBackbone, ConversionReport]:
    """Convert a torchvision ResNet state dict (``fc.*`` dropped) to a backbone bundle.

    ``variant="fpn"`` gives a trunk-only bundle (FPN and box head are left to the detector);
    ``variant="c4"`` puts ``layer1-3`` in the trunk and ``layer4`` in the res5 head (``box_head``).

    Args:
        path_or_state_dict: a ``.pth`` file or an in-memory state dict (a ``module.`` prefix is removed).
        variant: ``"fpn"`` or ``"c4"``.
        depth: expected depth; None infers depth and width from the tensors.
        strict: unknown keys are an error (True) or dropped and reported (False).

    Example:
        >>> from torchvision.models import resnet18
        >>> bundle, report = convert_torchvision_resnet(resnet18(weights=None).state_dict())
        >>> bundle.config.depth, bundle.config.parts, sorted(report.dropped)
        (18, ('trunk',), ['fc.bias', 'fc.weight'])
    """
    return _convert_resnet(path_or_state_dict, "torchvision", variant, depth, strict,
                           lambda key: CLASSIFIER if key.startswith("fc.") else None)


def convert_moco(
    path: PathLike, *, variant: str = "fpn", depth: int | None = None, strict: bool = True,
) -> tuple[InsLocBackbone, ConversionReport]:
    """Convert a MoCo v1/v2 checkpoint (``state_dict`` with ``module.encoder_q.*``) to a backbone bundle.

    ``encoder_q`` without its ``fc`` (the v1 linear or v2 MLP projection) becomes the trunk
    (``variant="c4"``: ``layer4`` becomes the res5 head); ``encoder_k``, ``queue`` and ``queue_ptr``
    are dropped.

    Example:
        >>> bundle, report = convert_moco("moco_v2_800ep_pretrain.pth.tar")  # doctest: +SKIP
        >>> bundle.config.depth  # doctest: +SKIP
        50
    """
    def drop(key: str) -> str | None:
        if key.startswith("encoder_k."):
            return MOMENTUM
        if key in ("queue", "queue_ptr"):
            return QUEUE
        return MOCO_MLP if key.startswith("encoder_q.fc.") else None

    return _convert_resnet(path, "moco", variant, depth, strict, drop, prefix="encoder_q.")


def convert_to_folder(
    source_format: str, src: PathLike | StateDict, out_dir: PathLike, *, name: str | None = None,
    provenance: Mapping[str, Any] | None = None, overwrite: bool = False, **options: Any,
) -> tuple[Path, ConversionReport]:
    """Convert (``"official"``, ``"torchvision"`` or ``"moco"``, with the converter's ``options``) and save a
    hub folder whose provenance records the source file, its sha256, its format, what was dropped and
    ``provenance`` (e.g. ``{"epochs": 200}``). ``overwrite``: as :func:`save_pretrained`'s (replace a
    folder holding another kind of model, removing its files the new folder does not list).

    Example:
        >>> folder, report = convert_to_folder("official", "insloc_fpn_200ep.pth", "hub/r50")  # doctest: +SKIP
    """
    converters = {"official": convert_official, "torchvision": convert_torchvision_resnet, "moco": convert_moco}
    if source_format not in converters:
        raise ConfigError(f"unknown source format {source_format!r}; choose one of {sorted(converters)}")
    bundle, report = converters[source_format](src, **options)
    record = report.provenance()
    record["converted_with"] = f"insloc_hub.convert.{converters[source_format].__name__}"
    record["source_sha256"] = sha256_file(src) if not isinstance(src, Mapping) else None
    record.update(provenance or {})
    return save_pretrained(bundle, out_dir, name=name, provenance=record, overwrite=overwrite), report


_D2_BLOCK = [(re.compile(r"\.bn(\d)\."), r".conv\1.norm."), (re.compile(r"\.downsample\.0\."), ".shortcut."),
             (re.compile(r"\.downsample\.1\."), ".shortcut.norm.")]


def _d2_key(key: str, c4: bool) -> str:
    """One bundle key -> its detectron2 key (FPN layout unless ``c4``)."""
    resnet = "backbone" if c4 else "backbone.bottom_up"  # where the stem and res2-res4 (FPN: res5 too) live
    m = re.fullmatch(r"(?:trunk\.(conv1|bn1|layer[1-4])|box_head\.(layer4))\.(.+)", key)
    if m:
        module, rest = m[1] or m[2], "." + m[3]
        if module in ("conv1", "bn1"):
            return f"{resnet}.stem.conv1{'.norm' if module == 'bn1' else ''}{rest}"
        for pattern, replacement in _D2_BLOCK:
            rest = pattern.sub(replacement, rest)
        stage = int(module[-1])
        return f"{'roi_heads' if c4 and stage == 4 else resnet}.res{stage + 1}{rest}"
    m = re.fullmatch(r"fpn\.(lateral|output)\.p([2-5])\.(conv|norm)\.(\w+)", key)
    if m and not c4:
        kind, level, part, leaf = m.groups()
        return f"backbone.fpn_{kind}{level}{'.norm' if part == 'norm' else ''}.{leaf}"
    m = re.fullmatch(r"box_head\.convs\.(\d+)\.(conv|norm)\.(\w+)", key)
    if m and not c4:
        idx, part, leaf = m.groups()
        return f"roi_heads.box_head.conv{int(idx) + 1}{'.norm' if part == 'norm' else ''}.{leaf}"
    if key in ("box_head.fc1.weight", "box_head.fc1.bias") and not c4:
        return f"roi_heads.{key}"
    raise ConfigError(f"{key!r} has no detectron2 counterpart in the {'C4' if c4 else 'FPN'} layout" + (
        ": an FPN or 4conv box head has no place in a C4 detector. Export with c4=False, or convert a trunk-only "
        "bundle" if c4 else ""))


def export_detectron2(
    folder_or_bundle: PathLike | InsLocBackbone, out_pkl: PathLike, *, c4: bool | None = None,
) -> ConversionReport:
    """Write a backbone bundle (a bundle, or a name for :func:`from_pretrained`) as the detectron2 pickle
    of the official ``convert_pretrained.py``: ``{"model": {d2_key: numpy array}, "__author__":
    "insloc-hub", "matching_heuristics": True}``.

    FPN layout (default for FPN bundles): ``trunk`` -> ``backbone.bottom_up`` (stem, ``res2``-``res5``),
    ``fpn.lateral/output.p{i}`` -> ``backbone.fpn_lateral/output{i}``, ``box_head.convs.{j}`` / ``fc1`` ->
    ``roi_heads.box_head.conv{j+1}`` / ``fc1``. C4 layout (``c4=True``, default for C4 bundles, the
    official ``--c4``): stem and ``res2``-``res4`` under ``backbone``, res5 at ``roi_heads.res5``. BN goes
    under ``.norm``; ``num_batches_tracked`` is dropped (detectron2 has no such buffer).

    Example:
        >>> report = export_detectron2("hub/insloc-r50-fpn", "insloc_r50_fpn.pkl")  # doctest: +SKIP
        >>> report.mapped["fpn.lateral.p2.norm.weight"]  # doctest: +SKIP
        'backbone.fpn_lateral2.norm.weight'
    """
    if isinstance(folder_or_bundle, InsLocBackbone):
        bundle, source = folder_or_bundle, getattr(folder_or_bundle, "hub_folder", "<bundle>")
    else:
        bundle, source = from_pretrained(folder_or_bundle), str(folder_or_bundle)
        if not isinstance(bundle, InsLocBackbone):
            raise ConfigError(f"{source} is a fine-tuned detector; export_detectron2 takes a backbone bundle")
    cfg = bundle.config
    c4 = cfg.variant == "c4" if c4 is None else bool(c4)
    report = ConversionReport(str(source), "insloc-hub", target_format="detectron2")
    model: dict[str, np.ndarray] = OrderedDict()
    for key, value in bundle.state_dict().items():
        if key.endswith(".num_batches_tracked"):
            report.dropped[key] = NUM_BATCHES
            continue
        d2_key = _d2_key(key, c4)
        tensor = value.detach().cpu()
        model[d2_key] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
        report.mapped[key] = d2_key
    report.architecture = cfg.to_dict()
    report.notes.append("__author__ is 'insloc-hub' (the official converter writes 'Ceyuan')")
    out = Path(out_pkl)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"model": model, "__author__": "insloc-hub", "matching_heuristics": True}, f)
    os.replace(tmp, out)
    return report
