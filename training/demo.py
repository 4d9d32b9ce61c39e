"""``insloc-train demo``: the whole pipeline on embedded defaults, in a few minutes on a CPU.

1. unlabelled images: scikit-image's sample photographs (shipped with the package, no download);
2. InsLoc pretraining with the ``tiny`` preset (the real engine, about 150 steps);
3. a small detection set made from those photographs: crops of one photo (the cat) pasted on
   others, with their boxes, written as a VOC folder (train and test splits);
4. fine-tuning a Faster R-CNN FPN from the pretrained hub folder, then evaluation on the test
   split with pycocotools (AP, AP50, AP75, detections JSON, a picture with boxes);
5. exporting the detector to ONNX (parity-checked) with ``insloc-export``, serving it with
   ``insloc-serve`` and sending one test photo over HTTP (JSON printed, annotated PNG written).

Every stage runs the same code as ``insloc-train pretrain``, ``finetune`` and ``eval``; the output
folder keeps the pretrained backbone and the fine-tuned detector as hub folders.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from insloc_hub.configs import int_at_least, output_folder
from insloc_hub.errors import InsLocError

# colour photographs shipped inside scikit-image (skimage.data), used as unlabelled images
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "logo")
OBJECT_PHOTO, OBJECT_BOX = "chelsea", (40, 0, 400, 300)  # the cat's face in skimage.data.chelsea()


def _photos() -> dict[str, Image.Image]:
    try:
        from skimage import data
    except ImportError as exc:
        raise InsLocError("the demo's photographs come from scikit-image: pip install 'insloc-hub[demo]'") from exc
    photos = {}
    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            array = np.asarray(loader())
        except Exception:  # noqa: BLE001 - some skimage images need a download; skip those
            continue
        if array.ndim == 3 and array.shape[2] >= 3:
            photos[name] = Image.fromarray(array[..., :3].astype(np.uint8))
    if OBJECT_PHOTO not in photos or len(photos) < 4:
        raise InsLocError("scikit-image's sample photographs are incomplete in this installation")
    return photos


def write_unlabelled(photos: dict[str, Image.Image], folder: Path, copies: int, seed: int) -> Path:
    """Random crops of every photograph, as JPEG files (the pretraining images)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, photo in photos.items():
        w, h = photo.size
        for i in range(copies):
            cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            photo.crop((x, y, x + cw, y + ch)).save(folder / f"{name}_{i}.jpg", quality=90)
    return folder


def write_detection_set(photos: dict[str, Image.Image], root: Path, train: int, test: int, size: int,
                        seed: int) -> tuple[Path, Path]:
    """A VOC folder: backgrounds from the other photos, 1-2 pasted cats each, and split lists."""
    rng = random.Random(seed)
    cat = photos[OBJECT_PHOTO].crop(OBJECT_BOX)
    backgrounds = [p for n, p in photos.items() if n != OBJECT_PHOTO]
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    ids = []
    for index in range(train + test):
        bg = rng.choice(backgrounds)
        w, h = bg.size
        crop = min(w, h)
        x, y = rng.randint(0, w - crop), rng.randint(0, h - crop)
        canvas = bg.crop((x, y, x + crop, y + crop)).resize((size, size), Image.BILINEAR)
        objects = []
        for _ in range(rng.randint(1, 2)):
            side = rng.randint(size // 5, size // 2)
            cw, ch = side, int(side * rng.uniform(0.8, 1.25))
            ox, oy = rng.randint(0, size - cw), rng.randint(0, size - ch)
            canvas.paste(cat.resize((cw, ch), Image.BILINEAR), (ox, oy))
            objects = [o for o in objects if not _covered(o, (ox, oy, ox + cw, oy + ch))]
            objects.append((ox, oy, ox + cw, oy + ch))
        image_id = f"demo_{index:03d}"
        canvas.save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, size, objects))
        ids.append(image_id)
    train_list, test_list = root / "train.txt", root / "test.txt"
    train_list.write_text("\n".join(ids[:train]) + "\n")
    test_list.write_text("\n".join(ids[train:]) + "\n")
    return train_list, test_list


def _covered(box: tuple[int, ...], by: tuple[int, ...]) -> bool:
    """True when a later paste hides more than half of an earlier object."""
    ix = max(0, min(box[2], by[2]) - max(box[0], by[0]))
    iy = max(0, min(box[3], by[3]) - max(box[1], by[1]))
    return ix * iy > 0.5 * (box[2] - box[0]) * (box[3] - box[1])


def _voc_xml(image_id: str, size: int, boxes: list[tuple[int, ...]]) -> str:
    objects = "".join(
        f"<object><name>cat</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for x1, y1, x2, y2 in boxes
    )
    return (f"<annotation><filename>{image_id}.jpg</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size>{objects}</annotation>\n")


def run_demo(args: argparse.Namespace) -> int:
    from insloc_hub.training.cli import main as train_cli

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    photos = _photos()
    unlabelled = write_unlabelled(photos, out / "unlabelled", copies=args.copies, seed=args.seed)
    train_list, test_list = write_detection_set(photos, out / "detection", args.train_images, args.test_images,
                                                args.image_size, args.seed)
    print(f"[1/3] data: {len(list(unlabelled.iterdir()))} unlabelled images from {len(photos)} photographs; "
          f"{args.train_images} train / {args.test_images} test detection images in {out / 'detection'}")

    def stage(name: str, argv: list[str]) -> None:
        t = time.perf_counter()
        code = train_cli(argv)
        timings[name] = time.perf_counter() - t
        if code != 0:
            raise InsLocError(f"the demo's {name} stage failed (exit {code}); see the messages above")

    stage("pretrain", ["pretrain", "--preset", "tiny", "--data", str(unlabelled), "--output", str(out / "pretrain"),
                       "--epochs", str(args.pretrain_epochs), "--seed", str(args.seed), "--workers", "0",
                       "--resume", "auto"])
    backbone = out / "pretrain" / "final"
    print(f"[2/3] pretrained backbone hub folder: {backbone} ({timings['pretrain']:.0f}s)")
    stage("finetune", ["finetune", "--data", str(train_list), "--val-data", str(test_list), "--output",
                       str(out / "finetune"), "--init", str(backbone), "--arch", "faster_rcnn_fpn",
                       "--iterations", str(args.finetune_iterations), "--batch-size", "4", "--lr", "0.02",
                       "--min-size", str(args.image_size), "--max-size", str(args.image_size),
                       "--test-size", str(args.image_size), "--workers", "0", "--seed", str(args.seed),
                       "--resume", "auto"])
    detector = out / "finetune" / "final"
    stage("eval", ["eval", str(detector), "--data", str(test_list), "--output", str(out / "eval")])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    print(f"[3/3] fine-tuned detector hub folder: {detector} ({timings['finetune']:.0f}s); "
          f"evaluation in {out / 'eval'}")
    if args.serve:
        _serve_stage(detector, out, test_list, timings)
    summary = {"AP": metrics["ap"], "AP50": metrics["ap50"], "AP75": metrics["ap75"], "stage_seconds": timings,
               "seconds": time.perf_counter() - start}  # eval/metrics.json is EvalResult.to_dict()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"demo done in {summary['seconds']:.0f}s: test AP {summary['AP']:.3f}, AP50 {summary['AP50']:.3f}, "
          f"AP75 {summary['AP75']:.3f} (COCO-style, pycocotools); load the detector with "
          f"insloc_hub.from_pretrained({str(detector)!r})")
    return 0


def _serve_stage(detector: Path, out: Path, test_list: Path, timings: dict[str, float]) -> None:
    """Export to ONNX (parity-checked), serve it with insloc-serve, detect on one test photo over HTTP."""
    import importlib.util

    from insloc_hub.training.demo_serve import CONFIDENT_SCORE, export_and_serve

    if importlib.util.find_spec("insloc_hub.export.cli") is None:  # a check, not an import of export's code
        print("[export and serve] skipped: insloc-export is not installed in this environment")
        return
    t = time.perf_counter()
    photo = out / "detection" / "JPEGImages" / f"{test_list.read_text().split()[0]}.jpg"
    answer = export_and_serve(detector, photo, out / "serve")
    timings["export+serve"] = time.perf_counter() - t
    print(f"[export and serve] exported {out / 'serve' / 'detector.onnx'} (parity checked), served it with "
          f"insloc-serve and sent {photo.name} over HTTP ({timings['export+serve']:.0f}s); "
          f"detections scoring >= {CONFIDENT_SCORE}:")
    print(json.dumps(answer, indent=2))
    print(f"annotated picture: {out / 'serve' / 'served_annotated.png'}")


def add_subcommands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="pretrain -> fine-tune -> evaluate on bundled photographs (a few minutes on CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=output_folder, default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--pretrain-epochs", type=int_at_least(1), default=30,
                        help="tiny-preset epochs over the photo crops")
    parser.add_argument("--finetune-iterations", type=int_at_least(1), default=300)
    parser.add_argument("--copies", type=int_at_least(1), default=8, help="random crops per photograph for pretraining")
    parser.add_argument("--train-images", type=int_at_least(1), default=32)
    parser.add_argument("--test-images", type=int_at_least(1), default=16)
    parser.add_argument("--image-size", type=int_at_least(64), default=256, help="image side (at least 64)")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--no-serve", dest="serve", action="store_false",
                        help="stop after evaluation (skip exporting to ONNX and serving it over HTTP)")
    parser.set_defaults(func=run_demo)
