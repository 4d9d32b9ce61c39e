"""Data sets under generated bad records: every bad record is dropped and counted in the report (or
refused with a DatasetError naming it), never a crash mid-run; undecodable images are skipped and
reported by fine-tuning and evaluation; ``--resume`` falls back past unusable checkpoints.

Each case has a timeout, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from insloc_hub.errors import CheckpointError, DatasetError
from insloc_hub.training.cli import main
from insloc_hub.training.runtime import checkpoint as ckpt
from insloc_hub.training.runtime.run import choose_resume
from insloc_hub.training.transfer import finetune as ft
from insloc_hub.training.transfer.detection_data import load_coco, load_voc, segmentation_problem
from insloc_hub.training.transfer.evaluation import run_evaluation
from tests.photos import photo
from tests.training.test_finetune import make_voc, tiny_args

pytestmark = pytest.mark.timeout(60)

SIZE = (64, 48)


def _image(path: Path, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo("coffee").resize(size).save(path, quality=90)


def _coco(root: Path, *, images: list | None = None, annotations: list | None = None) -> Path:
    """Two images with one good box each, plus the given extra records."""
    for i in range(2):
        _image(root / "images" / f"i{i}.jpg")
    base_images = [{"id": 1, "file_name": "i0.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "i1.jpg", "width": 64, "height": 48}]
    base_annotations = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 20, 20], "iscrowd": 0,
                         "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]},
                        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 10, 30, 20], "iscrowd": 0}]
    data = {"images": base_images + list(images or []), "annotations": base_annotations + list(annotations or []),
            "categories": [{"id": 7, "name": "cup"}]}
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def _ann(**fields: Any) -> dict[str, Any]:
    return {"id": 99, "image_id": 1, "category_id": 7, "bbox": [30, 10, 10, 10], "iscrowd": 0, **fields}


# --- COCO annotation types (45 cases) ---------------------------------------------------------


@pytest.mark.parametrize("bbox", ["1234", [1, 2, 3], [1, 2, 3, "4"], ["1", "2", "3", "4"], [1, 2, 3, math.nan],
                                  [1, 2, 3, math.inf], None, {"x": 1}, [True, 2, 3, 4], 1234, [1, 2, 3, 4, 5], [],
                                  [[1, 2], [3, 4]]])
def test_coco_bbox_must_be_four_numbers(tmp_path, bbox):
    dataset = load_coco(_coco(tmp_path, annotations=[_ann(bbox=bbox)]), tmp_path / "images")
    assert dataset.report.malformed_boxes == 1
    assert dataset.report.num_boxes == 2  # the good boxes stay


@pytest.mark.parametrize("field, value", [
    ("image_id", [1]), ("image_id", "1"), ("image_id", 1.5), ("image_id", None), ("image_id", True),
    ("image_id", {"id": 1}), ("category_id", "7"), ("category_id", [7]), ("category_id", 7.0),
    ("category_id", None), ("category_id", False), ("iscrowd", "1"), ("iscrowd", 2), ("iscrowd", -1),
    ("iscrowd", [1]), ("iscrowd", None),
])
def test_coco_annotation_types_are_checked_at_load(tmp_path, field, value):
    dataset = load_coco(_coco(tmp_path, annotations=[_ann(**{field: value})]), tmp_path / "images")
    assert dataset.report.malformed_annotations == 1
    assert field in dataset.report.examples["malformed_annotations"][0]


@pytest.mark.parametrize("record", [5, "annotation", None, [1, 2]])
def test_coco_annotation_that_is_not_an_object(tmp_path, record):
    dataset = load_coco(_coco(tmp_path, annotations=[record]), tmp_path / "images")
    assert dataset.report.malformed_annotations == 1


@pytest.mark.parametrize("entry", [{"id": [3], "file_name": "i0.jpg"}, {"id": "3", "file_name": "i0.jpg"},
                                   {"id": 3, "file_name": ""}, {"id": 3, "file_name": None}, {"id": 3},
                                   {"id": 3, "file_name": 5}, "i0.jpg", {"id": True, "file_name": "i0.jpg"}])
def test_coco_image_entries_are_checked(tmp_path, entry):
    dataset = load_coco(_coco(tmp_path, images=[entry]), tmp_path / "images")
    assert dataset.report.parse_errors == 1 and len(dataset) == 2


SEGMENTATIONS = [
    [[100, 100, 120, 100, 120, 120]],  # right of the 64x48 image
    [[-50, -50, -10, -50, -10, -10]],  # above-left
    [[0, 60, 10, 60, 10, 70]],  # below
    [[1, 2, 3, 4]],  # two points
    [[1, 2, 3, 4, 5]],  # odd length
    [["1", "2", "3", "4", "5", "6"]],
    [[1, 2, 3, 4, 5, math.nan]],
    [1, 2, 3, 4, 5, 6],  # not nested
    "polygon",
    42,
    {"size": [10, 10], "counts": [100]},  # RLE of another size
    {"size": [48, 64], "counts": [5, 5]},  # counts do not cover the image
    {"size": [48, 64], "counts": [-1, 3073]},
    {"size": [48, 64], "counts": "\x00\x01bad"},
    {"size": "48x64", "counts": [3072]},
    {"counts": [3072]},
]


@pytest.mark.parametrize("segmentation", SEGMENTATIONS)
def test_malformed_segmentations_are_reported_and_masks_still_build(tmp_path, segmentation):
    path = _coco(tmp_path, annotations=[_ann(segmentation=segmentation)])
    dataset = load_coco(path, tmp_path / "images")
    assert dataset.report.malformed_segmentations == 1
    for index in range(len(dataset)):  # the box serves as mask: training never stops on it
        target = dataset.get_target(index, masks=True)
        assert target["masks"].shape == (len(target["boxes"]), 48, 64)
        assert target["masks"].sum() > 0


def test_valid_segmentations_pass():
    assert segmentation_problem([[0, 0, 10, 0, 10, 10]], 64, 48) is None
    assert segmentation_problem({"size": [48, 64], "counts": [3072]}, 64, 48) is None
    assert segmentation_problem([[-5, -5, 10, -5, 10, 10]], 64, 48) is None  # partly inside: clipped


# --- file names that leave the image folder (20 cases) ----------------------------------------

ESCAPES = ["../outside.jpg", "/tmp/outside.jpg", "a/../../outside.jpg", "..\\outside.jpg", "C:\\outside.jpg"]


@pytest.mark.parametrize("name", ESCAPES)
def test_coco_file_names_outside_the_root_are_refused(tmp_path, name):
    _image(tmp_path / "outside.jpg")
    dataset = load_coco(_coco(tmp_path, images=[{"id": 3, "file_name": name}]), tmp_path / "images")
    assert dataset.report.outside_root == 1 and len(dataset) == 2
    assert "refused" in dataset.report.examples["outside_root"][0]


def test_coco_file_names_outside_the_root_can_be_allowed_and_are_reported(tmp_path):
    _image(tmp_path / "outside.jpg")
    path = _coco(tmp_path, images=[{"id": 3, "file_name": "../outside.jpg"}])
    dataset = load_coco(path, tmp_path / "images", allow_outside_root=True)
    assert len(dataset) == 3 and dataset.report.outside_root == 1
    assert "allowed" in dataset.report.examples["outside_root"][0]


def _voc(root: Path, objects: list[tuple[str, str]], filename: str | None = None) -> Path:
    """One VOC image per (stem, class name); the image of a stem named ``missing*`` is not written."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for stem, name in objects:
        if not stem.startswith("missing"):
            _image(root / "JPEGImages" / f"{stem}.jpg")
        xml_name = filename if filename is not None else f"{stem}.jpg"
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{xml_name}</filename><size><width>64</width><height>48</height></size>"
            f"<object><name>{name}</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax>"
            "</bndbox></object></annotation>")
    return root


@pytest.mark.parametrize("name", ["../../outside.jpg", "/tmp/outside.jpg", "sub/../../../outside.jpg",
                                  "..\\..\\outside.jpg"])
def test_voc_filename_outside_the_folder_is_refused(tmp_path, name):
    _image(tmp_path / "outside.jpg")
    root = _voc(tmp_path / "voc", [("a", "cat"), ("missing1", "cat")], filename=None)
    _voc(root, [("missing1", "cat")], filename=name)
    dataset = load_voc(root)
    assert dataset.report.outside_root == 1 and len(dataset) == 1


def test_voc_filename_outside_can_be_allowed(tmp_path):
    _image(tmp_path / "outside.jpg")
    root = _voc(tmp_path / "voc", [("a", "cat")])
    _voc(root, [("missing1", "cat")], filename="../../outside.jpg")
    dataset = load_voc(root, allow_outside_root=True)
    assert len(dataset) == 2 and dataset.report.outside_root == 1


# --- class names (12 cases) -------------------------------------------------------------------


@pytest.mark.parametrize("typo", ["racoon", "Raccoon", "raccoons", "raccon", "raccoon "])
def test_similar_class_names_are_reported(tmp_path, typo):
    root = _voc(tmp_path / "voc", [("a", "raccoon"), ("b", "raccoon"), ("c", typo)])
    dataset = load_voc(root)
    if typo.strip() == "raccoon":  # surrounding spaces are stripped: the same class
        assert dataset.class_names == ["raccoon"]
    else:
        assert dataset.report.similar_class_names == 1 and len(dataset.class_names) == 2


@pytest.mark.parametrize("typo", ["racoon", "Raccoon", "dog", "raccoon2"])
def test_fixed_class_list_drops_or_refuses_unknown_names(tmp_path, typo):
    root = _voc(tmp_path / "voc", [("a", "raccoon"), ("b", typo)])
    dropped = load_voc(root, class_names=["raccoon"])
    assert dropped.class_names == ["raccoon"] and dropped.report.unknown_classes == 1
    with pytest.raises(DatasetError, match=rf"unknown.*{typo}"):
        load_voc(root, class_names=["raccoon"], unknown_classes="error")


def test_finetune_classes_flag(tmp_path, capsys):
    root = _voc(tmp_path / "voc", [("a", "cat"), ("b", "cat"), ("c", "ccat")])
    args = tiny_args(root, tmp_path / "run", iterations=1)
    flags = ["finetune"] + [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main([*flags, "--classes", "cat", "--unknown-classes", "error"]) != 0
    assert "ccat" in capsys.readouterr().err
    with pytest.raises(Exception, match="--classes"):
        ft.resolve_config({"data": "d", "output": "o", "classes": "a,,b"})


# --- images: degenerate sizes at load, undecodable ones at run time ---------------------------


@pytest.mark.parametrize("size", [(1, 500), (500, 1), (2, 300), (3000, 2), (1, 101)])
def test_degenerate_aspect_ratios_are_left_out(tmp_path, size):
    root = _voc(tmp_path / "voc", [("a", "cat"), ("b", "cat")])
    Image.new("RGB", size, (90, 90, 90)).save(root / "JPEGImages" / "b.jpg")
    dataset = load_voc(root)
    assert dataset.report.degenerate_images == 1 and len(dataset) == 1


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # the header is intact: caught only at decode


def test_finetune_skips_and_reports_undecodable_images(tmp_path):
    workers = 2  # the skip must cross the worker processes (shared memory) and cause no worker traceback
    voc = make_voc(tmp_path / "voc", 4)
    _truncate(voc / "JPEGImages" / "img1.jpg")
    run = tmp_path / "run"
    args = tiny_args(voc, run, iterations=2, workers=workers, val_data=voc)
    flags = ["finetune"] + [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(flags) == 0
    assert (run / "final" / "model.safetensors").is_file()
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["skipped_at_decode"] == ["img1.jpg: truncated (at decode)"]
    assert report["val"]["skipped_at_decode"] == ["img1.jpg: truncated (at decode)"]
    assert report["train"]["unreadable_images"] == 1


def test_evaluation_leaves_undecodable_images_out_of_the_score(tmp_path):
    voc = make_voc(tmp_path / "voc", 3)
    _truncate(voc / "JPEGImages" / "img2.jpg")
    dataset = load_voc(voc)

    class Empty(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0)} for _ in images]

    result = run_evaluation(Empty(), dataset, num_workers=2, output_dir=tmp_path / "eval")
    assert result.skipped_images == ["img2.jpg: truncated (at decode)"]
    assert result.num_images == 2
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["skipped_images"] == result.skipped_images


# --- --resume ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("resume")
    voc = make_voc(base / "voc", 4)
    args = tiny_args(voc, base / "run", iterations=2, checkpoint_every=1, keep_checkpoints=5)
    cfg, _ = ft.resolve_config(args)
    ft.finetune(cfg)
    return base / "run", args


class _Foreign:
    pass


def _damage(path: Path, damage: str) -> None:
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "foreign":
        torch.save({"model": {}, "obj": _Foreign()}, path)
    elif damage == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif damage == "no-model":
        torch.save({"iteration": 5}, path)
    else:
        state = torch.load(path, weights_only=True)
        state["config"]["lr"] = 123.0
        torch.save(state, path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "not-a-dict", "no-model", "other-config"])
def test_resume_passes_over_an_unusable_newest_checkpoint(finished_run, tmp_path, damage, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    newest = ckpt.list_checkpoints(run)[-1]
    _damage(newest, damage)
    cfg, _ = ft.resolve_config({**finished_run[1], "output": str(run), "resume": "auto"})
    with caplog.at_level("WARNING"):
        path, state, skipped = ckpt.load_newest_usable(
            choose_resume(run, "auto"), lambda p, st: ft._check_resumable(p, st, cfg))
    assert path == ckpt.checkpoint_path(run, 1) and state["iteration"] == 1
    assert len(skipped) == 1 and skipped[0].startswith(newest.name)
    assert f"skipping checkpoint {newest}" in caplog.text


def test_finetune_resume_auto_continues_from_the_older_checkpoint(finished_run, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    _damage(ckpt.list_checkpoints(run)[-1], "foreign")
    cfg, _ = ft.resolve_config({**finished_run[1], "output": str(run), "resume": "auto"})
    with caplog.at_level("INFO"):
        assert ft.finetune(cfg).iterations == 2
    assert f"resumed from {ckpt.checkpoint_path(run, 1)} at iteration 1" in caplog.text


def test_resume_from_a_run_folder(finished_run, tmp_path):
    assert choose_resume(tmp_path / "elsewhere", finished_run[0]) == [
        ckpt.checkpoint_path(finished_run[0], 2), ckpt.checkpoint_path(finished_run[0], 1)]
    assert choose_resume(tmp_path, ckpt.checkpoint_path(finished_run[0], 1)) == [
        ckpt.checkpoint_path(finished_run[0], 1)]


def test_resume_from_a_folder_without_checkpoints_says_what_it_holds(tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"holds no checkpoint_<step>.pt file \(it has: notes.txt\)"):
        choose_resume(tmp_path / "run", folder)


def test_no_usable_checkpoint_lists_each(tmp_path):
    for step in (1, 2):
        ckpt.checkpoint_path(tmp_path, step).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"(?s)no usable checkpoint.*_000000002.pt.*_000000001.pt"):
        ckpt.load_newest_usable(choose_resume(tmp_path, "auto"))
