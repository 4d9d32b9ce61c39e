"""``insloc-train finetune`` and ``insloc-train eval``: detection transfer of a pretrained backbone.

Fine-tuning follows the protocol of the InsLoc / MoCo detection transfer (docs insloc-method.md
section 6): SGD (momentum 0.9, weight decay 1e-4) with a linear warmup and step decay, iteration
based, multi-scale training through the detector's own resize, SyncBN under DDP, bf16 autocast
on GPUs. The schedule presets are the published ones (:data:`PRESETS`); a preset is defined at a
total batch of 16 images and **linearly scaled** to the batch actually used (detectron2's
``auto_scale_workers``): iterations, LR steps and warmup x 16/batch, learning rate x batch/16. Every
value can be overridden by its flag.

What the pretrained folder holds (trunk, FPN, box head) goes into the detector by
:func:`insloc_hub.build_detector` (same module names, no key map); the resulting
:class:`~insloc_hub.detectors.LoadReport` is logged and written to ``RUN/load_report.json``.

Run folder layout (``--output RUN``)::

    RUN/training_args.json      resolved configuration (every flag)
    RUN/load_report.json        what was loaded from --init, what starts fresh
    RUN/metrics.jsonl           one JSON line per logged iteration and per evaluation
    RUN/checkpoint_*.pt         atomic checkpoints (``--resume auto`` continues from the newest)
    RUN/eval/                   final evaluation: metrics.json, detections.json, examples.png
    RUN/final/                  the fine-tuned detector as a hub folder (task: detection)

Python entry points: :func:`resolve_config` (flags -> :class:`FinetuneConfig`), :func:`finetune`
(runs a config, returns a :class:`FinetuneResult`) and :func:`evaluate_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from insloc_hub.configs import JsonConfig
from insloc_hub.detectors import ARCHITECTURES, build_detector, set_inference_options
from insloc_hub.errors import CheckpointError, ConfigError, InsLocError, ModelNotFoundError
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained, save_pretrained
from insloc_hub.transforms import to_tensor

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .detection_data import DetectionDataset, RandomHorizontalFlip, collate_detection, load_dataset, protocol_sizes
from .evaluation import EvalResult, run_evaluation

__all__ = [
    "PRESETS",
    "FinetuneConfig",
    "FinetuneResult",
    "Recipe",
    "TrainingDivergedError",
    "add_subcommands",
    "evaluate_model",
    "finetune",
    "lr_factor",
    "parse_sizes",
    "resolve_config",
]

logger = logging.getLogger(__name__)

REFERENCE_BATCH = 16
# fields that may change when a run is resumed (where it runs and how it reports, not what it trains)
RESUME_IGNORED = ("output", "resume", "workers", "device", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "log_every", "eval_batch_size", "val_data", "val_image_root", "num_visualize")


class TrainingDivergedError(InsLocError, FloatingPointError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A published fine-tuning schedule, defined at a total batch of ``batch_size`` images.

    ``protocol`` names the image sizes (:func:`~insloc_hub.training.detection_data.protocol_sizes`).
    """

    name: str
    description: str
    arch: str
    iterations: int
    batch_size: int
    lr: float
    steps: tuple[int, ...]
    warmup: int
    protocol: str


PRESETS: dict[str, Recipe] = {
    # MoCo's pascal_voc_R_50_C4_24k (the protocol InsLoc compares under; insloc-method.md 6.2)
    "voc07+12-c4-24k": Recipe(
        "voc07+12-c4-24k", "VOC07+12 Faster R-CNN R50-C4, 24k iterations (MoCo/InsLoc VOC protocol)",
        "faster_rcnn_c4", 24_000, 16, 0.02, (18_000, 22_000), 100, "voc"),
    # the official InsLoc detectron2 configs R_50_FPN_{1x,2x}_insloc.yaml (insloc-method.md 6.1)
    "coco-1x": Recipe(
        "coco-1x", "COCO Mask R-CNN R50-FPN 1x (90k iterations)",
        "mask_rcnn_fpn", 90_000, 16, 0.02, (60_000, 80_000), 1000, "coco"),
    "coco-2x": Recipe(
        "coco-2x", "COCO Mask R-CNN R50-FPN 2x (180k iterations)",
        "mask_rcnn_fpn", 180_000, 16, 0.02, (120_000, 160_000), 1000, "coco"),
}  # fmt: skip

#: without ``--preset``: a short schedule for small custom datasets (values are not scaled)
DEFAULT_ITERATIONS = 1000
DEFAULT_BATCH = 2


def parse_sizes(text: str | int | Sequence[int]) -> list[int]:
    """Short-side sizes: ``"800"``, ``"480,512,800"`` or ``"480-800"`` (step 32, detectron2's list)."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return [int(v) for v in text]
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-", 1))
            if low > high:
                raise ValueError
            sizes = list(range(low, high + 1, 32))
            return sizes if sizes[-1] == high else [*sizes, high]
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"cannot read sizes {text!r}: use 800, 480,512,544 or 480-800") from None
    if not sizes or min(sizes) <= 0:
        raise ConfigError(f"sizes must be positive integers, got {text!r}")
    return sizes


@dataclass
class FinetuneConfig(JsonConfig):
    """Every setting of a fine-tuning run (one field per flag); written to ``training_args.json``."""

    config_kind = "fine-tuning config"

    data: str
    output: str
    val_data: str | None = None
    image_root: str | None = None
    val_image_root: str | None = None
    init: str = "random"
    arch: str = "faster_rcnn_fpn"
    backbone: str | None = None
    preset: str | None = None
    iterations: int = DEFAULT_ITERATIONS
    batch_size: int = DEFAULT_BATCH
    lr: float = 0.02 * DEFAULT_BATCH / REFERENCE_BATCH
    steps: list[int] = field(default_factory=lambda: [667, 889])
    warmup: int = 100
    warmup_factor: float = 0.001
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    min_size: list[int] = field(default_factory=lambda: list(protocol_sizes("coco")["min_size"]))
    max_size: int = 1333
    test_size: int = 800
    norm: str = "auto"
    box_head_extra_norm: bool = False
    strict_load: bool = True
    detector_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 4
    seed: int = 0
    amp: bool | None = None
    device: str = "auto"
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_batch_size: int = 2
    num_visualize: int = 4
    resume: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_IGNORED}


def resolve_config(args: argparse.Namespace | Mapping[str, Any]) -> tuple[FinetuneConfig, list[str]]:
    """Turn flags into a :class:`FinetuneConfig`: preset, linear scaling, then explicit overrides.

    Returns the config and human-readable notes on how each schedule value was obtained.

    Raises:
        ConfigError: unknown preset or architecture, inconsistent schedule values.
    """
    a = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    get = a.get
    notes: list[str] = []
    preset_name = get("preset")
    if preset_name is not None and preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    recipe = PRESETS.get(preset_name) if preset_name else None
    arch = get("arch") or (recipe.arch if recipe else "faster_rcnn_fpn")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    batch = int(get("batch_size") or (recipe.batch_size if recipe else DEFAULT_BATCH))
    if batch < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch}")

    if recipe is not None:
        scale = recipe.batch_size / batch
        iterations = round(recipe.iterations * scale)
        steps = [round(s * scale) for s in recipe.steps]
        warmup = round(recipe.warmup * scale)
        lr = recipe.lr / scale
        notes.append(f"preset {recipe.name}: {recipe.description}")
        if scale != 1:
            notes.append(
                f"linear scaling rule, batch {recipe.batch_size} -> {batch}: iterations {recipe.iterations} -> "
                f"{iterations}, steps {list(recipe.steps)} -> {steps}, warmup {recipe.warmup} -> {warmup}, "
                f"lr {recipe.lr} -> {lr:g}"
            )
        sizes = protocol_sizes(recipe.protocol)
    else:
        iterations, lr = DEFAULT_ITERATIONS, 0.02 * batch / REFERENCE_BATCH
        steps = [round(iterations * 2 / 3), round(iterations * 8 / 9)]
        warmup = 100
        sizes = protocol_sizes("coco")
        notes.append(f"no preset: {iterations} iterations, lr 0.02 x {batch}/{REFERENCE_BATCH} = {lr:g}")

    if get("iterations") is not None:
        new = int(get("iterations"))
        if new < 1:
            raise ConfigError(f"--iterations must be at least 1, got {new}")
        if get("steps") is None:  # keep the decays at the same fractions of the schedule
            steps = [round(s * new / iterations) for s in steps]
            notes.append(f"--iterations {new}: LR steps moved to the same fractions of the schedule: {steps}")
        iterations = new
    if get("steps") is not None:
        steps = [int(s) for s in (get("steps").split(",") if isinstance(get("steps"), str) else get("steps"))
                 if str(s).strip()]
    if get("warmup") is not None:
        warmup = int(get("warmup"))
    warmup = min(warmup, iterations)
    if get("lr") is not None:
        lr = float(get("lr"))
    if sorted(steps) != steps or any(s < 0 for s in steps):
        raise ConfigError(f"--steps must be increasing non-negative iterations, got {steps}")
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"--lr must be positive, got {lr}")

    min_size = parse_sizes(get("min_size")) if get("min_size") is not None else list(sizes["min_size"])
    max_size = int(get("max_size") or sizes["max_size"])
    test_size = int(get("test_size") or (max(min_size) if get("min_size") is not None else sizes["test_size"]))
    norm = get("norm") or "auto"
    if norm not in ("auto", "bn", "sync", "frozen"):
        raise ConfigError(f"unknown --norm {norm!r}; choose auto, bn, sync or frozen")

    options = dict(get("detector_options") or {})
    for item in get("detector_opt") or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"--detector-opt expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    reserved = {"min_size", "max_size", "num_classes"} & set(options)
    if reserved:
        raise ConfigError(f"--detector-opt {sorted(reserved)}: use --min-size / --max-size instead")

    cfg = FinetuneConfig(
        data=str(get("data")), output=str(get("output")), val_data=get("val_data"),
        image_root=get("image_root"), val_image_root=get("val_image_root"),
        init=str(get("init") or "random"), arch=arch, backbone=get("backbone"), preset=preset_name,
        iterations=iterations, batch_size=batch, lr=lr, steps=steps, warmup=warmup,
        min_size=min_size, max_size=max_size, test_size=test_size, norm=norm,
        box_head_extra_norm=bool(get("box_head_extra_norm")), strict_load=not get("allow_partial_load"),
        detector_options=options,
        workers=int(get("workers") if get("workers") is not None else 4), seed=int(get("seed") or 0),
        amp=get("amp"), device=str(get("device") or "auto"),
        eval_every=int(get("eval_every") or 0), checkpoint_every=int(get("checkpoint_every") or 0),
        keep_checkpoints=int(get("keep_checkpoints") if get("keep_checkpoints") is not None else 2),
        log_every=int(get("log_every") or 20), eval_batch_size=int(get("eval_batch_size") or 2),
        num_visualize=int(get("num_visualize") if get("num_visualize") is not None else 4),
        resume=get("resume"),
    )
    if cfg.checkpoint_every <= 0:
        cfg.checkpoint_every = max(100, iterations // 10)
    return cfg, notes


def lr_factor(iteration: int, steps: Sequence[int], warmup: int, warmup_factor: float = 0.001,
              gamma: float = 0.1) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based): detectron2's WarmupMultiStepLR.

    Linear warmup from ``warmup_factor`` to 1 over ``warmup`` iterations, times ``gamma`` per step
    already passed.
    """
    factor = gamma ** sum(1 for s in steps if iteration >= s)
    if iteration < warmup:
        alpha = iteration / warmup
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class InfiniteSampler(Sampler[int]):
    """Endless shuffled indices, a new permutation per pass, each rank taking every world-th one.

    Deterministic given ``seed``; ``start`` skips that many of this rank's indices, so a resumed
    run sees the stream it would have seen (detectron2's ``TrainingSampler``).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if size <= 0:
            raise ConfigError("the training set is empty")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def _global(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip = self.rank + self.start * self.world_size
        for position, index in enumerate(self._global()):
            if position >= skip and (position - self.rank) % self.world_size == 0:
                yield index


class COCOMasks:
    """Instance masks for a COCO dataset's training targets, rasterised from its ``segmentation``.

    Each target box gets the mask of the annotation of the same class that overlaps it best (the
    loader cleans boxes, so they are matched rather than indexed). An annotation without a
    segmentation gets its box as mask (counted and logged).

    Raises:
        ConfigError: the dataset is not COCO, or no annotation has a segmentation.
    """

    def __init__(self, dataset: DetectionDataset) -> None:
        if dataset.report.format != "coco":
            raise ConfigError(
                f"mask_rcnn_fpn needs instance masks, but {dataset.source} is a {dataset.report.format or 'box'} "
                "dataset with boxes only. Use a box architecture (--arch faster_rcnn_fpn) or a COCO json with "
                "'segmentation' polygons."
            )
        data = json.loads(Path(dataset.report.source).read_text(encoding="utf-8"))
        label_of = {cid: label for label, cid in enumerate(dataset.category_ids, start=1)}
        self.by_image: dict[int, list[tuple[int, np.ndarray, Any]]] = {}
        with_segm = without = 0
        for ann in data.get("annotations") or []:
            if not isinstance(ann, dict) or ann.get("iscrowd") or ann.get("category_id") not in label_of:
                continue
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                continue
            segm = ann.get("segmentation")
            if segm:
                with_segm += 1
            else:
                without += 1
                segm = None
            self.by_image.setdefault(ann.get("image_id"), []).append(
                (label_of[ann["category_id"]], np.array([x, y, x + w, y + h], dtype=np.float64), segm))
        if with_segm == 0:
            raise ConfigError(
                f"mask_rcnn_fpn needs instance masks, but none of the {without} annotations of {dataset.source} "
                "has a 'segmentation'. Use --arch faster_rcnn_fpn, or add polygons to the annotations."
            )
        if without:
            logger.warning("%d of %d annotations have no segmentation; their boxes are used as masks",
                           without, without + with_segm)

    def __call__(self, image_id: int, width: int, height: int, boxes: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, H, W]`` masks for the target's ``boxes`` (x1, y1, x2, y2) and ``labels``."""
        from pycocotools import mask as mask_utils

        candidates = self.by_image.get(image_id, [])
        masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8)
        for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
            best, best_iou = None, 0.0
            for cand_label, cand_box, segm in candidates:
                if cand_label != label:
                    continue
                iou = _iou(np.asarray(box), cand_box)
                if iou > best_iou:
                    best, best_iou = segm, iou
            if best is not None and best_iou >= 0.5:
                rles = mask_utils.frPyObjects(best, height, width)
                rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, harmless
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = mask_utils.decode([rle])[:, :, 0]
                masks[i] = torch.from_numpy(decoded.astype(np.uint8))
            else:
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                masks[i, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = 1
        return masks


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class TrainingSet(Dataset):
    """A :class:`DetectionDataset` for training: horizontal flip (p=0.5), masks when asked for."""

    def __init__(self, dataset: DetectionDataset, masks: COCOMasks | None = None, flip: float = 0.5) -> None:
        self.dataset, self.masks, self.flip = dataset, masks, float(flip)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = to_tensor(self.dataset.load_image(index))
        target = self.dataset.get_target(index)
        if self.masks is not None:
            height, width = image.shape[-2:]
            target["masks"] = self.masks(target["image_id"], width, height, target["boxes"], target["labels"])
        if torch.rand(()).item() < self.flip:
            image, target = RandomHorizontalFlip(1.0)(image, target)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def _load(spec: str, image_root: str | None, **kwargs: Any) -> DetectionDataset:
    if image_root is not None and str(spec).lower().endswith(".json"):
        kwargs["image_root"] = image_root
    return load_dataset(spec, **kwargs)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def load_init(name: str) -> InsLocBackbone | None:
    """The backbone bundle named by ``--init`` (``None`` for ``random``).

    Raises:
        ModelNotFoundError: the name resolves to nothing (message from the hub resolver).
        ConfigError: it names a fine-tuned detector rather than a backbone.
    """
    if name == "random":
        return None
    try:
        loaded = from_pretrained(name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"--init {name!r}: {exc}") from exc
    if not isinstance(loaded, InsLocBackbone):
        raise ConfigError(
            f"--init {name!r} is a fine-tuned detector (task: detection), not a pretrained backbone. "
            "Fine-tune from a backbone folder or alias, or evaluate it with insloc-train eval."
        )
    return loaded


def build_model(cfg: FinetuneConfig, class_names: Sequence[str], norm: str) -> tuple[nn.Module, dict[str, Any]]:
    """The detector to fine-tune and its load report as a JSON-ready dict."""
    bundle = load_init(cfg.init)
    options = {"min_size": tuple(cfg.min_size), "max_size": cfg.max_size, **cfg.detector_options}
    model = build_detector(
        cfg.arch, class_names=list(class_names), backbone=cfg.backbone, pretrained=bundle, norm=norm,
        strict=cfg.strict_load, box_head_extra_norm=cfg.box_head_extra_norm, **options,
    )
    if bundle is None:
        keys = sorted(model.state_dict())
        report: dict[str, Any] = {
            "init": "random", "summary": f"random initialisation: nothing loaded, {len(keys)} new tensors",
            "loaded": [], "new": keys, "ignored": {},
        }
    else:
        load = model.load_report
        report = {"init": cfg.init, "source": str(getattr(bundle, "hub_folder", cfg.init)),
                  "pretrained_parts": list(bundle.config.parts), "summary": load.summary(), **load.to_dict()}
    return model, report


def _move_target(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced."""

    run_dir: Path
    final_dir: Path | None
    iterations: int
    seconds: float
    metrics: EvalResult | None = None
    load_report: dict[str, Any] = field(default_factory=dict)


def _metrics_for_card(result: EvalResult) -> dict[str, float]:
    values = {"AP": result.ap, "AP50": result.ap50, "AP75": result.ap75, "APs": result.ap_small,
              "APm": result.ap_medium, "APl": result.ap_large}
    return {k: round(100 * v, 2) for k, v in values.items() if v >= 0}


class _JsonLog:
    """Append-only JSON lines (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record)) + "\n")


def _evaluate(model: nn.Module, dataset: DetectionDataset, cfg: FinetuneConfig, device: torch.device,
              output_dir: Path | None) -> EvalResult:
    """Evaluate at the test size (``min_size`` = ``test_size``), restoring the training sizes after."""
    transform = model.transform
    train_sizes = transform.min_size
    transform.min_size = (cfg.test_size,)
    try:
        return run_evaluation(model, dataset, device=device, batch_size=cfg.eval_batch_size,
                              output_dir=output_dir, num_visualize=cfg.num_visualize if output_dir else 0)
    finally:
        transform.min_size = train_sizes


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a detector as configured; see the module docstring for what is written where.

    Works in one process (CPU or one GPU) and under ``torchrun`` / SLURM (one process per GPU,
    DDP, SyncBN); only rank 0 writes files.

    Raises:
        DatasetError: missing data or no usable image.
        ModelNotFoundError / ConfigError: bad ``--init``, architecture or values.
        CheckpointError: checkpoints of another configuration, or checkpoints present without
            ``--resume``.
        TrainingDivergedError: the loss became NaN or infinite.
    """
    start_time = time.perf_counter()
    info = dist_utils.init_distributed(cfg.device)
    device, world, rank = info.device, info.world_size, info.rank
    try:
        return _finetune(cfg, info, device, world, rank, start_time)
    finally:
        dist_utils.cleanup()


def _finetune(cfg: FinetuneConfig, info: dist_utils.DistInfo, device: torch.device, world: int, rank: int,
              start_time: float) -> FinetuneResult:
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    if amp and device.type != "cuda":
        logger.warning("--amp uses bf16 autocast on CUDA only; running in float32 on %s", device)
        amp = False
    if amp and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bf16 support; running in float32")
        amp = False
    norm = cfg.norm
    if norm == "auto":
        norm = "sync" if world > 1 else "bn"
    if norm == "sync" and device.type != "cuda":
        logger.warning("SyncBatchNorm needs CUDA; using plain BatchNorm on %s", device)
        norm = "bn"

    run_dir = Path(cfg.output)
    main = info.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = _JsonLog(run_dir / "metrics.jsonl", main)

    # --- checkpoint to resume from (decided before any file of the run is written) ---
    resume_path: Path | None = None
    if cfg.resume in (None, "", "none"):
        existing = ckpt.list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); pass --resume auto to "
                "continue that run, or choose another --output"
            )
    elif cfg.resume == "auto":
        resume_path = ckpt.find_latest(run_dir)
        if resume_path is None:
            logger.info("--resume auto: no checkpoint in %s, starting from iteration 0", run_dir)
    else:
        resume_path = Path(cfg.resume)

    # --- data ---
    train_set = _load(cfg.data, cfg.image_root)
    val_set = None
    if cfg.val_data:
        val_set = _load(cfg.val_data, cfg.val_image_root, class_names=train_set.class_names)
    masks = COCOMasks(train_set) if cfg.arch == "mask_rcnn_fpn" else None

    # --- model ---
    _seed_everything(cfg.seed)
    model, report = build_model(cfg, train_set.class_names, norm)
    model.to(device)
    if main:
        logger.info("init %s: %s", cfg.init, report["summary"])
        (run_dir / "load_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (run_dir / "training_args.json").write_text(
            json.dumps({**cfg.to_dict(), "world_size": world, "norm_used": norm, "amp_used": amp,
                        "device_used": str(device)}, indent=2) + "\n", encoding="utf-8")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    start_iter = 0
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path)
        ckpt.check_config(state.get("config", {}), cfg.fingerprint(), source=resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_iter = int(state["iteration"])
        if "rng" in state:
            ckpt.restore_rng_state(state["rng"])
        if rank:
            _seed_everything(cfg.seed + 1000 * rank + start_iter)
        logger.info("resumed from %s at iteration %d of %d", resume_path, start_iter, cfg.iterations)
    elif rank:
        _seed_everything(cfg.seed + 1000 * rank)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = DataLoader(
        TrainingSet(train_set, masks), batch_size=per_rank,
        sampler=InfiniteSampler(len(train_set), seed=cfg.seed, rank=rank, world_size=world,
                                start=start_iter * per_rank),
        num_workers=cfg.workers, collate_fn=collate_detection, drop_last=True, worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(cfg.seed + 1000 * rank + 7919 * start_iter),
        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
    )
    if main:
        logger.info("fine-tuning %s on %s (%d images, classes %s): %d iterations, batch %d (%d per process x %d), "
                    "lr %g, steps %s, warmup %d, sizes %s/%d (test %d), norm %s, amp %s, device %s",
                    cfg.arch, train_set.source, len(train_set), train_set.class_names, cfg.iterations,
                    cfg.batch_size, per_rank, world, cfg.lr, cfg.steps, cfg.warmup, cfg.min_size, cfg.max_size,
                    cfg.test_size, norm, amp, device)

    def save(iteration: int) -> None:
        if main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                     "config": cfg.fingerprint(), "rng": ckpt.capture_rng_state()}
            ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, iteration), state)
            ckpt.prune_checkpoints(run_dir, cfg.keep_checkpoints)
        dist_utils.barrier()

    train_model.train()
    data_iter = iter(loader)
    window_start, window_iters = time.perf_counter(), 0
    iteration = start_iter
    while iteration < cfg.iterations:
        images, targets = next(data_iter)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [_move_target(t, device) for t in targets]
        lr = cfg.lr * lr_factor(iteration, cfg.steps, cfg.warmup, cfg.warmup_factor, cfg.gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss_dict = train_model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the loss is {loss.item()} at iteration {iteration} "
                f"({ {k: round(float(v), 4) for k, v in loss_dict.items()} }); lower --lr or raise --warmup"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        window_iters += 1

        if iteration % cfg.log_every == 0 or iteration == cfg.iterations or iteration == start_iter + 1:
            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            seconds = (time.perf_counter() - window_start) / window_iters
            window_start, window_iters = time.perf_counter(), 0
            eta = seconds * (cfg.iterations - iteration)
            record = {"iteration": iteration, "loss": float(loss.detach()), **values, "lr": lr, "sec_per_iter": seconds}
            log.write(record)
            if main:
                parts = " ".join(f"{k} {v:.3f}" for k, v in values.items())
                logger.info("iter %d/%d loss %.3f (%s) lr %.5f %.2f s/it eta %s", iteration, cfg.iterations,
                            float(loss.detach()), parts, lr, seconds, _duration(eta))
        if iteration % cfg.checkpoint_every == 0 and iteration < cfg.iterations:
            save(iteration)
        if val_set is not None and cfg.eval_every and iteration % cfg.eval_every == 0 and iteration < cfg.iterations:
            if main:
                result = _evaluate(model, val_set, cfg, device, None)
                log.write({"iteration": iteration, "eval": _metrics_for_card(result)})
            dist_utils.barrier()
            train_model.train()
    del data_iter
    if start_iter < cfg.iterations or not ckpt.list_checkpoints(run_dir):
        save(cfg.iterations)

    # --- final evaluation and the hub folder (rank 0) ---
    result = None
    final_dir = None
    if main:
        if val_set is not None:
            result = _evaluate(model, val_set, cfg, device, run_dir / "eval")
            log.write({"iteration": cfg.iterations, "eval": _metrics_for_card(result), "final": True})
        else:
            logger.warning("no --val-data: the final model is saved without evaluation results")
        final_dir = _save_final(model, cfg, run_dir, train_set, val_set, result, norm, world, amp)
        logger.info("fine-tuned detector written to %s", final_dir)
    dist_utils.barrier()
    return FinetuneResult(run_dir, final_dir, cfg.iterations, time.perf_counter() - start_time, result, report)


def _save_final(model: nn.Module, cfg: FinetuneConfig, run_dir: Path, train_set: DetectionDataset,
                val_set: DetectionDataset | None, result: EvalResult | None, norm: str, world: int,
                amp: bool) -> Path:
    """Write RUN/final: the detector, set up for inference at the test size, with BatchNorm as BN."""
    set_inference_options(model, min_size=cfg.test_size, max_size=cfg.max_size)  # training is over
    results = []
    if result is not None and val_set is not None:
        results.append({"dataset": _dataset_name(cfg.val_data or val_set.source), "metrics": _metrics_for_card(result)})
    provenance = {
        "recipe": f"insloc-train finetune ({cfg.preset or 'custom schedule'})",
        "init": cfg.init, "arch": cfg.arch, "data": _dataset_name(cfg.data), "train_images": len(train_set),
        "iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr, "steps": cfg.steps,
        "min_size": cfg.min_size, "test_size": cfg.test_size, "norm": norm, "amp": amp, "world_size": world,
        "seed": cfg.seed,
    }
    extra = {name: run_dir / name for name in ("training_args.json", "load_report.json", "metrics.jsonl")
             if (run_dir / name).is_file()}
    final_dir = run_dir / "final"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    save_pretrained(model, final_dir, name=Path(cfg.output).name, provenance=provenance, results=results,
                    extra_files=extra)
    return final_dir


def _dataset_name(spec: str) -> str:
    path = Path(spec)
    return f"{path.parent.name}/{path.name}" if path.suffix else path.name


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved detector
# ----------------------------------------------------------------------------------------------


def evaluate_model(model_name: str, data: str, *, output: str | os.PathLike[str] | None = None,
                   device: str = "auto", batch_size: int = 2, image_root: str | None = None,
                   score_threshold: float = 0.0, num_visualize: int = 4) -> EvalResult:
    """Evaluate a fine-tuned detector (hub name, alias or folder) on a dataset, COCO-style.

    The dataset is read with the detector's class names, so labels agree. Writes
    ``detections.json``, ``metrics.json`` and ``examples.png`` to ``output`` when given.

    Raises:
        ConfigError: the model is a backbone, not a detector.
        DatasetError: missing data or no usable image.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
    try:
        model = from_pretrained(model_name, device=dev)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"model {model_name!r}: {exc}") from exc
    if isinstance(model, InsLocBackbone):
        raise ConfigError(
            f"{model_name!r} is a pretrained backbone, not a detector: fine-tune it first "
            "(insloc-train finetune --init ...), then evaluate RUN/final"
        )
    class_names = model.hub_config.get("class_names")
    dataset = _load(data, image_root, **({"class_names": class_names} if class_names else {}))
    return run_evaluation(model, dataset, device=dev, batch_size=batch_size, score_threshold=score_threshold,
                          output_dir=output, num_visualize=num_visualize)


def format_metrics_table(result: EvalResult) -> str:
    """A small markdown table of the COCO metrics (percent), then AP / AP50 per class."""

    def pct(value: float) -> str:
        return "n/a" if value is None or value < 0 or math.isnan(value) else f"{100 * value:.1f}"

    head = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    values = [result.ap, result.ap50, result.ap75, result.ap_small, result.ap_medium, result.ap_large]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join(pct(v) for v in values) + " |"]
    if result.per_class_ap:
        lines += ["", "| class | AP | AP50 |", "|---|---|---|"]
        lines += [f"| {name} | {pct(ap)} | {pct(result.per_class_ap50.get(name, math.nan))} |"
                  for name, ap in result.per_class_ap.items()]
    lines.append(f"\n{result.num_images} images, {result.num_ground_truth} boxes, {result.num_detections} detections")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _run_finetune(args: argparse.Namespace) -> int:
    cfg, notes = resolve_config(args)
    if dist_utils.detect_launch_env().rank == 0:
        for note in notes:
            print(note)
    result = finetune(cfg)
    if result.final_dir is not None:
        print(f"fine-tuned detector: {result.final_dir} ({result.iterations} iterations, {result.seconds:.0f} s)")
        if result.metrics is not None:
            print(format_metrics_table(result.metrics))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    result = evaluate_model(args.model, args.data, output=args.output, device=args.device,
                            batch_size=args.batch_size, image_root=args.image_root,
                            score_threshold=args.score_threshold, num_visualize=args.num_visualize)
    print(format_metrics_table(result))
    if args.output:
        print(f"detections.json, metrics.json and examples.png written to {args.output}")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Add ``finetune`` and ``eval`` to the ``insloc-train`` dispatcher."""
    presets = "; ".join(f"{r.name}: {r.description}" for r in PRESETS.values())
    p = subparsers.add_parser(
        "finetune", help="fine-tune a detector from a pretrained backbone (or random init)",
        description="Fine-tune a torchvision detector initialised from an InsLoc / MoCo / supervised hub folder. "
                    "Presets are defined at batch 16 and linearly scaled to --batch-size; every value can be "
                    f"overridden. Presets: {presets}. Multi-GPU: torchrun --nproc-per-node N $(which insloc-train) "
                    "finetune ...",
    )
    p.add_argument("--data", required=True, help="training set: VOC folder, VOC split list .txt, or COCO .json")
    p.add_argument("--val-data", help="evaluation set (same forms); evaluated at the end (and every --eval-every)")
    p.add_argument("--image-root", help="image folder of a COCO --data json (default: guessed)")
    p.add_argument("--val-image-root", help="image folder of a COCO --val-data json")
    p.add_argument("--output", required=True, help="run folder (checkpoints, logs, final/ hub folder)")
    p.add_argument("--init", default="random",
                   help="pretrained backbone: hub alias, owner/repo[@rev] or local folder; 'random' for none")
    p.add_argument("--arch", choices=ARCHITECTURES, help="detector (default: the preset's, else faster_rcnn_fpn)")
    p.add_argument("--backbone", help="architecture for --init random (tiny-fpn, r18-fpn, r50-fpn, r50-c4...); "
                                      "a pretrained --init brings its own")
    p.add_argument("--preset", help=f"published schedule: {', '.join(PRESETS)}")
    p.add_argument("--iterations", type=int, help="total iterations (after scaling)")
    p.add_argument("--batch-size", type=int, help="total images per iteration, all processes together")
    p.add_argument("--lr", type=float, help="base learning rate (default: 0.02 x batch/16)")
    p.add_argument("--steps", help="iterations where the LR is divided by 10, comma-separated")
    p.add_argument("--warmup", type=int, help="linear warmup iterations")
    p.add_argument("--min-size", help="training short side(s): 800, 480,512 or 480-800 (step 32)")
    p.add_argument("--max-size", type=int, help="longest side limit")
    p.add_argument("--test-size", type=int, help="short side for evaluation and for the saved detector")
    p.add_argument("--norm", choices=("auto", "bn", "sync", "frozen"), default="auto",
                   help="auto = SyncBN with several GPUs, else BN; frozen = FrozenBN in the pretrained parts")
    p.add_argument("--box-head-extra-norm", action="store_true",
                   help="new BatchNorm in the RoI head: after the 4conv1fc head's fc (the official InsLoc "
                        "fine-tuning head) or after res5 for C4 (MoCo's Res5ROIHeadsExtraNorm)")
    p.add_argument("--allow-partial-load", action="store_true",
                   help="skip pretrained tensors that do not fit instead of failing (listed in load_report.json)")
    p.add_argument("--detector-opt", action="append", metavar="KEY=VALUE",
                   help="torchvision detector argument, e.g. rpn_post_nms_top_n_train=1000 (repeatable)")
    p.add_argument("--workers", type=int, default=4, help="data loader processes per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on --val-data every N iterations")
    p.add_argument("--checkpoint-every", type=int, default=0, help="default: a tenth of the run (at least 100)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-batch-size", type=int, default=2)
    p.add_argument("--resume", help="'auto' (newest checkpoint of --output, if any) or a checkpoint file")
    p.set_defaults(func=_run_finetune)

    e = subparsers.add_parser(
        "eval", help="COCO-style evaluation of a fine-tuned detector",
        description="AP, AP50, AP75, APs/m/l and per-class AP of a detector hub folder on a dataset; writes "
                    "detections.json (COCO results), metrics.json and examples.png to --output.",
    )
    e.add_argument("model", help="detector: hub alias, owner/repo[@rev] or folder (e.g. RUN/final)")
    e.add_argument("--data", required=True, help="VOC folder, VOC split list .txt, or COCO .json")
    e.add_argument("--image-root", help="image folder of a COCO json (default: guessed)")
    e.add_argument("--output", help="folder for detections.json, metrics.json, examples.png")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--score-threshold", type=float, default=0.0)
    e.add_argument("--num-visualize", type=int, default=4, help="images drawn into examples.png")
    e.set_defaults(func=_run_eval)
