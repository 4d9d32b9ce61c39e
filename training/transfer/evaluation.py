"""COCO-style box evaluation (pycocotools), result files and pictures of detections.

* :func:`evaluate_detections` scores COCO results (``image_id``, ``category_id``, ``bbox`` xywh,
  ``score``) against a ground truth (a :class:`DetectionDataset`, a COCO dict or a pycocotools
  ``COCO``) with pycocotools' ``COCOeval`` and returns an :class:`EvalResult`. The numbers are
  pycocotools' own: nothing is recomputed except per-class AP, which is read from
  ``COCOeval.eval["precision"]`` the way detectron2's ``COCOEvaluator`` does.
* :func:`detections_from_outputs` turns torchvision detector outputs into COCO results.
* :func:`run_evaluation` runs any torchvision detector over a dataset and does all of the above,
  writing ``detections.json``, ``metrics.json`` and ``examples.png``.

All AP / AR values are fractions in ``[0, 1]`` as in ``COCOeval.stats``; ``-1`` means pycocotools
had no ground truth to score (e.g. ``ap_small`` on a set without small objects).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from insloc_hub.errors import ConfigError, DatasetError
from insloc_hub.training.transfer.detection_data import DetectionDataset
from insloc_hub.transforms import to_tensor

__all__ = [
    "STAT_NAMES",
    "EvalResult",
    "detections_from_outputs",
    "draw_detections",
    "evaluate_detections",
    "run_evaluation",
    "save_examples_grid",
    "write_coco_results",
]

logger = logging.getLogger(__name__)

#: Names of the 12 values of ``COCOeval.stats`` (bbox), in order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

PRED_COLOR = (230, 40, 40)
GT_COLOR = (30, 190, 60)


def _pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("COCO evaluation needs pycocotools: pip install 'insloc-hub[coco]'") from exc
    return COCO, COCOeval


def _quiet(verbose: bool) -> contextlib.AbstractContextManager[Any]:
    """Swallow pycocotools' prints unless ``verbose``."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


@dataclass
class EvalResult:
    """COCO box metrics, as fractions in ``[0, 1]`` (``-1``: no ground truth in that range).

    The first 12 fields are ``COCOeval.stats`` (also kept as ``stats``, in the order of
    :data:`STAT_NAMES`): AP@[.5:.95], AP50, AP75, AP by area (small < 32², large > 96²), AR with
    1 / 10 / 100 detections and AR@100 by area. ``per_class_ap`` / ``per_class_ap50``: class name ->
    AP (``nan`` without ground truth); ``num_ground_truth`` leaves out crowd and difficult boxes;
    ``skipped_images``: ``"file: reason"`` of images that could not be decoded.
    """

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar1: float
    ar10: float
    ar100: float
    ar_small: float
    ar_medium: float
    ar_large: float
    per_class_ap: dict[str, float] = field(default_factory=dict)
    per_class_ap50: dict[str, float] = field(default_factory=dict)
    stats: list[float] = field(default_factory=list)
    num_images: int = 0
    num_detections: int = 0
    num_ground_truth: int = 0
    skipped_images: list[str] = field(default_factory=list)

    @classmethod
    def from_stats(cls, stats: Sequence[float], **extra: Any) -> EvalResult:
        """Build from the 12 values of ``COCOeval.stats``."""
        values = [float(v) for v in stats]
        names = [f.name for f in dataclasses.fields(cls)[:len(STAT_NAMES)]]  # ap, ap50, ... ar_large
        return cls(**dict(zip(names, values, strict=True)), stats=values, **extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``nan`` becomes ``None``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return {name: clean(getattr(self, name)) for name in self.__dataclass_fields__}

    def summary(self) -> str:
        """A markdown table of the COCO metrics (percent), then AP / AP50 per class."""

        def pct(value: float) -> str:
            return "n/a" if value is None or value < 0 or math.isnan(value) else f"{100 * value:.1f}"

        values = [self.ap, self.ap50, self.ap75, self.ap_small, self.ap_medium, self.ap_large]
        lines = ["| " + " | ".join(STAT_NAMES[:6]) + " |", "|" + "---|" * 6,
                 "| " + " | ".join(pct(v) for v in values) + " |"]
        if self.per_class_ap:
            lines += ["", "| class | AP | AP50 |", "|---|---|---|"]
            lines += [f"| {name} | {pct(ap)} | {pct(self.per_class_ap50.get(name, math.nan))} |"
                      for name, ap in self.per_class_ap.items()]
        lines.append(f"\n{self.num_images} images, {self.num_ground_truth} boxes, {self.num_detections} detections")
        return "\n".join(lines)



def _as_coco(ground_truth: Any, verbose: bool) -> Any:
    """A pycocotools ``COCO`` for a dataset, a COCO dict, or a ``COCO`` itself."""
    COCO, _ = _pycocotools()
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, DetectionDataset):
        data = ground_truth.to_coco_dict()
    elif isinstance(ground_truth, Mapping):
        data = copy.deepcopy(dict(ground_truth))
    else:
        raise ConfigError(f"ground truth must be a DetectionDataset, a COCO dict or a pycocotools COCO, got "
                          f"{type(ground_truth).__name__}")
    for key in ("images", "annotations", "categories"):
        data.setdefault(key, [])
    coco = COCO()
    coco.dataset = data
    with _quiet(verbose):
        coco.createIndex()
    return coco


def _empty_results(coco_gt: Any) -> Any:
    """A result ``COCO`` with no detections (``COCO.loadRes`` fails on an empty list)."""
    COCO, _ = _pycocotools()
    results = COCO()
    gt = coco_gt.dataset
    results.dataset = {"info": copy.deepcopy(gt.get("info", {})), "images": list(gt["images"]),
                       "categories": copy.deepcopy(gt["categories"]), "annotations": []}
    with _quiet(False):
        results.createIndex()
    return results


def _as_result(detection: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-Python copy of one COCO result (``loadRes`` writes into the dicts it gets)."""
    try:
        bbox = [float(v) for v in detection["bbox"]]
        out = {**detection, "image_id": int(detection["image_id"]), "category_id": int(detection["category_id"]),
               "bbox": bbox, "score": float(detection["score"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"a detection must have image_id, category_id, bbox [x, y, w, h] and score; got "
                          f"{detection!r}") from exc
    if len(bbox) != 4:
        raise ConfigError(f"bbox must be [x, y, w, h], got {bbox}")
    return out


def evaluate_detections(ground_truth: DetectionDataset | Mapping[str, Any] | Any,
                        detections: Sequence[Mapping[str, Any]], *, class_names: Sequence[str] | None = None,
                        verbose: bool = False) -> EvalResult:
    """Score COCO results (``image_id``, ``category_id``, ``bbox`` x, y, w, h, ``score``; not modified)
    with pycocotools ``COCOeval`` (``iouType="bbox"``); ``stats`` are exactly ``COCOeval.stats``.

    ``ground_truth``: a :class:`DetectionDataset`, a COCO-format dict or a pycocotools ``COCO``.
    ``class_names``: the categories in increasing id order (default: the ground truth's names).
    ConfigError for detections of images that are not in the ground truth.
    """
    _, COCOeval = _pycocotools()
    coco_gt = _as_coco(ground_truth, verbose)
    results = [_as_result(d) for d in detections]

    known_images = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known_images)
    if unknown:
        raise ConfigError(f"{len(unknown)} detected image ids are not in the ground truth (e.g. {unknown[:5]}); use "
                          "the dataset's image_ids when converting outputs")
    category_ids = sorted(coco_gt.getCatIds())
    stray = {r["category_id"] for r in results} - set(category_ids)
    if stray:
        logger.warning("detections with category ids %s not in the ground truth are ignored", sorted(stray))

    with _quiet(verbose):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    names = [coco_gt.cats[cid].get("name", str(cid)) for cid in category_ids]
    if class_names is not None:
        if len(class_names) != len(category_ids):
            raise ConfigError(f"{len(class_names)} class names given for {len(category_ids)} categories {category_ids}")
        names = [str(n) for n in class_names]
    per_class_ap, per_class_ap50 = _per_class_ap(evaluator, names)
    num_gt = sum(1 for ann in coco_gt.dataset["annotations"] if not ann.get("iscrowd", 0))
    return EvalResult.from_stats(evaluator.stats, per_class_ap=per_class_ap, per_class_ap50=per_class_ap50,
                                 num_images=len(known_images), num_detections=len(results), num_ground_truth=num_gt)


def _per_class_ap(evaluator: Any, names: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """AP@[.5:.95] and AP@.5 per class from ``eval["precision"]``, as detectron2 computes them.

    ``precision`` has shape ``[T IoUs, R recalls, K classes, A areas, M maxDets]``; area index 0 is
    "all" and the last maxDets is 100. Entries of -1 (no ground truth) are left out of the mean.
    """
    precision = evaluator.eval["precision"]

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(np.mean(values)) if values.size else math.nan

    ap = {name: mean(precision[:, :, k, 0, -1]) for k, name in enumerate(names)}
    ap50 = {name: mean(precision[0, :, k, 0, -1]) for k, name in enumerate(names)}  # iouThrs[0] == 0.5
    return ap, ap50


def detections_from_outputs(outputs: Sequence[Mapping[str, Any]], image_ids: Sequence[int], *,
                            category_ids: Sequence[int] | None = None, score_threshold: float = 0.0
                            ) -> list[dict[str, Any]]:
    """COCO results from torchvision detector outputs (``boxes`` x1, y1, x2, y2 pixels, ``labels`` ``1..C``,
    ``scores``; tensors or arrays), one per id of ``image_ids`` (``dataset.image_ids``).

    ``category_ids[label - 1]`` is a label's category (``dataset.category_ids``; default: the label
    itself; labels outside ``1..C`` are dropped with a warning).
    """
    if len(outputs) != len(image_ids):
        raise ConfigError(f"{len(outputs)} outputs for {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    dropped = 0
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes, labels, scores = _as_lists(output["boxes"], output["labels"], output["scores"])
        for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores, strict=True):
            if score < score_threshold:
                continue
            if category_ids is not None:
                if not 1 <= label <= len(category_ids):
                    dropped += 1
                    continue
                category = int(category_ids[label - 1])
            else:
                category = int(label)
            results.append({"image_id": int(image_id), "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    if dropped:
        logger.warning("%d detections with labels outside 1..%d dropped", dropped, len(category_ids or []))
    return results


def _as_lists(boxes: Any, labels: Any, scores: Any) -> tuple[list, list, list]:
    """Boxes ``[N, 4]``, labels and scores (tensors, arrays or lists) as plain Python lists."""
    return (torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).tolist(),
            torch.as_tensor(labels, dtype=torch.int64).reshape(-1).tolist(),
            torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist())


def write_coco_results(detections: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write COCO results as JSON (the format of the COCO evaluation server); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump([_as_result(d) for d in detections], f)
    return path


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"


def draw_detections(image: Image.Image, pred_boxes: Any, pred_labels: Any, pred_scores: Any, gt_boxes: Any = None,
                    gt_labels: Any = None, class_names: Sequence[str] = (), path: str | Path | None = None, *,
                    score_threshold: float = 0.0) -> Image.Image:
    """Draw predicted boxes (red, "name score") and true boxes (green, "name") on a ``PIL.Image``.

    Boxes are ``[N, 4]`` x1, y1, x2, y2 pixels; labels are ``1..C`` (``class_names[label - 1]``).
    Predictions below ``score_threshold`` are not drawn. Writes a PNG if ``path`` is given;
    returns the picture (drawn by ``torchvision.utils.draw_bounding_boxes``).
    """
    boxes, texts, colors = [], [], []
    if gt_boxes is not None:
        gt = torch.as_tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4).tolist()
        names = ["gt"] * len(gt) if gt_labels is None else \
            [_class_name(int(label), class_names) for label in torch.as_tensor(gt_labels).reshape(-1).tolist()]
        boxes, texts, colors = gt, names, [GT_COLOR] * len(gt)
    predictions = zip(*_as_lists(pred_boxes, pred_labels, pred_scores), strict=True)
    for box, label, score in sorted(predictions, key=lambda t: t[2]):  # the most confident drawn last, on top
        if score >= score_threshold:
            boxes.append(box)
            texts.append(f"{_class_name(label, class_names)} {score:.2f}")
            colors.append(PRED_COLOR)
    canvas = pil_to_tensor(image.convert("RGB"))
    if boxes:
        canvas = draw_bounding_boxes(canvas, torch.tensor(boxes), labels=texts, colors=colors,
                                     width=max(1, round(min(canvas.shape[1:]) / 200)), fill_labels=True)
    picture = to_pil_image(canvas)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    return picture


def save_examples_grid(pictures: Sequence[Image.Image], path: str | Path, *, ncols: int = 2, tile_size: int = 480
                       ) -> Image.Image:
    """Tile pictures (e.g. from :func:`draw_detections`) into one PNG with a colour legend.

    Each picture is shrunk to fit a ``tile_size`` square, keeping its aspect ratio.
    """
    if not pictures:
        raise ConfigError("save_examples_grid needs at least one picture")
    ncols = max(1, min(ncols, len(pictures)))
    nrows = math.ceil(len(pictures) / ncols)
    legend_h, pad = 18, 4
    grid = Image.new("RGB", (ncols * (tile_size + pad) + pad, legend_h + nrows * (tile_size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.rectangle((pad, 4, pad + 10, 14), fill=PRED_COLOR)
    draw.text((pad + 14, 3), "predicted (class score)", fill=(0, 0, 0), font=font)
    draw.rectangle((pad + 170, 4, pad + 180, 14), fill=GT_COLOR)
    draw.text((pad + 184, 3), "ground truth", fill=(0, 0, 0), font=font)
    for i, picture in enumerate(pictures):
        tile = picture.convert("RGB")  # a copy: thumbnail() works in place
        tile.thumbnail((tile_size, tile_size))
        row, col = divmod(i, ncols)
        x = pad + col * (tile_size + pad) + (tile_size - tile.width) // 2
        y = legend_h + pad + row * (tile_size + pad) + (tile_size - tile.height) // 2
        grid.paste(tile, (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return grid


class _EvalImages(Dataset):
    """The dataset's images at their original size, without its (training) transforms."""

    def __init__(self, dataset: DetectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        image = self.dataset.try_load_image(index)  # None: cannot be decoded, skipped and reported
        return (to_tensor(image) if image is not None else None), index


def _collate_eval(batch: Sequence[tuple[torch.Tensor | None, int]]) -> tuple[list[torch.Tensor], list[int]]:
    kept = [(image, index) for image, index in batch if image is not None]
    return [image for image, _ in kept], [index for _, index in kept]


def run_evaluation(model: torch.nn.Module, dataset: DetectionDataset, *, device: str | torch.device = "cpu",
                   batch_size: int = 2, score_threshold: float = 0.0, output_dir: str | Path | None = None,
                   num_visualize: int = 4, num_workers: int = 0, verbose: bool = False) -> EvalResult:
    """Run a torchvision detector over ``dataset`` and score it COCO-style.

    The model is moved to ``device`` and put in eval mode for the run (its training mode is
    restored afterwards); gradients are off. Images go in at their original size, without the
    dataset's transforms: torchvision detectors resize internally and return boxes in input pixel
    coordinates, the coordinates of the ground truth. Any module that maps a list of ``[3, H, W]``
    tensors to a list of ``{"boxes", "labels", "scores"}`` dicts works.

    If ``output_dir`` is given it receives ``detections.json`` (COCO results), ``metrics.json``
    (:meth:`EvalResult.to_dict`) and ``examples.png`` (the first ``num_visualize`` images, with
    predictions scoring at least ``max(score_threshold, 0.3)`` and the ground truth).
    """
    device = torch.device(device)
    loader = DataLoader(_EvalImages(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_eval)
    was_training = model.training
    model.to(device).eval()
    outputs: list[dict[str, torch.Tensor]] = [{}] * len(dataset)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for images, indices in loader:
                if not images:
                    continue
                batch_out = model([image.to(device) for image in images])
                for index, out in zip(indices, batch_out, strict=True):
                    outputs[index] = {k: out[k].detach().cpu() for k in ("boxes", "labels", "scores")}
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    logger.info("ran the detector on %d images in %.1f s", len(dataset), seconds)

    # Images that failed to decode are left out of the scoring (their boxes would count as misses)
    # and listed in the result: skipped and reported, never fatal.
    unreadable = dataset.unreadable()
    skipped = dataset.report_unreadable()
    kept = [i for i in range(len(dataset)) if i not in unreadable]
    if not kept:
        raise DatasetError(f"none of the {len(dataset)} images of {dataset.source} can be decoded: {skipped[:5]}")
    scored = dataset if not unreadable else dataset.subset(kept)
    detections = detections_from_outputs([outputs[i] for i in kept], scored.image_ids,
                                         category_ids=dataset.category_ids, score_threshold=score_threshold)
    result = evaluate_detections(scored, detections, verbose=verbose)
    result.skipped_images = skipped
    logger.info("COCO box evaluation of %s:\n%s", dataset.source or "the dataset", result.summary())

    if output_dir is not None:
        output_dir = Path(output_dir)
        write_coco_results(detections, output_dir / "detections.json")  # creates output_dir
        metrics = result.to_dict()
        metrics.update(score_threshold=score_threshold, seconds=round(seconds, 3), dataset=dataset.source)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if num_visualize > 0:  # kept is not empty
            pictures = [draw_detections(dataset.load_image(i), outputs[i]["boxes"], outputs[i]["labels"],
                                        outputs[i]["scores"], dataset.records[i].boxes, dataset.records[i].labels,
                                        dataset.class_names, score_threshold=max(score_threshold, 0.3))
                        for i in kept[:num_visualize]]
            save_examples_grid(pictures, output_dir / "examples.png")
    return result
