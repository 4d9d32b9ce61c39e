"""Photographs for the benchmarks: a folder given by the user, else JPEGs generated at run time.

The generated images need nothing but numpy and PIL (no download, no scikit-image), so the GPU check
runs on a bare machine. They are ImageNet-like in what matters to the data pipeline: sizes (mostly
500x375 / 375x500, some larger), JPEG quality 90, and photo-like content (smooth gradients, shapes,
texture) so that they compress to about the size of real photographs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (width, height) of the generated photos, cycled: ImageNet's common sizes plus a few large ones.
SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (500, 375), (800, 600), (500, 400), (1024, 768))


def synthetic_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image: a colour gradient, random shapes, blur and sensor-like noise."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, (3, 2)).astype(np.float32)
    img = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(20, width // 2)), int(rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _write_one(folder: Path, i: int, seed: int, quality: int) -> None:
    rng = np.random.default_rng([seed, i])  # photo i is the same whatever the number of processes
    synthetic_photo(rng, SIZES[i % len(SIZES)]).save(folder / f"{i:05d}.jpg", quality=quality)


def write_synthetic_photos(folder: str | Path, count: int, seed: int = 0, quality: int = 90,
                           processes: int = 1) -> Path:
    """Write ``count`` synthetic JPEG photos (``00000.jpg``...) into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if processes > 1 and count > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_one, [folder] * count, range(count), [seed] * count, [quality] * count,
                          chunksize=max(1, count // (4 * processes))))
    else:
        for i in range(count):
            _write_one(folder, i, seed, quality)
    return folder


def photo_files(folder: str | Path) -> list[Path]:
    """The JPEG files of ``folder`` (recursively), sorted; raises ``SystemExit`` if there are none."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG photos in {str(folder)!r}")
    return files
