"""The composer's colour operations vs torchvision.transforms.v2.functional, one 256 px view, one thread.

Why the composer keeps its own in-place colour operations (training/pretraining/compose.py) although
it tests them equal to torchvision's (tests/training/test_compose.py): this prints the per-view cost of
each, measured in the same run, on the CPU path's shape (one [1, 3, 256, 256] float image at a time).

    python benchmarks/color_ops.py [--size 256] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from insloc_hub.training.pretraining import compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runner import measure, print_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    image = torch.rand(1, 3, args.size, args.size)
    work = image.clone()
    factor = [0.7]  # one factor per row, on the host
    sigma = torch.tensor([1.0])

    def timed(op, *extra):
        def run():
            work.copy_(image)  # the in-place ops need a fresh input; the copy is timed for both sides
            op(work, *extra)
        return run

    cases = {
        "brightness": (timed(compose._brightness_, factor, 1.0), timed(TF.adjust_brightness, 0.7)),
        "contrast": (timed(compose._contrast_, factor, 1.0), timed(TF.adjust_contrast, 0.7)),
        "saturation": (timed(compose._saturation_, factor, 1.0), timed(TF.adjust_saturation, 0.7)),
        "hue": (timed(compose._hue_, [0.05], 1.0), timed(TF.adjust_hue, 0.05)),
        "grayscale": (timed(compose._grayscale_), timed(TF.rgb_to_grayscale, 3)),
        "gaussian blur sigma 1": (timed(compose.gaussian_blur_batch, sigma), timed(TF.gaussian_blur, [7, 7], [1.0])),
    }
    rows = []
    for name, (our_fn, tv_fn) in cases.items():
        workload = f"{name}, 1x3x{args.size}x{args.size} float, 1 thread"
        rows.append(measure(workload, "torchvision.transforms.v2.functional", tv_fn, repeats=args.repeats,
                            warmup=5, baseline=True))
        rows.append(measure(workload, "compose.py (in place)", our_fn, repeats=args.repeats, warmup=5))
    print_table(rows, "Colour operations per view: composer vs torchvision")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
