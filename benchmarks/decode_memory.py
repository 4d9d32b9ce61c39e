"""Peak memory and time of ``decode_image`` at the 40 MP limit, by input type.

Each (input, variant) runs in its own process, so the peak RSS (``ru_maxrss``) is its own. The
figure reported is the peak RSS while decoding minus the RSS just before (the encoded bytes are
already in memory then); the decoded 8-bit RGB result alone is 120 MB at 40 MP.

Variants: ``decode_image`` (the policy now: strip-wise 8-bit conversion, one RGB canvas for
alpha) and ``before`` (the previous conversion, kept here for the comparison: float64 min-max
stretch of 16-bit/float images, ``alpha_composite`` on an RGBA canvas).

    python benchmarks/decode_memory.py [--megapixels 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runner import Row, print_table  # noqa: E402

KINDS = ("rgb-jpeg", "rgba-png", "gray16-png", "float-tiff", "gray-png")


def make_input(kind: str, width: int, height: int, folder: Path) -> Path:
    """A smooth synthetic image of ``kind`` (compresses, so the file stays small), written once."""
    path = folder / f"{kind}-{width}x{height}"
    if path.exists():
        return path
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    ramp = (x * 0.7 + y * 0.3).astype(np.float32)
    if kind == "float-tiff":
        image, fmt, args = Image.fromarray(ramp, "F"), "TIFF", {"compression": "tiff_adobe_deflate"}
    elif kind == "gray16-png":
        image, fmt, args = Image.fromarray((ramp * 65535).astype(np.uint16)), "PNG", {}
    else:
        gray = (ramp * 255).astype(np.uint8)
        if kind == "gray-png":
            image, fmt, args = Image.fromarray(gray, "L"), "PNG", {}
        else:
            channels = [gray, gray[::-1].copy(), np.full_like(gray, 90)]
            if kind == "rgba-png":
                channels.append(np.full_like(gray, 128))
            image = Image.fromarray(np.stack(channels, axis=-1), "RGBA" if kind == "rgba-png" else "RGB")
            fmt, args = ("PNG", {}) if kind == "rgba-png" else ("JPEG", {"quality": 90})
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **args)
    path.write_bytes(buffer.getvalue())
    return path


def _before(data: bytes) -> Image.Image:
    """The conversion insloc-hub used before the hardening (for comparison only)."""
    from PIL import ImageOps

    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def child(path: str, variant: str) -> None:
    """Decode once in this process; print seconds and the RSS added by decoding, as JSON."""
    from insloc_hub.transforms import decode_image

    data = Path(path).read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    image = decode_image(data, max_bytes=1 << 30) if variant == "decode_image" else _before(data)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert image.mode == "RGB"
    print(json.dumps({"seconds": seconds, "added_mb": peak - before, "bytes": len(data)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    height = int((args.megapixels * 1e6 / 1.6) ** 0.5)
    width = int(args.megapixels * 1e6 // height)
    rows = []
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        for kind in args.kinds.split(","):
            path = make_input(kind, width, height, Path(tmp))
            for variant in ("before", "decode_image"):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), variant],
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                rows.append(Row(f"{kind} {width}x{height} ({result['bytes'] / 2**20:.1f} MB file)", variant,
                                result["seconds"], 1, variant == "before", result["added_mb"]))
    print_table(rows, "decode_image at the pixel limit: peak RSS added by decoding (MB), one process each",
                args.json)


if __name__ == "__main__":
    main()
