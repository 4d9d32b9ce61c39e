"""Load time of a ResNet-50-FPN backbone with its box head: hub folder vs ``torch.load`` of a .pth.

Prints one table of medians from the same run, and the ratios the hub issue sets as goals:
``from_pretrained`` of a local folder must be at least 3x faster than ``torch.load`` of the same
state dict saved as ``.pth``, and under 1 s on this CPU.

    python benchmarks/hub_load.py [--arch r50-fpn] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained, save_pretrained


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm the page cache and lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="r50-fpn")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("INSLOC_HUB_CACHE", str(Path(tmp) / "cache"))
        model = InsLocBackbone(args.arch)
        folder = save_pretrained(model, Path(tmp) / "folder")
        pth = Path(tmp) / "model.pth"
        torch.save(model.state_dict(), pth)
        size_mb = (folder / "model.safetensors").stat().st_size / 2**20

        def pth_state() -> None:
            torch.load(pth, map_location="cpu", weights_only=True)

        def pth_mmap() -> None:
            torch.load(pth, map_location="cpu", weights_only=True, mmap=True)

        # memory-mapped tensors are paged in when first used: compare with that cost on both sides
        def pth_touched() -> None:
            for tensor in torch.load(pth, map_location="cpu", weights_only=True).values():
                tensor.sum()

        def ours_touched() -> None:
            for tensor in from_pretrained(folder).state_dict().values():
                tensor.sum()

        def pth_model() -> None:
            fresh = InsLocBackbone(args.arch)
            fresh.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))

        rows = {
            "torch.load(.pth) state dict only": median_seconds(pth_state, args.repeats),
            "torch.load(.pth, mmap=True) state dict only": median_seconds(pth_mmap, args.repeats),
            "build model + torch.load(.pth) + load_state_dict": median_seconds(pth_model, args.repeats),
            "from_pretrained(folder), sha256 re-checked every time": median_seconds(
                lambda: from_pretrained(folder, verify=True), args.repeats),
            "from_pretrained(folder), default (sha256 once per file)": median_seconds(
                lambda: from_pretrained(folder), args.repeats),
            "torch.load(.pth) + read every tensor once": median_seconds(pth_touched, args.repeats),
            "from_pretrained(folder) + read every tensor once": median_seconds(ours_touched, args.repeats),
        }
    base = rows["torch.load(.pth) state dict only"]
    ours = rows["from_pretrained(folder), default (sha256 once per file)"]
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {size_mb:.0f} MB, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"| {'what':<58} | seconds | vs torch.load |")
    print(f"|{'-' * 60}|---------|---------------|")
    for name, seconds in rows.items():
        print(f"| {name:<58} | {seconds:7.3f} | {base / seconds:12.2f}x |")
    print(f"goal: >= 3x faster than torch.load and < 1 s -> {base / ours:.1f}x, {ours:.3f} s: "
          f"{'MET' if base / ours >= 3 and ours < 1 else 'NOT MET'}")


if __name__ == "__main__":
    main()
