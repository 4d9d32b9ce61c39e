"""Does the official InsLoc recipe escape the collapse at its own batch size? One GPU call answers it.

Runs the official recipe -- r50-fpn, global batch 256, canvas 256, queue 65536, lr 0.03, key
momentum 0.999, T 0.2, bf16 autocast on CUDA -- for ``--steps`` (1,000) steps and logs the collapse
diagnostics of ``training/pretraining/diagnostics.py`` every ``--log-every`` (50) steps: in-batch top-1 among
the 256 keys (chance 0.39 %), mean pairwise query/key cosine, per-dimension embedding std (healthy
about 0.088, collapsed towards 0). The cosine schedule is stretched over ``20 x`` the run so the lr
stays at the official value, as in the first 1,000 of the official 1 M steps.

Photographs: ``--photos DIR`` (any folder of images, e.g. the raccoon set), listed repeatedly until
there are ``--min-images``; without it, distinct synthetic photographs are drawn (coloured shapes and
textures over gradients; no download, no scikit-image), so the script runs on a machine that only
has the repository.

Output: ``--output FILE`` (JSON: the config, the diagnostics at every logged step, a verdict, times).

    python benchmarks/collapse_check.py --output runs/collapse.json               # GPU, ~1,000 steps
    python benchmarks/collapse_check.py --smoke --output /tmp/collapse.json        # CPU, < 1 minute

``--smoke`` shrinks everything (tiny-fpn, batch 8, canvas 64, queue 64, 6 steps) to test the path.
Verdict: ``collapsed`` if the collapse monitor fired (documented thresholds: key cosine > 0.95 or std
< 0.25 / sqrt(dim), with in-batch top-1 <= 2 x chance), ``learning`` if the last in-batch top-1 is
above 10 x chance, else ``undecided``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from insloc_hub.training.pretraining import engine
from insloc_hub.training.pretraining.diagnostics import CollapseMonitor

OFFICIAL = dict(arch="r50-fpn", method="insloc", batch_size=256, canvas=256, queue_size=65536, lr=0.03,
                momentum=0.9, nesterov=True, weight_decay=1e-4, key_momentum=0.999, temperature=0.2, box_jitter=True,
                shuffle_bn=True)
SMOKE = dict(arch="tiny-fpn", batch_size=8, canvas=64, queue_size=64)
DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon" / "images"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def synthetic_photo(index: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct 'photograph' for ``index``: a smooth gradient, noise texture and a few shapes."""
    rng = np.random.default_rng(index)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / (w + h) + 0.5
    base = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    base += rng.normal(0, rng.uniform(2, 25), (h, w, 1))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))


def image_list(photos: Path | None, min_images: int, work: Path) -> tuple[Path, str]:
    """A list file of at least ``min_images`` entries (``photos`` repeated, or synthetic photos)."""
    work.mkdir(parents=True, exist_ok=True)
    if photos is not None:
        files = sorted(str(p.resolve()) for p in photos.rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise SystemExit(f"error: no images ({', '.join(EXTENSIONS)}) under {photos}")
        source = f"{len(files)} photographs from {photos}, repeated"
    else:
        folder = work / "synthetic"
        folder.mkdir(exist_ok=True)
        files = []
        for i in range(min_images):
            path = folder / f"{i:05d}.jpg"
            if not path.exists():
                synthetic_photo(i).save(path, quality=90)
            files.append(str(path))
        source = f"{len(files)} distinct synthetic photographs"
    repeats = math.ceil(min_images / len(files))
    listing = work / "images.txt"
    listing.write_text("".join(f + "\n" for _ in range(repeats) for f in files))
    return listing, source


class _TimeUp(Exception):
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the check; returns the JSON-ready result."""
    settings = {**OFFICIAL, **(SMOKE if args.smoke else {})}
    steps = 6 if args.smoke else args.steps
    log_every = 2 if args.smoke else args.log_every
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="collapse-check-"))
    photos = Path(args.photos) if args.photos else (DEFAULT_PHOTOS if DEFAULT_PHOTOS.is_dir() else None)
    if args.synthetic:
        photos = None
    min_images = settings["batch_size"] * (2 if args.smoke else 10)
    listing, source = image_list(photos, min_images, work)
    steps_per_epoch = math.ceil(len(listing.read_text().splitlines()) / settings["batch_size"])
    epochs = 20 * math.ceil(steps / steps_per_epoch)  # the lr stays at the official value for the whole check
    cfg = engine.PretrainConfig.from_dict({
        **settings, "data": str(listing), "output": str(work / "run"), "epochs": epochs, "max_steps": steps,
        "log_every": log_every, "checkpoint_every_steps": 0, "keep_checkpoints": 1, "workers": args.workers,
        "device": args.device, "threads": args.threads, "seed": args.seed, "resume": None,
    })
    start = time.perf_counter()
    stopped_early = False

    def deadline(event: str, info: dict[str, Any]) -> None:
        if args.time_limit and event == "step" and time.perf_counter() - start > args.time_limit:
            raise _TimeUp

    try:
        engine.train(cfg, callbacks=[deadline])
    except _TimeUp:
        stopped_early = True
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
    logged = [r for r in records if "inbatch_top1" in r]
    monitor = CollapseMonitor(cfg.dim, cfg.batch_size)
    collapsed_at = next((r["step"] for r in logged if monitor.is_collapsed(r)), None)
    chance = 100.0 / cfg.batch_size
    if collapsed_at is not None:
        verdict = "collapsed"
    elif logged and logged[-1]["inbatch_top1"] > 10 * chance:
        verdict = "learning"
    else:
        verdict = "undecided"
    keys = ("step", "loss", "lr", "inbatch_top1", "cos_q", "cos_k", "emb_std", "img_per_s",
            *(f"{n}_{lv}" for n in ("inbatch_top1", "cos_k") for lv in ("p2", "p3", "p4", "p5")))
    return {
        "question": "does the official batch-256 InsLoc recipe escape the embedding collapse?",
        "verdict": verdict,
        "collapsed_at_step": collapsed_at,
        "chance_inbatch_top1": chance,
        "healthy_emb_std": 1 / math.sqrt(cfg.dim),
        "steps_done": logged[-1]["step"] if logged else 0,
        "stopped_by_time_limit": stopped_early,
        "wall_s": round(wall, 1),
        "smoke": bool(args.smoke),
        "photos": source,
        "config": {k: getattr(cfg, k) for k in (*OFFICIAL, "epochs", "max_steps", "seed")},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else
        platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "diagnostics": [{k: r[k] for k in keys if k in r} for r in logged],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON results file")
    parser.add_argument("--photos", help="folder of photographs (default: ../shared/data/raccoon/images if present, "
                                         "else synthetic photographs)")
    parser.add_argument("--synthetic", action="store_true", help="use synthetic photographs even if --photos or the "
                                                                 "raccoon folder is available")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--time-limit", type=float, default=270.0,
                        help="stop after this many seconds of training, keeping what was logged (0: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (< 1 minute) to test the script")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="work folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.workers = "cpu", 0
        args.threads = args.threads or 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['verdict']}: collapsed at step {result['collapsed_at_step']}, {result['steps_done']} steps in "
          f"{result['wall_s']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
