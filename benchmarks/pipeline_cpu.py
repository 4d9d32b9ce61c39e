"""Per-core throughput of the CPU sample pipeline: the official-style baseline vs ours, same run.

One process, one thread, samples composed one after the other from the same photographs:

* ``official-style (shared/bench/cpu_pipeline.py)`` -- the baseline of issue #13, transcribed as
  functions: PIL, 3 full decodes, background stretch, crop + rescale, hard paste, torchvision's
  ColorJitter / RandomGrayscale, PIL blur, flip, ToTensor + Normalize;
* ``reference`` -- our :class:`InsLocPretrainDataset` with ``pipeline="reference"`` (the specification);
* ``fast`` -- the default ``pipeline="fast"``: torchvision JPEG decodes (PIL ``draft`` where a reduced
  scale is enough), uint8 channels-last resizes, in-place float colour ops (the device composer's);
* ``bytes -> decode_jpeg + compose_batch (cpu)`` and its ``in-batch backgrounds`` variant -- the
  device-agnostic GPU path run on the CPU (workers read bytes; torchvision decode; batched composer).

    python benchmarks/pipeline_cpu.py --photos ../shared/data/raccoon/images --samples 200 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.photos import photo_files, write_synthetic_photos  # noqa: E402
from benchmarks.runner import Row, print_table  # noqa: E402
from insloc_hub.training.pretraining.compose import CompositionConfig  # noqa: E402
from insloc_hub.training.pretraining.pretrain_data import (  # noqa: E402
    InsLocBytesDataset,
    InsLocPretrainDataset,
    UnlabelledImages,
    collate_encoded,
    compose_encoded_batch,
)


def official_style_sampler(files: list[Path], seed: int = 0):
    """``sample(i)`` of ../shared/bench/cpu_pipeline.py (the issue's baseline), as a closure."""
    from PIL import Image, ImageFilter
    from torchvision import transforms as T

    rnd = random.Random(seed)
    blobs = [f.read_bytes() for f in files]
    jit = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    gray = T.RandomGrayscale(0.2)
    norm = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def crop(img):
        W, H = img.size
        for _ in range(10):
            a = rnd.uniform(0.2, 1) * W * H
            r = math.exp(rnd.uniform(math.log(0.5), math.log(2)))
            w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < w <= W and 0 < h <= H:
                x, y = rnd.randint(0, W - w), rnd.randint(0, H - h)
                return img.crop((x, y, x + w, y + h))
        return img

    def view(fg, bgblob):
        bg = Image.open(io.BytesIO(bgblob)).convert("RGB").resize((256, 256), Image.BILINEAR)
        c = crop(fg)
        bw, bh = rnd.randint(128, 254), rnd.randint(128, 254)
        f = min(max(bw, bh) / max(c.size), min(bw, bh) / min(c.size))
        c = c.resize((max(1, int(c.size[0] * f + .5)), max(1, int(c.size[1] * f + .5))), Image.BILINEAR)
        x, y = rnd.randint(0, 256 - c.size[0]), rnd.randint(0, 256 - c.size[1])
        bg.paste(c, (x, y))
        img = gray(jit(bg))
        if rnd.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rnd.uniform(0.1, 2)))
        if rnd.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return norm(img)

    def sample(i: int):
        fg = Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
        return view(fg, rnd.choice(blobs)), view(fg, rnd.choice(blobs))

    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=None, help="folder of JPEGs (default: synthetic photos made here)")
    parser.add_argument("--samples", type=int, default=100, help="samples per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the variants this many times (median)")
    parser.add_argument("--batch", type=int, default=25, help="batch size of the batched (bytes) variants")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.photos) if args.photos else write_synthetic_photos(Path(tmp) / "photos", 64)
        files = photo_files(folder)
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        images = UnlabelledImages([str(f) for f in files])
        cfg = CompositionConfig()
        baseline = official_style_sampler(files)
        datasets = {
            "reference (pipeline='reference')": InsLocPretrainDataset(images, cfg, pipeline="reference"),
            "fast (default)": InsLocPretrainDataset(images, cfg),
        }
        batched = {
            "bytes -> decode_jpeg + compose_batch, cpu": InsLocBytesDataset(images, cfg),
            "same, in-batch backgrounds (1 decode/sample)": InsLocBytesDataset(images, cfg, batch_backgrounds=True),
        }
        n, b = args.samples, args.batch

        def per_sample(ds):
            def run() -> None:
                for i in range(n):
                    ds[(run.epoch, i % len(ds))]
                run.epoch += 1
            run.epoch = 0
            return run

        def per_batch(ds):
            def run() -> None:
                for start in range(0, n, b):
                    batch = collate_encoded([ds[(run.epoch, i % len(ds))] for i in range(start, start + b)])
                    compose_encoded_batch(batch, cfg, torch.device("cpu"))
                run.epoch += 1
            run.epoch = 0
            return run

        variants = {"official-style (shared/bench/cpu_pipeline.py)": lambda: [baseline(i) for i in range(n)]}
        variants.update({name: per_sample(ds) for name, ds in datasets.items()})
        variants.update({name: per_batch(ds) for name, ds in batched.items()})
        for fn in variants.values():  # warm-up: imports, page cache
            fn()
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        wall: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):  # alternate, so changes in machine load hit every variant alike
            for name, fn in variants.items():
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                fn()
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    what = f"InsLoc sample, 256 px, {len(files)} JPEGs ({mean_kb:.0f} kB)"
    rows = []
    # CPU time of the (single-threaded) process is the per-core cost; wall time is shown too, since
    # on a shared machine it also counts waiting for the core.
    for clock, times in (("CPU time", cpu), ("wall time", wall)):
        rows += [Row(f"{what}, 1 core, {clock}", name, statistics.median(t), images=n, baseline=(i == 0),
                     extra={"rounds_s": [round(x, 4) for x in t]})
                 for i, (name, t) in enumerate(times.items())]
    print(f"photos: {folder if args.photos else 'synthetic'}; {n} samples per run, median of {args.rounds} "
          f"alternating rounds; per-round CPU seconds: "
          + "; ".join(f"{k.split(' (')[0]} {' '.join(f'{x:.2f}' for x in v)}" for k, v in cpu.items()))
    print_table(rows, title="CPU sample pipeline (img/s = samples/s per core)", json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
