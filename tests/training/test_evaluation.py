"""COCO-style evaluation, result files, pictures and run_evaluation of insloc_hub.training.transfer.evaluation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from insloc_hub.errors import ConfigError
from insloc_hub.training.transfer.detection_data import DetectionDataset, load_coco, load_voc
from insloc_hub.training.transfer.evaluation import (
    EvalResult,
    detections_from_outputs,
    draw_detections,
    evaluate_detections,
    run_evaluation,
    save_examples_grid,
    write_coco_results,
)

# Boxes in VOC 1-based XML coordinates, per image: (class, xmin, ymin, xmax, ymax, difficult).
OBJECTS = {
    "img1": [("cat", 11, 11, 50, 40, 0), ("dog", 61, 21, 90, 70, 0)],
    "img2": [("cat", 5, 5, 25, 25, 0), ("cat", 41, 31, 95, 75, 0), ("dog", 70, 5, 98, 30, 1)],
    "img3": [],
}


def make_dataset(root: Path) -> DetectionDataset:
    for stem, objects in OBJECTS.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 80), (40, 90, 160)).save(root / "JPEGImages" / f"{stem}.png")
        xml = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for n, x1, y1, x2, y2, d in objects
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>100</width><height>80</height></size>"
            f"{xml}</annotation>"
        )
    return load_voc(root)


@pytest.fixture
def dataset(tmp_path: Path) -> DetectionDataset:
    return make_dataset(tmp_path / "voc")


def perfect_detections(ds: DetectionDataset, score: float = 0.9) -> list[dict[str, Any]]:
    gt = ds.to_coco_dict()
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def pycocotools_stats(gt: dict[str, Any], detections: list[dict[str, Any]]) -> np.ndarray:
    """pycocotools called directly, the way its README does."""
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def test_perfect_detections_score_one(dataset: DetectionDataset, capsys: pytest.CaptureFixture) -> None:
    result = evaluate_detections(dataset, perfect_detections(dataset))
    assert result.ap == pytest.approx(1.0) and result.ap50 == pytest.approx(1.0)
    assert result.ap75 == pytest.approx(1.0)
    assert list(result.per_class_ap) == ["cat", "dog"] == list(result.per_class_ap50)
    assert all(v == pytest.approx(1.0) for v in result.per_class_ap.values())
    assert result.num_images == 3 and result.num_ground_truth == 4 and result.num_detections == 4
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_false_positive_matches_pycocotools_exactly(dataset: DetectionDataset) -> None:
    detections = perfect_detections(dataset)
    # A cat where there is none, scored above every true cat: cat precision is 0, 1/2, 2/3, 3/4.
    detections.append({"image_id": 3, "category_id": 1, "bbox": [10.0, 10.0, 30.0, 30.0], "score": 0.95})
    before = copy.deepcopy(detections)
    result = evaluate_detections(dataset, detections)
    expected = pycocotools_stats(dataset.to_coco_dict(), detections)
    assert result.stats == [float(v) for v in expected]  # identical, not approximately equal
    assert (result.ap, result.ap50, result.ap75) == tuple(float(v) for v in expected[:3])
    assert result.per_class_ap["cat"] == pytest.approx(0.75)  # interpolated precision 3/4 everywhere
    assert result.per_class_ap["dog"] == pytest.approx(1.0)
    assert detections == before  # the caller's detections are not modified


def test_no_detections_give_zero(dataset: DetectionDataset) -> None:
    result = evaluate_detections(dataset, [])
    assert result.ap == 0.0 and result.ap50 == 0.0 and result.num_detections == 0
    assert result.per_class_ap == {"cat": 0.0, "dog": 0.0}


def test_difficult_boxes_are_neither_missed_nor_false_positives(dataset: DetectionDataset) -> None:
    detections = perfect_detections(dataset)
    # A detection on the difficult dog of img2 (1-based 70,5,98,30 -> 0-based xywh 69,4,29,26).
    detections.append({"image_id": 2, "category_id": 2, "bbox": [69.0, 4.0, 29.0, 26.0], "score": 0.99})
    assert evaluate_detections(dataset, detections).ap == pytest.approx(1.0)


def test_coco_dict_ground_truth_and_class_names(dataset: DetectionDataset) -> None:
    gt = dataset.to_coco_dict()
    result = evaluate_detections(gt, perfect_detections(dataset), class_names=["Cat", "Dog"])
    assert list(result.per_class_ap) == ["Cat", "Dog"] and result.ap == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="not in the ground truth"):
        evaluate_detections(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ConfigError):
        evaluate_detections(gt, [{"image_id": 1, "bbox": [0, 0, 1, 1]}])


def test_detections_from_outputs_maps_labels_to_category_ids(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (60, 40)).save(root / "images" / "a.png")
    gt = {
        "images": [{"id": 42, "file_name": "a.png", "width": 60, "height": 40}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 17, "bbox": [10, 5, 20, 10], "iscrowd": 0}],
        "categories": [{"id": 5, "name": "person"}, {"id": 17, "name": "cat"}],
    }
    (root / "gt.json").write_text(json.dumps(gt))
    ds = load_coco(root / "gt.json", root / "images")
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]]),
            "labels": torch.tensor([2, 1, 7]),  # 7 is outside 1..C: dropped
            "scores": torch.tensor([0.8, 0.01, 0.9]),
        }
    ]
    results = detections_from_outputs(outputs, ds.image_ids, category_ids=ds.category_ids)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(42, 17), (42, 5)]
    assert results[0]["bbox"] == [10.0, 5.0, 20.0, 10.0] and results[0]["score"] == pytest.approx(0.8)
    kept = detections_from_outputs(outputs, ds.image_ids, category_ids=ds.category_ids, score_threshold=0.5)
    assert len(kept) == 1
    result = evaluate_detections(ds, results)
    assert result.per_class_ap["cat"] == pytest.approx(1.0) and math.isnan(result.per_class_ap["person"])
    with pytest.raises(ConfigError):
        detections_from_outputs(outputs, [1, 2])


def test_results_json_and_pictures(dataset: DetectionDataset, tmp_path: Path) -> None:
    detections = perfect_detections(dataset)
    path = write_coco_results(detections, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == detections
    record = dataset.records[0]
    picture = draw_detections(
        dataset.load_image(0),
        [[10.0, 10.0, 50.0, 40.0]],
        [1],
        [0.87],
        record.boxes,
        record.labels,
        dataset.class_names,
        tmp_path / "one.png",
    )
    with Image.open(tmp_path / "one.png") as png:
        assert png.format == "PNG" and png.size == (100, 80)
    assert picture.getpixel((10, 25)) == (230, 40, 40)  # predicted box edge, red
    grid = save_examples_grid([picture, dataset.load_image(1)], tmp_path / "grid.png", tile_size=64)
    with Image.open(tmp_path / "grid.png") as png:
        assert png.format == "PNG" and png.size == grid.size


class FakeDetector(torch.nn.Module):
    """Returns canned outputs in call order; records the mode and grad state it ran in."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs = list(outputs)
        self.seen: list[tuple[bool, bool, tuple[int, ...]]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.seen += [(self.training, torch.is_grad_enabled(), tuple(image.shape)) for image in images]
        return [self.outputs.pop(0) for _ in images]


def test_run_evaluation_end_to_end_with_a_fake_model(dataset: DetectionDataset, tmp_path: Path) -> None:
    outputs = []
    for record in dataset.records:
        keep = ~record.difficult
        outputs.append(
            {
                "boxes": torch.from_numpy(record.boxes[keep]),
                "labels": torch.from_numpy(record.labels[keep]),
                "scores": torch.full((int(keep.sum()),), 0.9),
            }
        )
    model = FakeDetector(outputs)
    model.train()
    result = run_evaluation(model, dataset, batch_size=2, output_dir=tmp_path / "eval", num_visualize=2)
    assert isinstance(result, EvalResult) and result.ap == pytest.approx(1.0)
    assert model.seen == [(False, False, (3, 80, 100))] * 3  # eval mode, no grad, original size
    assert model.training  # mode restored
    out = tmp_path / "eval"
    assert len(json.loads((out / "detections.json").read_text())) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ap"] == pytest.approx(1.0) and metrics["per_class_ap"]["dog"] == pytest.approx(1.0)
    with Image.open(out / "examples.png") as png:
        assert png.format == "PNG"


def test_run_evaluation_with_a_torchvision_detector(dataset: DetectionDataset) -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    result = run_evaluation(model, dataset, batch_size=3)
    assert len(result.stats) == 12 and 0.0 <= result.ap <= 1.0
    assert set(result.per_class_ap) == {"cat", "dog"}
