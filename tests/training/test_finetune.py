"""Fine-tuning: recipes and scaling, the LR schedule, sampler, masks, and short real runs on CPU.

Datasets are made in tmp_path from real photographs (scikit-image samples): crops of the cat
("chelsea") and the cup ("coffee") pasted onto crops of the astronaut and rocket photos, with their
boxes (and polygons for COCO).
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

from insloc_hub.errors import ConfigError
from insloc_hub.training.transfer import finetune as ft
from insloc_hub.training.transfer.detection_data import TrainingSet, load_dataset
from tests.photos import photo

SIZE = (128, 96)  # width, height of every generated image
CLASSES = {"cat": ("chelsea", (80, 150, 280, 300)), "cup": ("coffee", (120, 40, 470, 340))}
BACKGROUNDS = ("astronaut", "rocket")


def _objects(index: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Deterministic layout of image ``index``: one or two objects, boxes in pixels (x1, y1, x2, y2)."""
    rng = np.random.default_rng(index)
    names = ["cat", "cup"] if index % 3 == 0 else [("cat", "cup")[index % 2]]
    out = []
    for k, name in enumerate(names):
        w, h = int(rng.integers(30, 50)), int(rng.integers(26, 40))
        x1 = int(rng.integers(0, SIZE[0] // 2 - w // 2)) + k * SIZE[0] // 2
        y1 = int(rng.integers(0, SIZE[1] - h))
        out.append((name, (x1, y1, min(x1 + w, SIZE[0]), y1 + h)))
    return out


def _render(index: int) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    background = photo(BACKGROUNDS[index % 2]).resize(SIZE)
    objects = _objects(index)
    for name, (x1, y1, x2, y2) in objects:
        source, crop = CLASSES[name]
        background.paste(photo(source).crop(crop).resize((x2 - x1, y2 - y1)), (x1, y1))
    return background, objects


def make_voc(root: Path, num_images: int = 6) -> Path:
    """A VOC folder (JPEGImages/, Annotations/) of ``num_images`` composites; returns ``root``."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image, objects = _render(i)
        image.save(root / "JPEGImages" / f"img{i}.jpg", quality=92)
        xml = "".join(
            f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for n, (x1, y1, x2, y2) in objects
        )
        (root / "Annotations" / f"img{i}.xml").write_text(
            f"<annotation><filename>img{i}.jpg</filename><size><width>{SIZE[0]}</width>"
            f"<height>{SIZE[1]}</height></size>{xml}</annotation>"
        )
    return root


def make_coco(root: Path, num_images: int = 4, with_masks: bool = True) -> Path:
    """A COCO json + images/ of composites (polygons = the pasted rectangles); returns the json path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    categories = [{"id": 7, "name": "cat"}, {"id": 9, "name": "cup"}]
    ids = {c["name"]: c["id"] for c in categories}
    for i in range(num_images):
        image, objects = _render(i)
        image.save(root / "images" / f"c{i}.jpg", quality=92)
        images.append({"id": 100 + i, "file_name": f"c{i}.jpg", "width": SIZE[0], "height": SIZE[1]})
        for name, (x1, y1, x2, y2) in objects:
            ann: dict[str, Any] = {"id": len(annotations) + 1, "image_id": 100 + i, "category_id": ids[name],
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            if with_masks:
                ann["segmentation"] = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            annotations.append(ann)
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def tiny_args(data: Path, output: Path, **extra: Any) -> dict[str, Any]:
    """Flags of a few-step CPU run of a tiny detector at the images' own size."""
    args: dict[str, Any] = {"data": str(data), "output": str(output), "preset": "tiny-fpn", "iterations": 3,
                            "batch_size": 2, "lr": 0.01, "warmup": 1, "min_size": "96", "max_size": 128,
                            "workers": 0, "device": "cpu", "log_every": 1}
    args.update(extra)
    return args


# ----------------------------------------------------------------------------------------------
# Recipes, scaling and the schedule
# ----------------------------------------------------------------------------------------------


def test_recipes_are_the_published_schedules() -> None:
    voc, coco1, coco2 = ft.RECIPES["voc07+12-c4-24k"], ft.RECIPES["coco-1x"], ft.RECIPES["coco-2x"]
    assert (voc.arch, voc.iterations, voc.batch_size, voc.lr, voc.steps, voc.warmup) == (
        "faster_rcnn_c4", 24000, 16, 0.02, (18000, 22000), 100)
    assert (coco1.arch, coco1.iterations, coco1.steps) == ("mask_rcnn_fpn", 90000, (60000, 80000))
    assert (coco2.iterations, coco2.steps) == (180000, (120000, 160000))


def test_recipe_is_linearly_scaled_to_the_batch_used() -> None:
    cfg, notes = ft.resolve_config({"data": "d", "output": "o", "recipe": "voc07+12-c4-24k", "batch_size": 8})
    assert cfg.iterations == 48000 and cfg.steps == [36000, 44000] and cfg.warmup == 200
    assert math.isclose(cfg.lr, 0.01)
    assert cfg.arch == "faster_rcnn_c4"
    assert cfg.min_size == list(range(480, 801, 32)) and cfg.test_size == 800
    assert any("linear scaling" in n and "48000" in n for n in notes)
    cfg16, _ = ft.resolve_config({"data": "d", "output": "o", "recipe": "coco-1x"})
    assert (cfg16.iterations, cfg16.lr, cfg16.batch_size, cfg16.arch) == (90000, 0.02, 16, "mask_rcnn_fpn")
    assert cfg16.min_size == list(range(640, 801, 32))


def test_flags_override_the_recipe() -> None:
    cfg, notes = ft.resolve_config({"data": "d", "output": "o", "recipe": "coco-2x", "batch_size": 4,
                                    "iterations": 900, "lr": 0.5, "min_size": "256-320", "max_size": 500,
                                    "arch": "faster_rcnn_fpn"})
    # steps keep their fractions of the schedule (120k/180k, 160k/180k)
    assert cfg.iterations == 900 and cfg.steps == [600, 800]
    assert cfg.lr == 0.5 and cfg.arch == "faster_rcnn_fpn"
    assert cfg.min_size == [256, 288, 320] and cfg.max_size == 500 and cfg.test_size == 320
    cfg2, _ = ft.resolve_config({"data": "d", "output": "o", "recipe": "coco-1x", "steps": "5,9",
                                 "iterations": 10, "warmup": 50})
    assert cfg2.steps == [5, 9] and cfg2.warmup == 10  # warmup never exceeds the run


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"recipe": "coco-3x"}, "unknown recipe 'coco-3x'"),
        ({"preset": "coco-3x"}, "--preset must be one of"),
        ({"backbone": "tiny-fpn", "preset": "r50-fpn"}, "disagree"),
        ({"arch": "yolo"}, "unknown architecture 'yolo'"),
        ({"steps": "9,5"}, "increasing"),
        ({"min_size": "big"}, "cannot read sizes"),
        ({"detector_opt": ["min_size=3"]}, "--min-size"),
        ({"detector_opt": ["nonsense"]}, "KEY=VALUE"),
        ({"steps": "10,20", "iterations": 2}, r"--steps \[10, 20\]: an LR decay at or after the last iteration"),
        ({"eval_every": 5}, "--eval-every needs --val-data"),
    ],
)
def test_bad_recipe_values_are_refused(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.resolve_config({"data": "d", "output": "o", **flags})


def test_old_names_still_work_for_one_release_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match="--backbone is deprecated: use --preset tiny-fpn"):
        cfg, notes = ft.resolve_config({"data": "d", "output": "o", "backbone": "tiny-fpn"})
    assert cfg.preset == "tiny-fpn" and cfg.recipe is None and "backbone" not in cfg.to_dict()
    assert any(n.startswith("warning: --backbone is deprecated") for n in notes)
    with pytest.warns(DeprecationWarning, match="use --recipe coco-1x"):
        cfg, _ = ft.resolve_config({"data": "d", "output": "o", "preset": "coco-1x", "batch_size": 16})
    assert cfg.recipe == "coco-1x" and cfg.preset is None and cfg.iterations == 90000
    with pytest.raises(ConfigError, match="recipe='coco-1x'"):
        ft.FinetuneConfig(data="d", output="o", preset="coco-1x")


def test_configs_and_checkpoints_written_with_the_old_names_still_load() -> None:
    new, _ = ft.resolve_config({"data": "d", "output": "o", "preset": "tiny-fpn", "recipe": "coco-1x"})
    old = {k: v for k, v in new.to_dict().items() if k not in ("preset", "recipe")}
    old.update(backbone="tiny-fpn", preset="coco-1x")  # a training_args.json of the previous release
    assert ft.FinetuneConfig.from_dict(old) == new
    assert ft.renamed_fields(new.to_dict()) == new.to_dict()
    state = {"model": {}, "optimizer": {}, "iteration": 3,
             "config": {k: v for k, v in old.items() if k in {*new.fingerprint(), "backbone"}}}
    ft._check_resumable(Path("checkpoint_000000003.pt"), state, new)  # no CheckpointError


def test_lr_factor_warms_up_then_steps() -> None:
    assert ft.lr_factor(0, [10, 20], warmup=5) == pytest.approx(0.001)
    assert ft.lr_factor(5, [10, 20], warmup=5) == 1.0
    assert ft.lr_factor(2, [10, 20], warmup=4) == pytest.approx(0.5005)
    assert ft.lr_factor(10, [10, 20], warmup=5) == pytest.approx(0.1)
    assert ft.lr_factor(25, [10, 20], warmup=5) == pytest.approx(0.01)


def test_infinite_sampler_splits_ranks_and_resumes() -> None:
    def take(sampler: ft.InfiniteSampler, n: int) -> list[int]:
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(ft.InfiniteSampler(5, seed=3), 20)
    assert sorted(single[:5]) == list(range(5)) and sorted(single[5:10]) == list(range(5))
    rank0 = take(ft.InfiniteSampler(5, seed=3, rank=0, world_size=2), 10)
    rank1 = take(ft.InfiniteSampler(5, seed=3, rank=1, world_size=2), 10)
    assert rank0 == single[0::2] and rank1 == single[1::2]
    assert take(ft.InfiniteSampler(5, seed=3, start=7), 5) == single[7:12]
    assert take(ft.InfiniteSampler(5, seed=3, rank=1, world_size=2, start=3), 3) == single[7:12:2]


def test_coco_polygons_become_masks_that_flip_with_the_image(tmp_path: Path) -> None:
    dataset = load_dataset(make_coco(tmp_path))
    train = TrainingSet(dataset, masks=True, flip=0.0)
    image, target = train[0]
    assert target["masks"].shape == (len(target["boxes"]), SIZE[1], SIZE[0])
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    mask = target["masks"][0]
    assert mask[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].all() and int(mask.sum()) <= (x2 - x1 + 1) * (y2 - y1 + 1)
    flipped = TrainingSet(dataset, masks=True, flip=1.0)
    image_f, target_f = flipped[0]
    assert torch.equal(image_f, image.flip(-1)) and torch.equal(target_f["masks"], target["masks"].flip(-1))
    assert torch.allclose(target_f["boxes"][:, [0, 2]], SIZE[0] - target["boxes"][:, [2, 0]])


def test_mask_rcnn_without_masks_is_refused(tmp_path: Path) -> None:
    voc = load_dataset(make_voc(tmp_path / "voc", 2))
    with pytest.raises(ConfigError, match="boxes only"):
        ft.require_masks(voc)
    coco = load_dataset(make_coco(tmp_path / "coco", 2, with_masks=False))
    with pytest.raises(ConfigError, match="has a 'segmentation'"):
        ft.require_masks(coco)


# ----------------------------------------------------------------------------------------------
# What --init puts into the detector
# ----------------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **flags: Any) -> ft.FinetuneConfig:
    cfg, _ = ft.resolve_config({"data": "d", "output": str(tmp_path / "run"), **flags})
    return cfg


def test_trunk_only_folder_loads_the_trunk_and_leaves_fpn_and_head_fresh(tmp_path: Path) -> None:
    from insloc_hub.models import BackboneConfig, InsLocBackbone
    from insloc_hub.pretrained import save_pretrained

    arch = BackboneConfig(depth=18, width=16, fpn_channels=32, head_channels=32, head_fc=64, parts=("trunk",))
    folder = save_pretrained(InsLocBackbone(arch), tmp_path / "moco-like")
    model, report = ft.build_model(_cfg(tmp_path, init=str(folder)), ["raccoon"], "bn")
    assert report["pretrained_parts"] == ["trunk"]
    assert report["loaded"] and all(k.startswith("backbone.trunk.") for k in report["loaded"])
    assert any(k.startswith("backbone.fpn.") for k in report["new"])
    assert any(k.startswith("roi_heads.box_head.") for k in report["new"])
    assert model.roi_heads.box_predictor.cls_score.out_features == 2


def test_reinit_flag_leaves_the_named_layers_fresh(tmp_path: Path) -> None:
    from insloc_hub.models import InsLocBackbone
    from insloc_hub.pretrained import save_pretrained
    from insloc_hub.training.cli import build_parser

    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "insloc")
    args = build_parser().parse_args(["finetune", "--data", "d", "--output", str(tmp_path / "run"), "--init",
                                      str(folder), "--reinit", "box_head.fc1, fpn"])
    cfg, _ = ft.resolve_config(args)
    assert cfg.reinit == ["box_head.fc1", "fpn"]
    _, report = ft.build_model(cfg, ["raccoon"], "bn")
    assert report["ignored"]["box_head.fc1.weight"] == "left at its fresh initialisation (reinit)"
    assert "roi_heads.box_head.fc1.weight" in report["new"]
    assert any(k.startswith("backbone.fpn.") for k in report["new"])
    assert "roi_heads.box_head.convs.0.conv.weight" in report["loaded"]
    with pytest.raises(ConfigError, match="needs a pretrained --init"):
        ft.build_model(_cfg(tmp_path, reinit=["box_head.fc1"]), ["raccoon"], "bn")


def test_c4_folder_fills_the_res5_head_and_fpn_folder_is_refused_for_c4(tmp_path: Path) -> None:
    from insloc_hub.models import InsLocBackbone
    from insloc_hub.pretrained import save_pretrained

    c4 = save_pretrained(InsLocBackbone("tiny-c4"), tmp_path / "c4")
    _, report = ft.build_model(_cfg(tmp_path, init=str(c4), arch="faster_rcnn_c4"), ["raccoon"], "bn")
    assert any(k.startswith("roi_heads.box_head.") for k in report["loaded"])  # res5 as the RoI head
    fpn = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "fpn")
    with pytest.raises(ConfigError, match="needs a c4 backbone"):
        ft.build_model(_cfg(tmp_path, init=str(fpn), arch="faster_rcnn_c4"), ["raccoon"], "bn")
