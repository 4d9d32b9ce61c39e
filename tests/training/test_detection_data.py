"""COCO / VOC readers, the dataset contract, transforms and protocols of insloc_hub.training.transfer.detection_data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from insloc_hub.errors import ConfigError, DatasetError
from insloc_hub.training.transfer.detection_data import (
    DetectionDataset,
    TrainingSet,
    collate_detection,
    flip_horizontal,
    load_coco,
    load_dataset,
    load_voc,
    protocol_sizes,
)

RACCOON = Path(__file__).resolve().parents[3] / "shared/data/raccoon"

# ------------------------------------------------------------------------------------------------
# Writers of small datasets
# ------------------------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_voc_xml(
    path: Path,
    filename: str,
    size: tuple[int, int] | None,
    objects: list[dict[str, Any]],
) -> None:
    """objects: dicts with name, box (xmin, ymin, xmax, ymax, 1-based), optional difficult."""
    parts = [f"<annotation><filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        parts.append(
            f"<object><name>{obj['name']}</name><difficult>{int(obj.get('difficult', 0))}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))


def make_voc(root: Path, items: dict[str, dict[str, Any]], *, ann="Annotations", img="JPEGImages") -> Path:
    """items: id -> {"size": (w, h), "objects": [...], "image": bool, "xml_size": (w, h) | None}."""
    for stem, item in items.items():
        size = item.get("size", (40, 30))
        if item.get("image", True):
            write_image(root / img / f"{stem}.jpg", size)
        write_voc_xml(root / ann / f"{stem}.xml", f"{stem}.jpg", item.get("xml_size", size), item["objects"])
    return root


def make_coco(root: Path, data: dict[str, Any], images: dict[str, tuple[int, int]]) -> Path:
    for name, size in images.items():
        write_image(root / "images" / name, size)
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def coco_data() -> dict[str, Any]:
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 20, "file_name": "b.png", "width": 50, "height": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 40.0, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 20, 10], "iscrowd": 1},
            {"id": 3, "image_id": 20, "category_id": 3, "bbox": [1, 1, 4, 4], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


# ------------------------------------------------------------------------------------------------
# VOC
# ------------------------------------------------------------------------------------------------


def test_voc_reads_boxes_one_based_and_class_names(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "0001": {"objects": [{"name": "dog", "box": (1, 1, 10, 20)}, {"name": "cat", "box": (5, 6, 40, 30)}]},
            "0002": {"objects": [{"name": "dog", "box": (2, 3, 4, 5)}]},
        },
    )
    ds = load_voc(root)
    assert ds.class_names == ["cat", "dog"]  # sorted when not given
    assert ds.num_classes == 2 and len(ds) == 2 and ds.image_ids == [1, 2]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert image[0].min() > 0.95 and image[1:].max() < 0.05  # red (JPEG): RGB order, in [0, 1]
    # 1-based inclusive (1, 1, 10, 20) -> 0-based continuous (0, 0, 10, 20); whole image stays whole.
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 40.0, 30.0]]
    assert target["labels"].tolist() == [2, 1]
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert target["area"].tolist() == [200.0, 900.0]
    assert target["image_id"] == 1
    assert target["iscrowd"].tolist() == [0, 0] and target["difficult"].tolist() == [False, False]

    given = load_voc(root, class_names=["dog", "cat"])
    assert given.class_names == ["dog", "cat"]
    assert given[0][1]["labels"].tolist() == [1, 2]


def test_voc_difficult_kept_for_training_by_flag_and_ignored_in_coco_dict(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "a": {
                "objects": [
                    {"name": "dog", "box": (1, 1, 10, 10)},
                    {"name": "dog", "box": (11, 11, 20, 20), "difficult": 1},
                ]
            }
        },
    )
    kept = load_voc(root)
    target = kept.get_target(0)
    assert target["difficult"].tolist() == [False, True] and len(target["boxes"]) == 2
    dropped = load_voc(root, keep_difficult=False)
    assert dropped.get_target(0)["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]]
    for ds in (kept, dropped):  # evaluation ground truth is the same either way
        anns = ds.to_coco_dict()["annotations"]
        assert [(a["iscrowd"], a["ignore"]) for a in anns] == [(0, 0), (1, 1)]
        assert anns[1]["difficult"] == 1 and anns[1]["bbox"] == [10.0, 10.0, 10.0, 10.0]
    assert kept.report.num_difficult == 1


def test_voc_clips_and_drops_degenerate_boxes(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "a": {
                "objects": [
                    {"name": "dog", "box": (-5, 1, 60, 10)},  # clipped to the 40 x 30 image
                    {"name": "dog", "box": (10, 10, 5, 20)},  # xmax < xmin
                    {"name": "dog", "box": (50, 40, 60, 50)},  # fully outside
                    {"name": "dog", "box": (3, 3, "x", 9)},  # not a number
                ]
            }
        },
    )
    ds = load_voc(root)
    assert ds.get_target(0)["boxes"].tolist() == [[0.0, 0.0, 40.0, 10.0]]
    assert ds.report.clipped_boxes == 1
    assert ds.report.degenerate_boxes == 2
    assert ds.report.malformed_boxes == 1
    assert all("a.xml" in e for e in ds.report.examples["degenerate_boxes"])


def test_voc_images_without_boxes_kept_or_skipped(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {"a": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}]}, "b": {"objects": []}},
    )
    kept = load_voc(root)
    assert len(kept) == 2 and kept.report.num_negatives == 1
    assert kept.get_target(1)["boxes"].shape == (0, 4)
    skipped = load_voc(root, keep_empty=False)
    assert len(skipped) == 1 and skipped.report.skipped_empty == 1
    assert skipped.report.examples["skipped_empty"] == ["b.jpg"]


def test_voc_reports_missing_images_unknown_classes_and_bad_xml(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "a": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}, {"name": "zebra", "box": (1, 1, 5, 5)}]},
            "b": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}], "image": False},
            "c": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}], "image": False},
        },
    )
    (root / "Annotations" / "d.xml").write_text("<annotation><object>")  # truncated XML
    write_image(root / "JPEGImages" / "d.jpg")
    with caplog.at_level(logging.WARNING, logger="insloc_hub.training.transfer.detection_data"):
        ds = load_voc(root, class_names=["dog"])
    report = ds.report
    assert len(ds) == 1 and report.num_images == 4 and report.num_usable == 1
    assert report.missing_images == 2
    assert report.examples["missing_images"] == ["JPEGImages/b.jpg", "JPEGImages/c.jpg"]
    assert report.unknown_classes == 1 and "zebra" in report.examples["unknown_classes"][0]
    assert report.parse_errors == 1 and report.examples["parse_errors"][0].startswith("d.xml")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once
    assert "2 missing image files" in warnings[0].getMessage()
    assert "b.jpg" in warnings[0].getMessage()


def test_classes_that_match_no_box_are_refused_with_the_names_found(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": {"objects": [{"name": "raccoon", "box": (1, 1, 5, 5)}]},
                                       "b": {"objects": [{"name": "raccoon", "box": (2, 2, 9, 9)}]}})
    with pytest.raises(DatasetError, match=r"none of its boxes belongs to the classes \['dog', 'cat'\]: 2 boxes of "
                                           r"unknown classes dropped \(e\.g\. .*raccoon"):
        load_voc(root, class_names=["dog", "cat"])
    assert load_voc(root, class_names=["raccoon", "dog"]).report.num_boxes == 2  # one matching class is enough


def test_voc_without_any_usable_image_raises_and_says_why(tmp_path: Path) -> None:
    items = {f"{i:02d}": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}], "image": False} for i in range(12)}
    root = make_voc(tmp_path / "voc", items)
    (root / "JPEGImages").mkdir()
    with pytest.raises(DatasetError, match=r"0 of 12 images usable: 12 missing image files \(e\.g\. JPEGImages/00"):
        load_voc(root)


def test_voc_lowercase_folders_and_split_files_with_file_names(tmp_path: Path) -> None:
    items = {f"img-{i}": {"objects": [{"name": "raccoon", "box": (1, 1, 9, 9)}]} for i in range(4)}
    root = make_voc(tmp_path / "set", items, ann="annotations", img="images")
    (root / "train_split.txt").write_text("img-0.jpg\nimg-1.jpg\n\n")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("img-2\nimg-3\n")
    by_path = load_voc(root, split=root / "train_split.txt")
    assert [r.path.name for r in by_path.records] == ["img-0.jpg", "img-1.jpg"]
    by_relative_path = load_voc(root, split="train_split.txt")
    assert len(by_relative_path) == 2
    by_name = load_voc(root, split="val")
    assert [r.path.name for r in by_name.records] == ["img-2.jpg", "img-3.jpg"]
    assert load_voc(root).image_ids == [1, 2, 3, 4]
    with pytest.raises(DatasetError, match="split 'nope' not found"):
        load_voc(root, split="nope")


def test_voc_uses_the_real_image_size_when_xml_size_is_missing_or_wrong(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "a": {"size": (40, 30), "xml_size": None, "objects": [{"name": "dog", "box": (1, 1, 100, 100)}]},
            "b": {"size": (40, 30), "xml_size": (400, 300), "objects": [{"name": "dog", "box": (1, 1, 100, 100)}]},
        },
    )
    ds = load_voc(root)
    assert [(r.width, r.height) for r in ds.records] == [(40, 30), (40, 30)]
    assert ds.get_target(1)["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]]  # clipped to the real size
    assert ds.report.size_mismatches == 1 and "b.jpg" in ds.report.examples["size_mismatches"][0]


def test_voc_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        load_voc(tmp_path / "absent")
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(DatasetError, match="JPEGImages"):
        load_voc(tmp_path)


# ------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------


def test_coco_reads_categories_crowd_and_ids(tmp_path: Path) -> None:
    path = make_coco(tmp_path, coco_data(), {"a.png": (40, 30), "b.png": (50, 20)})
    ds = load_coco(path, tmp_path / "images")
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [3, 7]  # ordered by category id
    assert ds.image_ids == [10, 20]
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    # crowd regions are not training boxes ...
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0]]
    assert target["labels"].tolist() == [2] and target["area"].tolist() == [40.0]
    assert target["image_id"] == 10
    # ... but stay in the ground truth, with the original ids
    gt = ds.to_coco_dict()
    assert [(a["category_id"], a["iscrowd"]) for a in gt["annotations"]] == [(7, 0), (3, 1), (3, 0)]
    assert gt["categories"] == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert ds.report.num_crowd == 1 and ds.report.problems == {}


def test_coco_reports_problems(tmp_path: Path) -> None:
    data = coco_data()
    data["images"].append({"id": 30, "file_name": "missing.png", "width": 10, "height": 10})
    data["annotations"] += [
        {"id": 4, "image_id": 20, "category_id": 99, "bbox": [1, 1, 2, 2]},  # unknown category
        {"id": 5, "image_id": 20, "category_id": 3, "bbox": [45, 5, 10, 10]},  # clipped at x = 50
        {"id": 6, "image_id": 20, "category_id": 3, "bbox": [5, 5, 0, 4]},  # empty
        {"id": 7, "image_id": 77, "category_id": 3, "bbox": [5, 5, 2, 4]},  # unknown image
        {"id": 8, "image_id": 20, "category_id": 3, "bbox": [5, 5]},  # malformed
    ]
    path = make_coco(tmp_path, data, {"a.png": (40, 30), "b.png": (50, 20)})
    ds = load_coco(path, tmp_path / "images", class_names=["cat"])
    r = ds.report
    assert (r.num_images, r.num_usable) == (3, 2)
    assert r.missing_images == 1 and r.examples["missing_images"] == ["missing.png"]
    assert r.unknown_classes == 2  # the dog (not in class_names) and category 99
    assert r.examples["unknown_classes"] == ["a.png: category_id 7 ('dog')", "b.png: category_id 99"]
    assert r.clipped_boxes == 1 and r.degenerate_boxes == 1 and r.malformed_boxes == 1
    assert r.orphan_annotations == 1
    assert ds.get_target(1)["boxes"].tolist() == [[1.0, 1.0, 5.0, 5.0], [45.0, 5.0, 50.0, 15.0]]
    assert ds.get_target(1)["area"].tolist() == [16.0, 50.0]  # recomputed for the clipped box


def test_coco_parse_errors_and_all_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="bad.json: cannot parse COCO annotations"):
        load_coco(bad, tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match="not COCO annotations"):
        load_coco(tmp_path / "list.json", tmp_path)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco_data()))
    with pytest.raises(DatasetError, match=r"0 of 2 images usable: 2 missing image files \(e\.g\. a\.png, b\.png\)"):
        load_coco(path, tmp_path / "nowhere")


def test_coco_empty_images_kept_or_skipped(tmp_path: Path) -> None:
    data = coco_data()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 10]
    path = make_coco(tmp_path, data, {"a.png": (40, 30), "b.png": (50, 20)})
    assert len(load_coco(path, tmp_path / "images")) == 2
    skipped = load_coco(path, tmp_path / "images", keep_empty=False)
    assert skipped.image_ids == [10] and skipped.report.skipped_empty == 1


def test_coco_dict_round_trips_through_load_coco(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": {"objects": [{"name": "dog", "box": (3, 4, 20, 25)}]}})
    voc = load_voc(root)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(voc.to_coco_dict()))
    again = load_coco(path, root / "JPEGImages")
    assert again.class_names == voc.class_names
    assert torch.equal(again.get_target(0)["boxes"], voc.get_target(0)["boxes"])


# ------------------------------------------------------------------------------------------------
# load_dataset, transforms, protocols, collate
# ------------------------------------------------------------------------------------------------


def test_load_dataset_detects_the_format(tmp_path: Path) -> None:
    voc_root = make_voc(tmp_path / "voc", {"a": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}]}})
    (voc_root / "split.txt").write_text("a.jpg\n")
    coco_json = make_coco(tmp_path / "coco", coco_data(), {"a.png": (40, 30), "b.png": (50, 20)})
    assert load_dataset(voc_root).report.format == "voc"
    assert len(load_dataset(voc_root / "split.txt")) == 1
    assert load_dataset(coco_json).report.format == "coco"  # images/ next to the json
    assert load_dataset(tmp_path / "coco").report.format == "coco"
    assert len(load_dataset(voc_root, split="split.txt")) == 1
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nothing")


def test_flip_horizontal_moves_boxes_and_masks_with_the_pixels() -> None:
    image = torch.zeros(3, 10, 20)
    image[:, :, :5] = 1.0
    masks = torch.zeros(1, 10, 20, dtype=torch.uint8)
    masks[0, 1:4, 0:5] = 1
    target = {"boxes": torch.tensor([[0.0, 1.0, 5.0, 4.0]]), "labels": torch.tensor([1]), "masks": masks}
    flipped, new = flip_horizontal(image, target)
    assert new["boxes"].tolist() == [[15.0, 1.0, 20.0, 4.0]]
    assert flipped[:, :, 15:].min() == 1.0 and flipped[:, :, :15].max() == 0.0
    assert new["masks"][0, 1:4, 15:].all() and int(new["masks"].sum()) == 15
    assert type(new["boxes"]) is torch.Tensor and type(new["masks"]) is torch.Tensor  # no tv_tensors leak out
    assert target["boxes"].tolist() == [[0.0, 1.0, 5.0, 4.0]] and target["masks"] is masks  # input not modified
    twice, back = flip_horizontal(*flip_horizontal(image, target))
    assert torch.equal(twice, image) and torch.equal(back["boxes"], target["boxes"])


def test_protocol_sizes() -> None:
    voc = protocol_sizes("voc")
    assert voc["min_size"] == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert voc["max_size"] == 1333 and voc["test_size"] == 800
    coco = protocol_sizes("COCO")
    assert coco["min_size"] == (640, 672, 704, 736, 768, 800) and coco["min_size"][-1] == coco["test_size"]
    with pytest.raises(ConfigError):
        protocol_sizes("lvis")


def test_collate_and_training_set_flip(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {"a": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}]}, "b": {"objects": []}},
    )
    ds = TrainingSet(load_voc(root), flip=1.0)
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]
    assert targets[0]["boxes"].tolist() == [[35.0, 0.0, 40.0, 5.0]]
    assert targets[1]["boxes"].shape == (0, 4)
    assert collate_detection([]) == ([], [])


def test_dataset_rejects_inconsistent_categories() -> None:
    with pytest.raises(ConfigError):
        DetectionDataset([], ["a", "b"], category_ids=[1])
    with pytest.raises(ConfigError):
        DetectionDataset([], ["a", "a"])


@pytest.mark.skipif(not RACCOON.is_dir(), reason="raccoon data set not present")
def test_raccoon_loads_with_its_split_files() -> None:
    train = load_voc(RACCOON, split=RACCOON / "train_split.txt")
    test = load_voc(RACCOON, split=RACCOON / "test_split.txt", class_names=train.class_names)
    assert train.class_names == ["raccoon"]
    assert (len(train), len(test)) == (160, 40)
    assert train.report.problems == {} and test.report.problems == {}
    image, target = train[0]
    assert image.shape[0] == 3 and len(target["boxes"]) >= 1 and set(target["labels"].tolist()) == {1}
    assert len(load_dataset(RACCOON / "test_split.txt")) == 40


def test_unreadable_and_rotated_images(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "a": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}]},
            "b": {"objects": [{"name": "dog", "box": (1, 1, 5, 5)}]},
        },
    )
    (root / "JPEGImages" / "b.jpg").write_bytes(b"not an image at all")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 30, shown rotated by 90 degrees: 30 x 40
    Image.new("RGB", (40, 30), (0, 0, 255)).save(root / "JPEGImages" / "a.jpg", exif=exif)
    ds = load_voc(root)
    assert len(ds) == 1 and ds.report.unreadable_images == 1
    assert ds.report.examples["unreadable_images"][0].startswith("b.jpg")
    assert (ds.records[0].width, ds.records[0].height) == (30, 40)  # the size decode_image gives
    assert ds[0][0].shape == (3, 40, 30)
