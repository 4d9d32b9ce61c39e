"""Detection datasets for torchvision detectors: COCO JSON and PASCAL VOC XML behind one interface.

``load_coco`` / ``load_voc`` / ``load_dataset`` read annotations into a :class:`DetectionDataset`,
which yields ``(image, target)`` in the format torchvision's detection models take:

* ``image``: ``float32`` tensor ``[3, H, W]``, RGB, values in ``[0, 1]`` (not normalised: the
  detector's ``GeneralizedRCNNTransform`` normalises and resizes).
* ``target``: ``boxes`` (``float32 [N, 4]``, ``x1, y1, x2, y2`` in absolute 0-based pixel
  coordinates), ``labels`` (``int64 [N]`` in ``1..C``; 0 is the background), ``image_id`` (``int``),
  ``iscrowd`` (``int64 [N]``), ``area`` (``float32 [N]``), ``difficult`` (``bool [N]``).

Label ``i + 1`` is ``class_names[i]``. ``to_coco_dict()`` gives the ground truth in COCO format for
:func:`insloc_hub.training.transfer.evaluation.evaluate_detections`.

Bad annotations never crash a load and are never accepted silently: boxes outside the image are
clipped, empty boxes dropped, missing or unreadable files and unknown classes counted; everything
lands in ``dataset.report`` (a :class:`DatasetReport`, logged once). A dataset without a single
usable image raises :class:`~insloc_hub.errors.DatasetError` saying why.

Multi-scale training: torchvision's detectors resize inside the model, so the scales of the standard
protocols are given by :func:`protocol_sizes` as the detector's ``min_size`` / ``max_size``; the
training set (:class:`TrainingSet`) itself only flips, with ``torchvision.transforms.v2``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as tvf

from insloc_hub.errors import ConfigError, DatasetError, InvalidImageError
from insloc_hub.transforms import IMAGE_EXTENSIONS, decode_image, read_image_size, to_tensor

__all__ = [
    "VOC_CLASSES",
    "DatasetReport",
    "DetectionDataset",
    "DetectionRecord",
    "TrainingSet",
    "collate_detection",
    "flip_horizontal",
    "load_coco",
    "load_dataset",
    "load_voc",
    "protocol_sizes",
]

logger = logging.getLogger(__name__)

Target = dict[str, Any]


#: The 20 PASCAL VOC classes in the order of the devkit (label ``i + 1`` is ``VOC_CLASSES[i]``).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Image files. Pixels are decoded by ``insloc_hub.transforms.decode_image`` and sizes read by
# ``read_image_size`` (the same policy: limits, EXIF orientation, InvalidImageError), so the size
# found at load time is the size of the decoded image.
# ----------------------------------------------------------------------------------------------

#: images whose long side is more than this many times the short side are left out (reported as
#: ``degenerate_images``): resized to a detector's max_size their short side rounds to 0 pixels.
MAX_ASPECT_RATIO = 100.0


#: Problem kinds counted by :class:`DatasetReport`, with the words used in messages.
PROBLEM_KINDS: dict[str, str] = {
    "missing_images": "missing image files",
    "unreadable_images": "unreadable image files",
    "degenerate_images": f"images with an aspect ratio over {MAX_ASPECT_RATIO:g}:1 left out",
    "outside_root": "image paths that are absolute or climb out of the image folder with '..'",
    "missing_annotations": "missing annotation files",
    "parse_errors": "annotation entries that could not be parsed",
    "duplicate_images": "duplicate image entries",
    "skipped_empty": "images without boxes skipped (keep_empty=False)",
    "unknown_classes": "boxes of unknown classes dropped",
    "malformed_boxes": "malformed boxes dropped (missing or non-numeric coordinates)",
    "degenerate_boxes": "empty or degenerate boxes dropped",
    "clipped_boxes": "boxes clipped to the image",
    "orphan_annotations": "annotations of unknown image ids dropped",
    "malformed_annotations": "annotation records of the wrong type dropped (image_id, category_id, iscrowd)",
    "malformed_segmentations": "segmentations that are malformed or outside the image (the box is used as mask)",
    "similar_class_names": "class names that look like typos of another (pass class_names / --classes)",
    "size_mismatches": "images whose annotated size differs from the file (file size used)",
}

#: Kinds that make an image unusable; they explain a DatasetError.
_IMAGE_LEVEL = ("missing_images", "unreadable_images", "degenerate_images", "outside_root", "missing_annotations",
                "parse_errors", "duplicate_images", "skipped_empty")


@dataclass
class DatasetReport:
    """What loading a dataset found: counts of every problem and a few examples of each.

    Each problem kind of :data:`PROBLEM_KINDS` reads as an ``int`` attribute (``report.missing_images``);
    ``examples[kind]`` holds up to ``max_examples`` strings naming the file (and the box or class) concerned.
    """

    source: str = ""
    format: str = ""
    num_images: int = 0  # images listed by the annotations (or the split)
    num_usable: int = 0  # images in the dataset
    num_boxes: int = 0  # boxes kept (all of them, crowd and difficult included)
    num_negatives: int = 0  # usable images without a training box
    num_difficult: int = 0
    num_crowd: int = 0
    max_examples: int = 5
    examples: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # problem kind -> count

    def __getattr__(self, name: str) -> int:
        if name in PROBLEM_KINDS:
            return self.counts.get(name, 0)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def note(self, kind: str, example: str) -> None:
        """Count one problem of ``kind`` and keep ``example`` if fewer than ``max_examples`` are kept."""
        if kind not in PROBLEM_KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < self.max_examples:
            kept.append(example)

    @property
    def problems(self) -> dict[str, int]:
        """Non-zero problem counts, by kind."""
        return {kind: self.counts[kind] for kind in PROBLEM_KINDS if self.counts.get(kind)}

    def describe(self, kinds: Sequence[str] | None = None) -> str:
        """``"3 missing image files (e.g. a.jpg, b.jpg); ..."`` for the non-zero ``kinds``."""
        parts = []
        for kind, count in self.problems.items():
            if kinds is not None and kind not in kinds:
                continue
            examples = ", ".join(self.examples.get(kind, []))
            parts.append(f"{count} {PROBLEM_KINDS[kind]}" + (f" (e.g. {examples})" if examples else ""))
        return "; ".join(parts)

    def summary(self) -> str:
        """One paragraph: what was loaded and every problem found."""
        head = (
            f"{self.format or 'dataset'} {self.source}: {self.num_usable} of {self.num_images} images "
            f"usable, {self.num_boxes} boxes ({self.num_difficult} difficult, {self.num_crowd} crowd), "
            f"{self.num_negatives} images without boxes"
        )
        problems = self.describe()
        return f"{head}. Problems: {problems}." if problems else f"{head}. No problems found."

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy, every problem kind as its own key."""
        values = asdict(self)
        counts = values.pop("counts")
        return {**values, **{kind: counts.get(kind, 0) for kind in PROBLEM_KINDS}}


@dataclass
class DetectionRecord:
    """One image and all its boxes, already cleaned (clipped, degenerate ones dropped).

    ``boxes`` are ``float32 [N, 4]`` ``x1, y1, x2, y2`` in 0-based continuous pixel coordinates
    (``0 <= x1 < x2 <= width``); ``labels`` are ``1..C``. Crowd and difficult boxes are kept here,
    flagged; :meth:`DetectionDataset.get_target` decides which ones a training target holds.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray
    file_name: str = ""
    segmentations: tuple[Any, ...] = ()  # COCO: each box's polygons / RLE as annotated (None: none)


@dataclass
class _Box:
    label: int
    xyxy: tuple[float, float, float, float]
    area: float
    iscrowd: bool = False
    difficult: bool = False
    segmentation: Any = None


def _rasterise(segmentation: Any, box: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``uint8 [H, W]`` mask of a COCO polygon list or RLE (pycocotools), or of ``box`` when there is none."""
    if not segmentation:
        mask = torch.zeros(shape, dtype=torch.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
        mask[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = 1
        return mask
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(segmentation, *shape)
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
    return torch.from_numpy(decoded.astype(np.uint8))


def _make_record(image_id: int, path: Path, width: int, height: int, boxes: Sequence[_Box], file_name: str
                 ) -> DetectionRecord:
    return DetectionRecord(
        image_id, path, width, height, boxes=np.asarray([b.xyxy for b in boxes], dtype=np.float32).reshape(-1, 4),
        labels=np.asarray([b.label for b in boxes], dtype=np.int64),
        area=np.asarray([b.area for b in boxes], dtype=np.float32),
        iscrowd=np.asarray([b.iscrowd for b in boxes], dtype=bool),
        difficult=np.asarray([b.difficult for b in boxes], dtype=bool), file_name=file_name,
        segmentations=tuple(b.segmentation for b in boxes))


class DetectionDataset(Dataset):
    """Images and boxes for a torchvision detector; ``dataset[i] -> (image, target)``.

    ``class_names[i]`` is label ``i + 1``; ``category_ids`` the COCO id of each class (default
    ``1..C``, kept so results of a COCO dataset keep the original ids). Training targets hold VOC
    "difficult" boxes (``keep_difficult``, as detectron2 and the MoCo/InsLoc VOC protocol) but not
    COCO crowd regions (as torchvision's references); evaluation ignores both.
    """

    def __init__(self, records: Sequence[DetectionRecord], class_names: Sequence[str], *,
                 category_ids: Sequence[int] | None = None, keep_difficult: bool = True,
                 report: DatasetReport | None = None, source: str = "") -> None:
        self.records = list(records)
        self.class_names = [str(name) for name in class_names]
        if category_ids is None:
            category_ids = range(1, len(self.class_names) + 1)
        self.category_ids = [int(c) for c in category_ids]
        if len(self.category_ids) != len(self.class_names) or len(set(self.category_ids)) != len(self.category_ids):
            raise ConfigError(f"category_ids {self.category_ids} must be {len(self.class_names)} distinct ids, one per "
                              "class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class names must be distinct, got {self.class_names}")
        self.keep_difficult, self.source = keep_difficult, source
        self.report = report if report is not None else DatasetReport(source=source)
        # Decode failures found lazily (a file cut after its header): 1 + the InvalidImageError
        # reason's index, in shared memory so what a DataLoader worker finds reaches the main process.
        self._unreadable = torch.zeros(max(len(self.records), 1), dtype=torch.uint8).share_memory_()
        self._reported: set[int] = set()

    @property
    def num_classes(self) -> int:
        """Number of object classes ``C`` (a torchvision detector needs ``num_classes=C + 1``)."""
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        """Image ids in dataset order (``target["image_id"]`` and the COCO ``image_id``)."""
        return [record.image_id for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of item ``index`` (no transforms); InvalidImageError if it cannot be decoded."""
        return decode_image(self.records[index].path)

    def try_load_image(self, index: int) -> Image.Image | None:
        """:meth:`load_image`, or ``None`` (remembered in every process) if the file cannot be decoded."""
        if self._unreadable[index]:
            return None
        try:
            return self.load_image(index)
        except InvalidImageError as exc:
            self._unreadable[index] = 1 + InvalidImageError.REASONS.index(exc.reason)
            logger.warning("skipping image %s: %s", self.records[index].file_name or self.records[index].path, exc)
            return None

    def unreadable(self) -> dict[int, str]:
        """Items whose image failed to decode so far (any process): ``index -> InvalidImageError reason``."""
        found = torch.nonzero(self._unreadable[: len(self.records)]).flatten().tolist()
        return {i: InvalidImageError.REASONS[int(self._unreadable[i]) - 1] for i in found}

    def report_unreadable(self) -> list[str]:
        """Add images that failed to decode since the last call to ``report`` (``unreadable_images``) and
        log them. Returns every such file as ``"name: reason"`` (also those reported before)."""
        entries, new = [], []
        for index, reason in self.unreadable().items():
            entries.append(f"{self.records[index].file_name or self.records[index].path.name}: {reason} (at decode)")
            if index not in self._reported:
                self._reported.add(index)
                self.report.note("unreadable_images", entries[-1])
                new.append(entries[-1])
        if new:
            logger.warning("%s: %d image(s) skipped because they cannot be decoded: %s", self.source or "dataset",
                           len(new), ", ".join(new[:5]) + (" ..." if len(new) > 5 else ""))
        return entries

    def subset(self, indices: Sequence[int]) -> DetectionDataset:
        """A dataset of the items ``indices`` (same classes, ids and report), e.g. without unreadable images."""
        return DetectionDataset([self.records[i] for i in indices], self.class_names, category_ids=self.category_ids,
                                keep_difficult=self.keep_difficult, report=self.report, source=self.source)

    def get_target(self, index: int, masks: bool = False) -> Target:
        """The training target of item ``index`` (no transforms, no image decoding).

        With ``masks=True`` it also holds ``"masks"`` (``uint8 [N, H, W]``), each box's COCO
        segmentation rasterised (the box itself where the annotation has none).
        """
        record = self.records[index]
        keep = ~record.iscrowd
        if not self.keep_difficult:
            keep &= ~record.difficult
        target = {
            "boxes": torch.from_numpy(record.boxes[keep].copy()).reshape(-1, 4),
            "labels": torch.from_numpy(record.labels[keep].copy()),
            "image_id": int(record.image_id),
            "iscrowd": torch.from_numpy(record.iscrowd[keep].astype(np.int64)),
            "area": torch.from_numpy(record.area[keep].copy()),
            "difficult": torch.from_numpy(record.difficult[keep].copy()),
        }
        if masks:
            shape = (record.height, record.width)
            segmentations = [s for s, k in zip(record.segmentations or [None] * len(keep), keep) if k]
            target["masks"] = torch.stack([_rasterise(s, b, shape) for s, b in zip(segmentations, target["boxes"])]) \
                if segmentations else torch.zeros((0, *shape), dtype=torch.uint8)
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return to_tensor(self.load_image(index)), self.get_target(index)

    def to_coco_dict(self) -> dict[str, Any]:
        """The ground truth in COCO format (``images``, ``annotations``, ``categories``).

        Every kept box is written, including crowd regions and VOC difficult boxes. A difficult box
        is written with ``iscrowd: 1`` (plus ``ignore: 1`` and ``difficult: 1`` for readers):
        pycocotools reads only ``iscrowd`` to decide what to ignore, and an ignored box counts
        neither as a miss when nothing detects it nor as a false positive when something does,
        which is how the VOC devkit treats difficult objects. One difference remains: pycocotools
        matches a detection to an ignored box by intersection over the detection's area rather
        than IoU, so it is slightly more lenient about what overlaps a difficult box.
        """
        images, annotations = [], []
        for record in self.records:
            images.append({"id": int(record.image_id), "file_name": record.file_name or record.path.name,
                           "width": int(record.width), "height": int(record.height)})
            for box, label, area, crowd, difficult in zip(record.boxes, record.labels, record.area, record.iscrowd,
                                                          record.difficult, strict=True):
                x1, y1, x2, y2 = (float(v) for v in box)
                ignored = bool(crowd or difficult)
                annotation = {"id": len(annotations) + 1, "image_id": int(record.image_id),
                              "category_id": self.category_ids[int(label) - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                              "area": float(area), "iscrowd": int(ignored), "ignore": int(ignored)}
                if difficult:
                    annotation["difficult"] = 1
                annotations.append(annotation)
        categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names, strict=True)]
        return {"info": {"description": f"insloc-hub ground truth of {self.source}"}, "images": images,
                "annotations": annotations, "categories": sorted(categories, key=lambda c: c["id"])}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.report.num_boxes} boxes, "
                f"classes={self.class_names}, source={self.source!r})")


def _finish(records: list[DetectionRecord], class_names: Sequence[str], report: DatasetReport, *,
            category_ids: Sequence[int] | None, keep_difficult: bool, keep_empty: bool) -> DetectionDataset:
    """Drop images without training boxes if asked, fill the report, log it, build the dataset."""
    kept = []
    for record in records:
        trainable = ~record.iscrowd & (~record.difficult if not keep_difficult else True)
        if not np.any(trainable):
            if not keep_empty:
                report.note("skipped_empty", record.file_name)
                continue
            report.num_negatives += 1
        kept.append(record)
    report.num_usable = len(kept)
    report.num_boxes = int(sum(len(r.labels) for r in kept))
    report.num_difficult = int(sum(int(r.difficult.sum()) for r in kept))
    report.num_crowd = int(sum(int(r.iscrowd.sum()) for r in kept))
    logger.log(logging.WARNING if report.problems else logging.INFO, "%s", report.summary())
    if not kept:
        why = report.describe(_IMAGE_LEVEL) or "no images listed"
        raise DatasetError(f"{report.source}: 0 of {report.num_images} images usable: {why}. Check the image folder, "
                           "the split and the annotation files.")
    if report.num_boxes == 0 and report.unknown_classes:  # every box named another class: surely a typo
        raise DatasetError(f"{report.source}: none of its boxes belongs to the classes {list(class_names)}: "
                           f"{report.describe(['unknown_classes'])}. Name classes the annotations use (--classes).")
    return DetectionDataset(kept, class_names, category_ids=category_ids, keep_difficult=keep_difficult, report=report,
                            source=report.source)


def _clean_box(xyxy: Sequence[float], width: int, height: int, report: DatasetReport, where: str
               ) -> tuple[float, float, float, float] | None:
    """Clip a box (finite coordinates: both readers check them) to the image; ``None`` (and a note) if it is
    empty after clipping."""
    x1, y1, x2, y2 = xyxy
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
               min(max(y2, 0.0), height))  # fmt: skip
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report.note("degenerate_boxes", f"{where}: {[round(v, 2) for v in xyxy]}")
        return None
    if clipped != (x1, y1, x2, y2):
        report.note("clipped_boxes", f"{where}: {[round(v, 2) for v in xyxy]}")
    return clipped


def _check_image(path: Path, annotated: tuple[int | None, int | None], report: DatasetReport, name: str
                 ) -> tuple[int, int] | None:
    """Size of the image file (header read), noting missing/unreadable/degenerate files and wrong sizes
    (``annotated``: the annotation's width and height, ``None`` where it gives none)."""
    if not path.is_file():
        report.note("missing_images", name)
        return None
    try:
        size = read_image_size(path)
    except InvalidImageError as exc:
        report.note("unreadable_images", f"{name}: {exc.reason}: {exc}")
        return None
    if max(size) > MAX_ASPECT_RATIO * min(size):
        report.note("degenerate_images", f"{name}: {size[0]}x{size[1]}")
        return None
    if None not in annotated and annotated != size:
        report.note("size_mismatches", f"{name}: annotated {annotated[0]}x{annotated[1]}, file {size[0]}x{size[1]}")
    return size


def _positive_int(value: Any) -> int | None:
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _climbs_out(name: str) -> bool:
    """Whether a file name from an annotation is absolute or leaves its folder with ``..``."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(PureWindowsPath(name).drive) or ".." in PurePosixPath(posix).parts


def _image_path(root: Path, name: str, report: DatasetReport, allow_outside_root: bool, where: str) -> Path | None:
    """``root / name``; ``None`` (noted as ``outside_root``) if ``name`` leaves ``root`` and that is not allowed."""
    if _climbs_out(name):
        if not allow_outside_root:
            report.note("outside_root", f"{where}: {name!r} refused")
            return None
        report.note("outside_root", f"{where}: {name!r} allowed (allow_outside_root=True)")
    return root / name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segmentation_problem(segmentation: Any, width: int, height: int) -> str | None:
    """What is wrong with a COCO ``segmentation`` for a ``width x height`` image, or ``None`` if usable.

    Usable: absent/empty (the box then serves as mask), a list of polygons (each an even number,
    at least 6, of finite coordinates, not entirely outside the image), or an RLE dict whose
    ``size`` is ``[height, width]`` and whose ``counts`` is a list of non-negative integers summing
    to ``height * width`` or a compressed RLE string.

    Example:
        >>> segmentation_problem([[0, 0, 10, 0, 10, 10]], 20, 20) is None
        True
        >>> segmentation_problem([[50, 50, 60, 50, 60, 60]], 20, 20)
        'polygon 0 lies outside the 20x20 image'
    """
    if segmentation is None or segmentation == []:
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            return f"RLE size {size!r} is not [height, width]"
        if list(size) != [height, width]:
            return f"RLE size {list(size)} differs from the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                return "RLE counts are not non-negative integers summing to height x width"
            return None
        if isinstance(counts, str):
            if not counts or any(not 48 <= ord(c) < 112 for c in counts):
                return "compressed RLE counts hold characters outside COCO's alphabet"
            return None
        return f"RLE counts must be a list or a string, got {type(counts).__name__}"
    if not isinstance(segmentation, list):
        return f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}"
    for i, polygon in enumerate(segmentation):
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            return f"polygon {i} is not a list of at least 3 x, y pairs"
        if not all(_is_number(v) for v in polygon):
            return f"polygon {i} holds non-numeric or non-finite coordinates"
        xs, ys = polygon[0::2], polygon[1::2]
        if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
            return f"polygon {i} lies outside the {width}x{height} image"
    return None


def _check_class_list(wanted: Sequence[str] | None, report: DatasetReport, unknown_classes: str) -> None:
    """``unknown_classes="error"``: refuse a dataset whose annotations name classes not in ``class_names``."""
    if unknown_classes not in ("drop", "error"):
        raise ConfigError(f"unknown_classes must be 'drop' or 'error', got {unknown_classes!r}")
    if unknown_classes == "error" and report.unknown_classes:
        raise DatasetError(
            f"{report.source}: {report.describe(['unknown_classes'])} not in the class list {list(wanted or [])}. "
            "Fix the annotations, add the classes, or drop them (--unknown-classes drop)."
        )


def _note_similar_names(names: Sequence[str], report: DatasetReport) -> None:
    """Count class names that differ only by case or a letter or two (``racoon`` next to ``raccoon``)."""
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            if name.lower() == other.lower() or difflib.SequenceMatcher(None, name, other).ratio() >= 0.85:
                report.note("similar_class_names", f"{name!r} / {other!r}")


def load_coco(annotation_json: str | Path, image_root: str | Path, *, class_names: Sequence[str] | None = None,
              keep_empty: bool = True, unknown_classes: str = "drop", allow_outside_root: bool = False
              ) -> DetectionDataset:
    """Read a COCO-format detection set (``images``, ``annotations`` with ``bbox`` xywh, ``categories``).

    ``image_root``: the folder ``images[*].file_name`` are relative to. ``class_names`` default to
    every category, ordered by id (label ``i + 1`` is the i-th id); the other arguments are
    :func:`load_voc`'s. Every record is type-checked once, here (ids integers, ``bbox`` four finite
    numbers, ``iscrowd`` 0 or 1, ``segmentation`` as :func:`segmentation_problem` accepts); records
    that fail are dropped (a bad segmentation: the box is used as mask) and counted in the report.
    Original image and category ids are kept (``dataset.category_ids``), so results can be scored
    against the original JSON. Crowd regions stay in the ground truth, out of training targets.
    """
    path = Path(annotation_json)
    report = DatasetReport(source=str(path), format="coco")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"COCO annotation file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot parse COCO annotations: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not COCO annotations (expected an object with an 'images' list)")
    root = Path(image_root)

    class_names, category_ids, label_of, category_names = _coco_categories(data.get("categories"), class_names, path)

    images: dict[int, dict[str, Any]] = {}
    for position, entry in enumerate(data["images"]):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not _is_int(image_id) or not isinstance(file_name, str) or not file_name.strip():
            report.note("parse_errors", f"images[{position}]: needs an integer 'id' and a 'file_name'")
            continue
        if image_id in images:
            report.note("duplicate_images", f"images[{position}]: id {image_id} ({file_name})")
            continue
        images[image_id] = entry
    report.num_images = len(images)

    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise DatasetError(f"{path}: 'annotations' must be a list")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for position, ann in enumerate(annotations):
        problem = _annotation_problem(ann)
        if problem is not None:
            report.note("malformed_annotations", f"annotations[{position}]: {problem}")
            continue
        if ann["image_id"] not in images:
            report.note("orphan_annotations", f"annotations[{position}]: image_id {ann['image_id']}")
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)

    records = []
    for image_id, entry in images.items():
        file_name = entry["file_name"]
        image_path = _image_path(root, file_name, report, allow_outside_root, f"images id {image_id}")
        if image_path is None:
            continue
        annotated = (_positive_int(entry.get("width")), _positive_int(entry.get("height")))
        size = _check_image(image_path, annotated, report, file_name)
        if size is None:
            continue
        width, height = size
        boxes = []
        for ann in by_image.get(image_id, []):
            category = ann.get("category_id")
            if category not in label_of:
                known = f" ({category_names[category]!r})" if category in category_names else ""
                report.note("unknown_classes", f"{file_name}: category_id {category}{known}")
                continue
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                report.note("malformed_boxes", f"{file_name}: bbox {bbox!r} is not 4 finite numbers")
                continue
            x, y, w, h = (float(v) for v in bbox)
            problem = segmentation_problem(ann.get("segmentation"), width, height)
            if problem is not None:
                report.note("malformed_segmentations", f"{file_name}: {problem}")
            xyxy = (x, y, x + w, y + h)  # COCO boxes are already 0-based continuous coordinates
            clean = _clean_box(xyxy, width, height, report, file_name)
            if clean is None:
                continue
            area = ann.get("area")
            if clean != xyxy or not isinstance(area, (int, float)) or not area > 0:
                area = (clean[2] - clean[0]) * (clean[3] - clean[1])
            boxes.append(_Box(label_of[category], clean, float(area), iscrowd=bool(ann.get("iscrowd")),
                              segmentation=None if problem is not None else ann.get("segmentation")))
        records.append(_make_record(image_id, image_path, width, height, boxes, file_name))

    _check_class_list(class_names, report, unknown_classes)
    return _finish(records, class_names, report, category_ids=category_ids, keep_difficult=True, keep_empty=keep_empty)


def _annotation_problem(ann: Any) -> str | None:
    """Why a COCO annotation record has the wrong shape (before its box is looked at), or ``None``."""
    if not isinstance(ann, dict):
        return f"not an object ({type(ann).__name__})"
    for key in ("image_id", "category_id"):
        if not _is_int(ann.get(key)):
            return f"{key} {ann.get(key)!r} is not an integer"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {ann.get('iscrowd')!r} is not 0 or 1"
    return None


def _coco_categories(categories: Any, class_names: Sequence[str] | None, path: Path
                     ) -> tuple[list[str], list[int], dict[int, int], dict[int, str]]:
    """Class names, their category ids, ``category id -> label`` and every category of the file by id."""
    found: dict[int, str] = {}
    for category in categories or []:
        if isinstance(category, dict) and isinstance(category.get("id"), int):
            found[category["id"]] = str(category.get("name", category["id"]))
    if class_names is None:
        if not found:
            raise DatasetError(f"{path}: no 'categories'; pass class_names to say which classes exist")
        ids = sorted(found)
        names = [found[i] for i in ids]
        if len(set(names)) != len(names):
            raise DatasetError(f"{path}: category names are not unique: {names}")
        return names, ids, {cid: label for label, cid in enumerate(ids, start=1)}, found
    names = [str(n) for n in class_names]
    id_of_name = {name: cid for cid, name in found.items()}
    next_id = max(found, default=0) + 1
    ids = []
    for name in names:
        if name in id_of_name:
            ids.append(id_of_name[name])
        else:  # a class the file does not know: give it a fresh id
            ids.append(next_id)
            next_id += 1
    return names, ids, {cid: label for label, cid in enumerate(ids, start=1) if cid in found}, found


def _child_dir(root: Path, names: Sequence[str]) -> Path | None:
    """First of ``names`` that is a folder under ``root``, matched exactly, then case-insensitively."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    children = {child.name.lower(): child for child in root.iterdir() if child.is_dir()}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    return None


def _split_file(root: Path, split: str | Path) -> Path:
    """Resolve a split given as a file path or as an ``ImageSets/Main/{split}.txt`` name."""
    given = Path(split)
    path_like = given.is_absolute() or given.suffix != "" or len(given.parts) > 1
    candidates = [given] if path_like else []
    candidates += [root / given, root / "ImageSets" / "Main" / f"{split}.txt", root / f"{split}.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DatasetError(f"split {str(split)!r} not found; tried {tried}")


def _entry_name(entry: str) -> tuple[str, str | None]:
    """Split-list entry -> ``(image id, file name or None)``; entries may be ids or file names."""
    name = Path(entry).name
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return Path(name).stem, name
    if suffix == ".xml":
        return Path(name).stem, None
    return name, None


def load_voc(root: str | Path, split: str | Path | None = None, *, class_names: Sequence[str] | None = None,
             keep_difficult: bool = True, keep_empty: bool = True, unknown_classes: str = "drop",
             allow_outside_root: bool = False) -> DetectionDataset:
    """Read a PASCAL VOC-style set: ``root/Annotations/*.xml`` and ``root/JPEGImages`` (or ``images``).

    Folder names match case-insensitively (``annotations/``, ``images/`` work).

    Args:
        root: the dataset folder.
        split: ``None`` (every XML file), a name of ``root/ImageSets/Main/{split}.txt`` (e.g.
            ``"trainval"``), or a path (absolute or relative to ``root``) of a list with one image
            per line, given as an id (``000005``) or a file name (``raccoon-1.jpg``).
        class_names: classes to keep, in label order (e.g. :data:`VOC_CLASSES`); objects of other
            classes are dropped and counted. Default: every name found, sorted. Pass the training
            set's ``class_names`` when loading its test set so labels agree.
        keep_difficult: put difficult objects in training targets (default ``True``, as detectron2
            does). They are ignored by evaluation either way, as the VOC devkit does.
        keep_empty: keep images without boxes as negatives (``True``) or skip them.
        unknown_classes: with ``class_names``, objects of other classes are ``"drop"``-ped (and
            counted) or refused (``"error"``: DatasetError naming them). Without ``class_names``,
            names that look like typos of each other are counted as ``similar_class_names``.
        allow_outside_root: accept an XML ``<filename>`` that is absolute or climbs out of the
            image folder with ``..`` (still reported as ``outside_root``); refused by default.

    Image ids are the 1-based positions in the split list (or in the sorted XML file list).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"VOC root {root} is not a folder")
    annotation_dir = _child_dir(root, ("Annotations",))
    image_dir = _child_dir(root, ("JPEGImages", "images"))
    if annotation_dir is None or image_dir is None:
        missing = "Annotations/" if annotation_dir is None else "JPEGImages/ (or images/)"
        raise DatasetError(f"{root} is not a VOC folder: no {missing} under it")

    source = str(root) if split is None else f"{root} (split {split})"
    report = DatasetReport(source=source, format="voc")
    if split is None:
        entries = sorted(p.name for p in annotation_dir.glob("*.xml"))
    else:
        lines = _split_file(root, split).read_text(encoding="utf-8").splitlines()
        # First token only: VOC's per-class lists (ImageSets/Main/dog_train.txt) add a flag column.
        entries = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]

    wanted = None if class_names is None else {str(n): i for i, n in enumerate(class_names, start=1)}
    if class_names is not None and len(wanted) != len(class_names):
        raise ConfigError(f"class names must be distinct, got {list(class_names)}")
    parsed: list[tuple[int, Path, int, int, list[VocObject]]] = []
    seen: set[str] = set()
    for position, entry in enumerate(entries, start=1):
        stem, listed_name = _entry_name(entry)
        if stem in seen:
            report.note("duplicate_images", entry)
            continue
        seen.add(stem)
        report.num_images += 1
        item = _parse_voc_xml(annotation_dir, image_dir, stem, listed_name, report, allow_outside_root)
        if item is None:
            continue
        image_path, width, height, objects = item
        kept = []
        for name, xyxy, difficult in objects:
            if wanted is not None and name not in wanted:
                report.note("unknown_classes", f"{stem}.xml: {name!r}")
                continue
            clean = _clean_box(xyxy, width, height, report, f"{stem}.xml")
            if clean is not None:
                kept.append((name, clean, difficult))
        parsed.append((position, image_path, width, height, kept))

    if wanted is None:
        names = sorted({name for *_, objects in parsed for name, _, _ in objects})
        wanted = {name: i for i, name in enumerate(names, start=1)}
        if not names and parsed:
            raise DatasetError(f"{source}: no object with a class name in any annotation; pass class_names")
        _note_similar_names(names, report)
    _check_class_list(list(wanted), report, unknown_classes)
    records = []
    for position, image_path, width, height, objects in parsed:
        boxes = [
            _Box(wanted[name], xyxy, (xyxy[2] - xyxy[0]) * (xyxy[3] - xyxy[1]), difficult=difficult)
            for name, xyxy, difficult in objects
        ]
        records.append(_make_record(position, image_path, width, height, boxes, image_path.name))
    return _finish(records, list(wanted), report, category_ids=None, keep_difficult=keep_difficult,
                   keep_empty=keep_empty)


VocObject = tuple[str, tuple[float, ...], bool]  # name, xyxy, difficult


def _parse_voc_xml(annotation_dir: Path, image_dir: Path, stem: str, listed_name: str | None, report: DatasetReport,
                   allow_outside_root: bool = False) -> tuple[Path, int, int, list[VocObject]] | None:
    """Parse one VOC XML; ``(image path, width, height, [(name, xyxy, difficult)])`` or ``None``."""
    xml_path = annotation_dir / f"{stem}.xml"
    if not xml_path.is_file():
        report.note("missing_annotations", f"{annotation_dir.name}/{xml_path.name}")
        return None
    try:
        tree = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        report.note("parse_errors", f"{xml_path.name}: {exc}")
        return None

    xml_name = (tree.findtext("filename") or "").strip()
    candidates = [listed_name] if listed_name else []
    candidates += [stem + ext for ext in IMAGE_EXTENSIONS] + [stem + ext.upper() for ext in IMAGE_EXTENSIONS]
    image_path = next((image_dir / c for c in candidates if (image_dir / c).is_file()), None)
    if image_path is None and xml_name:  # the <filename> only when the id names no file
        image_path = _image_path(image_dir, xml_name, report, allow_outside_root, xml_path.name)
        if image_path is None:
            return None
        if not image_path.is_file():
            image_path = None
    if image_path is None:
        report.note("missing_images", f"{image_dir.name}/{listed_name or xml_name or stem + '.jpg'}")
        return None
    annotated = (_positive_int(tree.findtext("size/width")), _positive_int(tree.findtext("size/height")))
    size = _check_image(image_path, annotated, report, image_path.name)
    if size is None:
        return None

    objects = []
    for obj in tree.findall("object"):
        name = (obj.findtext("name") or "").strip()
        try:
            coords = [float(obj.findtext(f"bndbox/{k}") or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            coords = [math.nan] * 4
        if not name or not all(math.isfinite(v) for v in coords):
            report.note("malformed_boxes", f"{xml_path.name}: object {name or '(no name)'}")
            continue
        # VOC coordinates are 1-based inclusive pixel indices: (xmin=1, xmax=W) spans the whole
        # image. As detectron2 and torchvision's references do, subtract 1 from xmin/ymin and keep
        # xmax/ymax, giving 0-based continuous coordinates with the box covering [xmin-1, xmax].
        xyxy = (coords[0] - 1.0, coords[1] - 1.0, coords[2], coords[3])
        difficult = (_positive_int(obj.findtext("difficult")) or 0) > 0
        objects.append((name, xyxy, difficult))
    return image_path, size[0], size[1], objects


def _guess_coco_image_root(annotation_json: Path) -> Path:
    """``images/`` next to the JSON or its folder, COCO's ``val2017/`` for ``instances_val2017.json``."""
    folder = annotation_json.parent
    candidates = [folder / "images", folder.parent / "images"]
    if annotation_json.stem.startswith("instances_"):
        split = annotation_json.stem[len("instances_") :]
        candidates += [folder.parent / split, folder.parent / "images" / split]
    return next((c for c in candidates if c.is_dir()), folder)


def load_dataset(path: str | Path, *, image_root: str | Path | None = None, **kwargs: Any) -> DetectionDataset:
    """Load a COCO or VOC dataset, telling the format from the path.

    ``path`` is one of:

    * a COCO ``.json`` file (images in ``image_root`` if given (VOC ignores it), else ``images/`` next to
      it, else the ``val2017/``-style folder of ``instances_val2017.json``, else its folder);
    * a VOC root folder (it has ``Annotations/``), with ``split`` from kwargs;
    * a VOC split list ``.txt`` whose folder is the VOC root (``raccoon/train_split.txt``);
    * a folder holding one COCO json (``annotations.json`` or a single ``*.json`` in it or in
      ``annotations/``).

    Remaining ``kwargs`` go to :func:`load_coco` or :func:`load_voc`.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return load_coco(path, image_root or _guess_coco_image_root(path), **kwargs)
    if path.is_file() and path.suffix.lower() == ".txt":
        if "split" in kwargs:
            raise ConfigError(f"{path} is a split list already; do not pass split as well")
        return load_voc(path.parent, split=path, **kwargs)
    if path.is_dir():
        annotation_dir = _child_dir(path, ("Annotations",))
        if annotation_dir is not None and any(annotation_dir.glob("*.xml")):
            return load_voc(path, **kwargs)
        jsons = sorted(path.glob("*.json")) or sorted((annotation_dir or path / "annotations").glob("*.json"))
        preferred = [j for j in jsons if j.name == "annotations.json"]
        if preferred or len(jsons) == 1:
            json_path = (preferred or jsons)[0]
            return load_coco(json_path, image_root or _guess_coco_image_root(json_path), **kwargs)
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist")
    raise DatasetError(
        f"cannot tell the format of {path}: expected a COCO .json file, a VOC folder with "
        "Annotations/*.xml, or a VOC split list .txt next to Annotations/"
    )


def flip_horizontal(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror an image and its target left-right: ``boxes`` (``x1, y1, x2, y2``) and ``masks`` when present.

    torchvision.transforms.v2 does the geometry (``tv_tensors.BoundingBoxes`` / ``Mask``); plain tensors
    come back, and ``target`` itself is left as it was.
    """
    target = dict(target)
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
    target["boxes"] = tvf.horizontal_flip(boxes).as_subclass(torch.Tensor)
    if "masks" in target:
        target["masks"] = tvf.horizontal_flip(tv_tensors.Mask(target["masks"])).as_subclass(torch.Tensor)
    return tvf.horizontal_flip(image), target


class TrainingSet(Dataset):
    """A :class:`DetectionDataset` for training: horizontal flip with probability ``flip``, masks when asked for.

    An image that fails to decode is skipped (counted in the data report) and replaced by the next
    readable one, so a batch keeps its size and a DataLoader worker never dies on a bad file.
    """

    def __init__(self, dataset: DetectionDataset, masks: bool = False, flip: float = 0.5) -> None:
        self.dataset, self.masks, self.flip = dataset, masks, float(flip)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        size = len(self.dataset)
        for step in range(size):
            picture = self.dataset.try_load_image((index + step) % size)
            if picture is not None:
                index = (index + step) % size
                break
        else:
            raise DatasetError(f"none of the {size} images of {self.dataset.source} can be decoded; see the log")
        image, target = to_tensor(picture), self.dataset.get_target(index, masks=self.masks)
        if torch.rand(()).item() < self.flip:
            image, target = flip_horizontal(image, target)
        return image, target


_PROTOCOLS: dict[str, dict[str, Any]] = {
    # MoCo / InsLoc VOC protocol (detectron2 MIN_SIZE_TRAIN 480..800 step 32, test 800).
    "voc": {"min_size": tuple(range(480, 801, 32)), "max_size": 1333, "test_size": 800},
    # InsLoc COCO protocol (MIN_SIZE_TRAIN 640..800 step 32, test 800).
    "coco": {"min_size": tuple(range(640, 801, 32)), "max_size": 1333, "test_size": 800},
}


def protocol_sizes(name: str) -> dict[str, Any]:
    """Image sizes of the ``"voc"`` or ``"coco"`` fine-tuning protocol: ``{"min_size", "max_size", "test_size"}``.

    ``min_size`` (a tuple) and ``max_size`` go to the torchvision detector: in training its
    ``GeneralizedRCNNTransform`` draws one ``min_size`` per image (multi-scale training); in eval it
    uses ``min_size[-1]``, which equals ``test_size``.
    """
    if name.lower() not in _PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {sorted(_PROTOCOLS)}")
    return dict(_PROTOCOLS[name.lower()])


def collate_detection(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """``DataLoader`` collate function: ``[(image, target), ...] -> ([images], [targets])``."""
    return [image for image, _ in batch], [target for _, target in batch]
