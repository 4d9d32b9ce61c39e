"""``insloc-train finetune`` and ``insloc-train eval``: detection transfer of a pretrained backbone.

Fine-tuning follows the protocol of the InsLoc / MoCo detection transfer (docs insloc-method.md
section 6): SGD (momentum 0.9, weight decay 1e-4) with a linear warmup and step decay, iteration
based, multi-scale training through the detector's own resize, SyncBN under DDP, bf16 autocast
on GPUs. The schedules (``--recipe``) are the published ones (:data:`RECIPES`); a recipe is defined at
a total batch of 16 images and **linearly scaled** to the batch actually used (detectron2's
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
import dataclasses
import datetime
import itertools
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from insloc_hub.configs import JsonConfig, add_config_flags, device_name, flag, int_at_least, output_folder, probability
from insloc_hub.detectors import ARCHITECTURES, build_detector, set_inference_options
from insloc_hub.errors import CheckpointError, ConfigError, InsLocError, ModelNotFoundError
from insloc_hub.models import PRESETS as ARCH_PRESETS
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained, save_pretrained
from insloc_hub.training.runtime import checkpoint as ckpt
from insloc_hub.training.runtime import distributed as dist_utils
from insloc_hub.training.runtime import run as run_lib
from insloc_hub.training.runtime.run import MetricsWriter, StepTimer, seed_everything
from insloc_hub.training.transfer.detection_data import (
    DetectionDataset,
    TrainingSet,
    collate_detection,
    load_dataset,
    protocol_sizes,
)
from insloc_hub.training.transfer.evaluation import STAT_NAMES, EvalResult, run_evaluation

__all__ = ["RECIPES", "FinetuneConfig", "FinetuneResult", "Recipe", "TrainingDivergedError", "add_subcommands",
           "evaluate_model", "finetune", "lr_factor", "parse_sizes", "resolve_config"]

logger = logging.getLogger(__name__)

REFERENCE_BATCH = 16
# fields that may change when a run is resumed (where it runs and how it reports, not what it trains)
RESUME_IGNORED = ("output", "resume", "workers", "device", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "log_every", "eval_batch_size", "val_data", "val_image_root", "num_visualize", "unknown_classes")


class TrainingDivergedError(InsLocError, FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Recipe:
    """A published fine-tuning schedule, defined at a total batch of ``batch_size`` images.

    ``protocol`` names the image sizes (:func:`~insloc_hub.training.transfer.detection_data.protocol_sizes`).
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


RECIPES: dict[str, Recipe] = {
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

#: without ``--recipe``: a short schedule for small custom datasets (values are not scaled)
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


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _parse_classes(value: str | Sequence[str] | None) -> list[str] | None:
    """``"cat,dog"`` (or a list) -> ``["cat", "dog"]``; ConfigError on empty or repeated names."""
    if value is None:
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if not names or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"--classes must be distinct, non-empty comma-separated names, got {value!r}")
    return names


@dataclass
class FinetuneConfig(JsonConfig):
    """Every setting of a fine-tuning run, one flag per field; written to ``training_args.json``.

    Schedule fields left unset (``None`` from the command line) come from :func:`resolve_config`.
    """

    config_kind = "fine-tuning config"

    data: str = flag(help="training set: VOC folder, VOC split list .txt, or COCO .json")
    output: str = flag(help="run folder (checkpoints, logs, final/ hub folder)", parse=output_folder)
    val_data: str | None = flag(None, help="evaluation set (same forms); evaluated at the end and every --eval-every")
    image_root: str | None = flag(None, help="image folder of a COCO --data json (default: guessed)")
    val_image_root: str | None = flag(None, help="image folder of a COCO --val-data json")
    init: str = flag("random", help="pretrained backbone: hub alias, owner/repo[@rev] or local folder; 'random' "
                                    "for none")
    arch: str = flag("faster_rcnn_fpn", help="detector architecture; a --recipe brings its own", choices=ARCHITECTURES)
    # a schedule name is still accepted here for one release (deprecated: the old meaning of --preset)
    preset: str | None = flag(None, help="architecture preset (tiny-fpn, r50-fpn, ...) for --init random; a "
                                         "pretrained --init brings its own", choices=[*sorted(ARCH_PRESETS), *RECIPES])
    recipe: str | None = flag(None, help="published schedule, defined at batch 16 and scaled to --batch-size",
                              choices=list(RECIPES))
    iterations: int = flag(DEFAULT_ITERATIONS, help="total iterations (after scaling)", min=1)
    batch_size: int = flag(DEFAULT_BATCH, help="total images per iteration, all processes together", min=1)
    lr: float = flag(0.02 * DEFAULT_BATCH / REFERENCE_BATCH, help="base learning rate (0.02 x batch/16)", above=0)
    steps: list[int] = flag(default_factory=lambda: [667, 889], parse=_int_list, min=0,
                            help="iterations where the LR is multiplied by --gamma, comma-separated")
    warmup: int = flag(100, help="linear warmup iterations", min=0)
    warmup_factor: float = flag(0.001, help="LR factor at the start of the warmup", above=0, max=1)
    gamma: float = flag(0.1, help="LR factor at each step", above=0)
    momentum: float = flag(0.9, help="SGD momentum", min=0, max=1)
    weight_decay: float = flag(1e-4, help="SGD weight decay", min=0)
    min_size: list[int] = flag(default_factory=lambda: list(protocol_sizes("coco")["min_size"]), parse=parse_sizes,
                               help="training short side(s): 800, 480,512 or 480-800 (step 32)", min=1)
    max_size: int = flag(1333, help="longest side limit", min=1)
    test_size: int = flag(800, help="short side for evaluation and for the saved detector", min=1)
    norm: str = flag("auto", help="auto = SyncBN with several GPUs, else BN; frozen = FrozenBN in the pretrained "
                                  "parts", choices=("auto", "bn", "sync", "frozen"))
    box_head_extra_norm: bool = flag(False, help="new BatchNorm in the RoI head: after the 4conv1fc head's fc (the "
                                                 "official InsLoc head) or after res5 for C4 (Res5ROIHeadsExtraNorm)")
    reinit: list[str] = flag(default_factory=list, parse=lambda text: [n.strip() for n in text.split(",")],
                             help="pretrained layers to leave at their fresh init, comma-separated bundle names "
                                  "(box_head.fc1, box_head, fpn...); listed in load_report.json")
    strict_load: bool = flag(True, help="fail when a pretrained tensor does not fit (--no-strict-load loads what "
                                        "fits and lists the rest in load_report.json)")
    detector_options: dict[str, Any] = field(default_factory=dict)
    workers: int = flag(4, help="data loader processes per GPU", min=0)
    seed: int = flag(0, help="random seed", min=0)
    amp: bool | None = flag(None, help="bf16 autocast (default: on with CUDA)")
    device: str = flag("auto", help="auto, cpu, cuda, cuda:N", parse=device_name)
    eval_every: int = flag(0, help="evaluate on --val-data every N iterations (0: at the end only)", min=0)
    checkpoint_every: int = flag(0, help="checkpoint every N iterations (0: a tenth of the run, at least 100)",
                                 min=0)
    keep_checkpoints: int = flag(2, help="how many checkpoints to keep (0: all)", min=0)
    log_every: int = flag(20, help="log every N iterations", min=1)
    eval_batch_size: int = flag(2, help="images per evaluation batch", min=1)
    num_visualize: int = flag(4, help="images drawn into eval/examples.png", min=0)
    resume: str | None = flag(None, help="'auto' (newest usable checkpoint of --output, if any), a run folder, or a "
                                         "checkpoint file")
    classes: list[str] | None = flag(None, parse=_parse_classes,
                                     help="the class list in label order, comma-separated (default: every name "
                                          "found in the training data); other names are reported")
    unknown_classes: str = flag("drop", choices=("drop", "error"),
                                help="objects whose class is not in --classes: drop them (counted in "
                                     "data_report.json) or stop with an error naming them")

    def __post_init__(self) -> None:
        if self.preset in RECIPES:
            raise ConfigError(f"preset {self.preset!r} is a schedule: pass recipe={self.preset!r} (preset names the "
                              "architecture now, e.g. tiny-fpn)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        return super().from_dict(renamed_fields(data))

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint it continues."""
        fields = {k: v for k, v in self.to_dict().items() if k not in RESUME_IGNORED}
        for name in ("classes", "reinit"):  # absent from checkpoints written before these flags existed
            if not fields.get(name):
                fields.pop(name, None)
        return fields


def renamed_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config written before the rename (``backbone``: the architecture preset, ``preset``: the schedule)
    in today's names (``preset``, ``recipe``); newer configs come back unchanged."""
    values = dict(values)
    if "backbone" in values and "recipe" not in values:
        values["recipe"] = values.pop("preset", None)
        values["preset"] = values.pop("backbone")
    return values


def _deprecated_names(a: dict[str, Any], notes: list[str]) -> None:
    """``--backbone X`` -> ``--preset X``; ``--preset <schedule>`` -> ``--recipe <schedule>`` (one release)."""
    backbone = a.pop("backbone", None)
    if a.get("preset") in RECIPES:
        if a.get("recipe") not in (None, a["preset"]):
            raise ConfigError(f"--preset {a['preset']} (a schedule, deprecated) and --recipe {a['recipe']} disagree")
        a["recipe"] = a.pop("preset")
        notes.append(f"warning: --preset {a['recipe']} names a schedule, which is deprecated: use --recipe "
                     f"{a['recipe']}")
    if backbone is not None:
        if a.get("preset") not in (None, backbone):
            raise ConfigError(f"--backbone {backbone} (deprecated) and --preset {a['preset']} disagree; pass --preset")
        a["preset"] = backbone
        notes.append(f"warning: --backbone is deprecated: use --preset {backbone}")
    for note in notes:
        warnings.warn(note.removeprefix("warning: "), DeprecationWarning, stacklevel=3)


def resolve_config(args: argparse.Namespace | Mapping[str, Any]) -> tuple[FinetuneConfig, list[str]]:
    """Turn flags into a :class:`FinetuneConfig`: recipe, linear scaling, then explicit overrides.

    Returns the config and human-readable notes on how each schedule value was obtained.

    Raises:
        ConfigError: unknown recipe or architecture, inconsistent schedule values.
    """
    a = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    get = a.get
    notes: list[str] = []
    _deprecated_names(a, notes)

    def given(name: str, default: Any) -> Any:
        """The explicit value of flag ``name``, else ``default``."""
        return a[name] if a.get(name) is not None else default

    recipe_name = get("recipe")
    if recipe_name is not None and recipe_name not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe_name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES.get(recipe_name) if recipe_name else None
    arch = get("arch") or (recipe.arch if recipe else "faster_rcnn_fpn")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    batch = int(given("batch_size", recipe.batch_size if recipe else DEFAULT_BATCH))
    if batch < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch}")

    if recipe is not None:
        scale = recipe.batch_size / batch
        iterations = round(recipe.iterations * scale)
        steps = [round(s * scale) for s in recipe.steps]
        warmup = round(recipe.warmup * scale)
        lr = recipe.lr / scale
        notes.append(f"recipe {recipe.name}: {recipe.description}")
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
        notes.append(f"no recipe: {iterations} iterations, lr 0.02 x {batch}/{REFERENCE_BATCH} = {lr:g}")

    if get("iterations") is not None:
        new = int(get("iterations"))
        if get("steps") is None:  # keep the decays at the same fractions of the schedule
            steps = [round(s * new / iterations) for s in steps]
            notes.append(f"--iterations {new}: LR steps moved to the same fractions of the schedule: {steps}")
        iterations = new
    if get("steps") is not None:
        steps = _int_list(get("steps")) if isinstance(get("steps"), str) else [int(s) for s in get("steps")]
    warmup = min(int(given("warmup", warmup)), iterations)
    lr = float(given("lr", lr))
    if sorted(steps) != steps or any(s < 0 for s in steps):
        raise ConfigError(f"--steps must be increasing non-negative iterations, got {steps}")
    if get("steps") is not None and any(s >= iterations for s in steps):
        raise ConfigError(f"--steps {steps}: an LR decay at or after the last iteration ({iterations}) never happens; "
                          "give steps below --iterations")
    if get("eval_every") and not get("val_data"):
        raise ConfigError("--eval-every needs --val-data (the set to evaluate on)")

    min_size = parse_sizes(given("min_size", sizes["min_size"]))
    max_size = int(given("max_size", sizes["max_size"]))
    test_size = int(given("test_size", max(min_size) if get("min_size") is not None else sizes["test_size"]))

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

    explicit = {f.name: a[f.name] for f in dataclasses.fields(FinetuneConfig) if a.get(f.name) is not None}
    cfg = FinetuneConfig(**{
        **explicit, "arch": arch, "recipe": recipe_name, "iterations": iterations, "batch_size": batch, "lr": lr,
        "steps": steps, "warmup": warmup, "min_size": min_size, "max_size": max_size, "test_size": test_size,
        "detector_options": options, "classes": _parse_classes(get("classes")),
    })
    cfg.check_limits()
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


class InfiniteSampler(Sampler[int]):
    """Endless shuffled indices, a new permutation per pass, each rank taking every world-th one.

    Deterministic given ``seed``; ``start`` skips that many of this rank's indices, so a resumed
    run sees the stream it would have seen (detectron2's ``TrainingSampler``).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if size <= 0:
            raise ConfigError("the training set is empty")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        stream = (index for _ in itertools.count() for index in torch.randperm(self.size, generator=generator).tolist())
        skip = self.rank + self.start * self.world_size
        for position, index in enumerate(stream):
            if position >= skip and (position - self.rank) % self.world_size == 0:
                yield index


def require_masks(dataset: DetectionDataset) -> None:
    """Refuse Mask R-CNN training on a dataset without instance masks (VOC, or COCO boxes only).

    Raises:
        ConfigError: the dataset is not COCO, or no annotation has a segmentation.
    """
    if dataset.report.format != "coco":
        raise ConfigError(f"mask_rcnn_fpn needs instance masks, but {dataset.source} is a "
                          f"{dataset.report.format or 'box'} dataset with boxes only. Use a box architecture (--arch "
                          "faster_rcnn_fpn) or a COCO json with 'segmentation' polygons.")
    segmentations = [s for record in dataset.records for s in record.segmentations]
    without = sum(not s for s in segmentations)
    if without == len(segmentations):
        raise ConfigError(f"mask_rcnn_fpn needs instance masks, but none of the {without} annotations of "
                          f"{dataset.source} has a 'segmentation'. Use --arch faster_rcnn_fpn, or add polygons to "
                          "the annotations.")
    if without:
        logger.warning("%d of %d annotations have no segmentation; their boxes are used as masks",
                       without, len(segmentations))


def _load_hub_model(name: str, what: str, bundle: bool, device: torch.device | None = None) -> nn.Module:
    """``from_pretrained(name)``, refused with a message saying what to do unless it is a backbone bundle
    (``bundle=True``, for ``--init``) or a detector (``bundle=False``, for ``eval``)."""
    try:
        loaded = from_pretrained(name, **({"device": device} if device is not None else {}))
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{what} {name!r}: {exc}") from exc
    if bundle and not isinstance(loaded, InsLocBackbone):
        raise ConfigError(f"--init {name!r} is a fine-tuned detector (task: detection), not a pretrained backbone. "
                          "Fine-tune from a backbone folder or alias, or evaluate it with insloc-train eval.")
    if not bundle and isinstance(loaded, InsLocBackbone):
        raise ConfigError(f"{name!r} is a pretrained backbone, not a detector: fine-tune it first (insloc-train "
                          "finetune --init ...), then evaluate RUN/final")
    return loaded


def build_model(cfg: FinetuneConfig, class_names: Sequence[str], norm: str) -> tuple[nn.Module, dict[str, Any]]:
    """The detector to fine-tune and its load report as a JSON-ready dict."""
    if cfg.reinit and cfg.init == "random":
        raise ConfigError(f"--reinit {','.join(cfg.reinit)} names pretrained layers; it needs a pretrained --init")
    bundle = None if cfg.init == "random" else _load_hub_model(cfg.init, "--init", bundle=True)
    options = {"min_size": tuple(cfg.min_size), "max_size": cfg.max_size, **cfg.detector_options}
    model = build_detector(cfg.arch, class_names=list(class_names), preset=cfg.preset, pretrained=bundle,
                           norm=norm, strict=cfg.strict_load, box_head_extra_norm=cfg.box_head_extra_norm,
                           reinit=cfg.reinit, **options)
    if bundle is None:
        keys = sorted(model.state_dict())
        report: dict[str, Any] = {"init": "random", "loaded": [], "new": keys, "ignored": {},
                                  "summary": f"random initialisation: nothing loaded, {len(keys)} new tensors"}
    else:
        load = model.load_report
        report = {"init": cfg.init, "source": str(getattr(bundle, "hub_folder", cfg.init)),
                  "pretrained_parts": list(bundle.config.parts), "summary": load.summary(), **dataclasses.asdict(load)}
    return model, report


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
    """AP, AP50, AP75, APs, APm, APl in percent (those pycocotools could score)."""
    return {name: round(100 * v, 2) for name, v in zip(STAT_NAMES[:6], result.stats) if v >= 0}


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

    Works in one process (CPU or one GPU) and under ``torchrun`` (one process per GPU,
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
    try:
        run = _FinetuneRun(cfg, info)  # batch split, bf16 and BatchNorm choices
        run.build_data()
        run.build_model()
        run.resume()  # before the run's files are written
        run.write_config()
        with run_lib.StopRequest(enabled=info.world_size == 1) as stop:  # Ctrl-C / SIGTERM: save, then stop
            run.loop(stop)
        return run.finish(start_time)  # final evaluation, data report, RUN/final
    finally:
        dist_utils.cleanup()


class _FinetuneRun:
    """The state of one fine-tuning run, built by :func:`finetune` step by step."""

    def __init__(self, cfg: FinetuneConfig, info: dist_utils.DistInfo) -> None:
        self.cfg, self.info, self.device, self.main = cfg, info, info.device, info.is_main
        device, world = info.device, info.world_size
        if cfg.batch_size % world:
            raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
        self.per_rank = cfg.batch_size // world
        amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
        if amp and device.type != "cuda":
            logger.warning("--amp uses bf16 autocast on CUDA only; running in float32 on %s", device)
            amp = False
        if amp and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bf16 support; running in float32")
            amp = False
        self.amp = amp
        self.norm = cfg.norm if cfg.norm != "auto" else ("sync" if world > 1 else "bn")
        if self.norm == "sync" and device.type != "cuda":
            logger.warning("SyncBatchNorm needs CUDA; using plain BatchNorm on %s", device)
            self.norm = "bn"
        self.run_dir = Path(cfg.output)
        self.start_iter = self.iteration = 0

    def build_data(self) -> None:
        cfg = self.cfg
        self.train_set = load_dataset(cfg.data, image_root=cfg.image_root, class_names=cfg.classes,
                                      unknown_classes=cfg.unknown_classes)
        self.val_set = None
        if cfg.val_data:
            self.val_set = load_dataset(cfg.val_data, image_root=cfg.val_image_root,
                                        class_names=self.train_set.class_names, unknown_classes=cfg.unknown_classes)
        self.masks = cfg.arch == "mask_rcnn_fpn"
        if self.masks:
            require_masks(self.train_set)

    def build_model(self) -> None:
        seed_everything(self.cfg.seed)
        self.model, self.report = build_model(self.cfg, self.train_set.class_names, self.norm)
        self.model.to(self.device)
        # SGD over the trainable parameters; the learning rate is set every iteration by lr_factor
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr,
                                         momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def resume(self) -> None:
        cfg, rank = self.cfg, self.info.rank
        found = run_lib.resume(self.run_dir, cfg.resume, lambda path, st: _check_resumable(path, st, cfg))
        if found is not None:
            path, state = found
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_iter = self.iteration = int(state["iteration"])
            logger.info("resumed from %s at iteration %d of %d", path, self.start_iter, cfg.iterations)
        if rank:
            seed_everything(cfg.seed + 1000 * rank + self.start_iter)
        self.train_model = run_lib.wrap_ddp(self.model, self.device, self.info.world_size)
        self.loader = DataLoader(
            TrainingSet(self.train_set, self.masks), batch_size=self.per_rank,
            sampler=InfiniteSampler(len(self.train_set), seed=cfg.seed, rank=rank, world_size=self.info.world_size,
                                    start=self.start_iter * self.per_rank),
            num_workers=cfg.workers, collate_fn=collate_detection, drop_last=True,
            generator=torch.Generator().manual_seed(cfg.seed + 1000 * rank + 7919 * self.start_iter),
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
            worker_init_fn=run_lib.ignore_stop_signals)

    def write_config(self) -> None:
        cfg = self.cfg
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = MetricsWriter(self.run_dir, self.main, self.start_iter, step_key="iteration")
        if not self.main:
            return
        logger.info("init %s: %s", cfg.init, self.report["summary"])
        run_lib.write_json(self.run_dir / "load_report.json", self.report)
        run_lib.write_json(self.run_dir / "training_args.json", {
            **cfg.to_dict(), "world_size": self.info.world_size, "norm_used": self.norm, "amp_used": self.amp,
            "device_used": str(self.device)})
        logger.info("fine-tuning %s on %s (%d images, classes %s): %d iterations, batch %d (%d per process x %d), "
                    "lr %g, steps %s, warmup %d, sizes %s/%d (test %d), norm %s, amp %s, device %s",
                    cfg.arch, self.train_set.source, len(self.train_set), self.train_set.class_names,
                    cfg.iterations, cfg.batch_size, self.per_rank, self.info.world_size, cfg.lr, cfg.steps,
                    cfg.warmup, cfg.min_size, cfg.max_size, cfg.test_size, self.norm, self.amp, self.device)

    def loop(self, stop: run_lib.StopRequest) -> None:
        cfg, device = self.cfg, self.device
        self.train_model.train()
        batches = iter(self.loader)
        timer = StepTimer()
        while self.iteration < cfg.iterations:
            images, targets = next(batches)
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in target.items()} for target in targets]
            lr = cfg.lr * lr_factor(self.iteration, cfg.steps, cfg.warmup, cfg.warmup_factor, cfg.gamma)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss_dict = self.train_model(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"the loss is {loss.item()} at iteration {self.iteration} "
                    f"({ {k: round(float(v), 4) for k, v in loss_dict.items()} }); lower --lr or raise --warmup")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.iteration += 1
            timer.tick()
            it = self.iteration
            if it % cfg.log_every == 0 or it == cfg.iterations or it == self.start_iter + 1:
                self._log(loss, loss_dict, lr, timer)
            if it % cfg.checkpoint_every == 0 and it < cfg.iterations:
                self._save()
            if self.val_set is not None and cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
                if self.main:
                    result = _evaluate(self.model, self.val_set, cfg, device, None)
                    self.log.write({"iteration": it, "eval": _metrics_for_card(result)})
                dist_utils.barrier()
                self.train_model.train()
            if stop.requested and it < cfg.iterations:
                saved = self._save() if it % cfg.checkpoint_every else ckpt.checkpoint_path(self.run_dir, it)
                raise stop.stopped(f"iteration {it}/{cfg.iterations}", saved)
        del batches
        if self.start_iter < cfg.iterations or not ckpt.list_checkpoints(self.run_dir):
            self._save()

    def _log(self, loss: torch.Tensor, loss_dict: dict[str, torch.Tensor], lr: float, timer: StepTimer) -> None:
        total, *parts = torch.stack([v.detach().float() for v in (loss, *loss_dict.values())]).tolist()  # one sync
        values = dict(zip(loss_dict, parts))
        seconds, _ = timer.read()
        self.log.write({"iteration": self.iteration, "loss": total, **values, "lr": lr, "sec_per_iter": seconds})
        if self.main:
            eta = seconds * (self.cfg.iterations - self.iteration)
            logger.info("iter %d/%d loss %.3f (%s) lr %.5f %.2f s/it eta %s", self.iteration, self.cfg.iterations,
                        total, " ".join(f"{k} {v:.3f}" for k, v in values.items()), lr, seconds,
                        datetime.timedelta(seconds=round(max(eta, 0))))

    def _save(self) -> Path:
        """Write this iteration's checkpoint (rank 0) and return its path."""
        path = ckpt.checkpoint_path(self.run_dir, self.iteration)
        if self.main:
            run_lib.save(self.run_dir, self.iteration, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "config": self.cfg.fingerprint()}, self.cfg.keep_checkpoints)
        dist_utils.barrier()
        return path

    def finish(self, start_time: float) -> FinetuneResult:
        """Final evaluation, RUN/data_report.json and the hub folder RUN/final (rank 0)."""
        cfg, result, final_dir = self.cfg, None, None
        if self.main:
            if self.val_set is not None:
                result = _evaluate(self.model, self.val_set, cfg, self.device, self.run_dir / "eval")
                self.log.write({"iteration": cfg.iterations, "eval": _metrics_for_card(result), "final": True})
            else:
                logger.warning("no --val-data: the final model is saved without evaluation results")
            data_report = {}
            for name, dataset in (("train", self.train_set), ("val", self.val_set)):
                if dataset is not None:  # report_unreadable first: it adds the images that failed to decode
                    skipped = dataset.report_unreadable()
                    data_report[name] = {**dataset.report.to_dict(), "skipped_at_decode": skipped}
            run_lib.write_json(self.run_dir / "data_report.json", data_report)
            final_dir = self._save_final(result)
            logger.info("fine-tuned detector written to %s", final_dir)
        self.log.close()
        dist_utils.barrier()
        return FinetuneResult(self.run_dir, final_dir, cfg.iterations, time.perf_counter() - start_time, result,
                              self.report)

    def _save_final(self, result: EvalResult | None) -> Path:
        """RUN/final: the detector, set up for inference at the test size."""
        cfg, run_dir = self.cfg, self.run_dir
        set_inference_options(self.model, min_size=cfg.test_size, max_size=cfg.max_size)  # training is over
        results = []
        if result is not None:
            results.append({"dataset": _dataset_name(cfg.val_data or self.val_set.source),
                            "metrics": _metrics_for_card(result)})
        provenance = {
            "recipe": f"insloc-train finetune ({cfg.recipe or 'custom schedule'})", "init": cfg.init,
            "arch": cfg.arch, "data": _dataset_name(cfg.data), "train_images": len(self.train_set),
            "iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr, "steps": cfg.steps,
            "min_size": cfg.min_size, "test_size": cfg.test_size, "norm": self.norm, "amp": self.amp,
            "world_size": self.info.world_size, "seed": cfg.seed}
        extra = {name: run_dir / name for name in ("training_args.json", "load_report.json", "metrics.jsonl")
                 if (run_dir / name).is_file()}
        shutil.rmtree(run_dir / "final", ignore_errors=True)
        return save_pretrained(self.model, run_dir / "final", name=Path(cfg.output).name, provenance=provenance,
                               results=results, extra_files=extra)



def _check_resumable(path: Path, state: Mapping[str, Any], cfg: FinetuneConfig) -> None:
    """CheckpointError unless ``state`` is a fine-tuning checkpoint of this configuration."""
    missing = [key for key in ("model", "optimizer", "iteration", "config") if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint of insloc-hub (no {', '.join(missing)})")
    ckpt.check_config(renamed_fields(state["config"]), cfg.fingerprint(), source=path)


def _dataset_name(spec: str) -> str:
    path = Path(spec)
    return f"{path.parent.name}/{path.name}" if path.suffix else path.name


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
    dev = dist_utils.select_device(device)
    model = _load_hub_model(model_name, "model", bundle=False, device=dev)
    class_names = model.hub_config.get("class_names")
    dataset = load_dataset(data, image_root=image_root, class_names=class_names or None)
    return run_evaluation(model, dataset, device=dev, batch_size=batch_size, score_threshold=score_threshold,
                          output_dir=output, num_visualize=num_visualize)


def _run_finetune(args: argparse.Namespace) -> int:
    cfg, notes = resolve_config(args)
    if dist_utils.detect_launch_env().rank == 0:
        for note in notes:
            print(note)
    result = finetune(cfg)
    if result.final_dir is not None:
        print(f"fine-tuned detector: {result.final_dir} ({result.iterations} iterations, {result.seconds:.0f} s)")
        if result.metrics is not None:
            print(result.metrics.summary())
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    result = evaluate_model(args.model, args.data, output=args.output, device=args.device,
                            batch_size=args.batch_size, image_root=args.image_root,
                            score_threshold=args.score_threshold, num_visualize=args.num_visualize)
    print(result.summary())
    if args.output:
        print(f"detections.json, metrics.json and examples.png written to {args.output}")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Add ``finetune`` and ``eval`` to the ``insloc-train`` dispatcher."""
    recipes = "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
    p = subparsers.add_parser(
        "finetune", help="fine-tune a detector from a pretrained backbone (or random init)",
        description="Fine-tune a torchvision detector initialised from an InsLoc / MoCo / supervised hub folder. "
                    "Recipes are defined at batch 16 and linearly scaled to --batch-size; every value can be "
                    f"overridden. Recipes: {recipes}. Multi-GPU: torchrun --nproc-per-node N $(which insloc-train) "
                    "finetune ...",
    )
    add_config_flags(p, FinetuneConfig, required=("data", "output"))
    p.add_argument("--backbone", choices=sorted(ARCH_PRESETS), help="deprecated: use --preset")
    p.add_argument("--detector-opt", action="append", metavar="KEY=VALUE",
                   help="torchvision detector argument, e.g. rpn_post_nms_top_n_train=1000 (repeatable)")
    p.set_defaults(func=_run_finetune, interrupted_hint=run_lib.INTERRUPTED_HINT)

    e = subparsers.add_parser(
        "eval", help="COCO-style evaluation of a fine-tuned detector",
        description="AP, AP50, AP75, APs/m/l and per-class AP of a detector hub folder on a dataset; writes "
                    "detections.json (COCO results), metrics.json and examples.png to --output.",
    )
    e.add_argument("model", help="detector: hub alias, owner/repo[@rev] or folder (e.g. RUN/final)")
    e.add_argument("--data", required=True, help="VOC folder, VOC split list .txt, or COCO .json")
    e.add_argument("--image-root", help="image folder of a COCO json (default: guessed)")
    e.add_argument("--output", type=output_folder, help="folder for detections.json, metrics.json, examples.png")
    e.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--batch-size", type=int_at_least(1), default=2)
    e.add_argument("--score-threshold", type=probability, default=0.0, help="drop detections below (0-1)")
    e.add_argument("--num-visualize", type=int_at_least(0), default=4, help="images drawn into examples.png")
    e.set_defaults(func=_run_eval)
