"""Load time of a ResNet-50-FPN backbone with its box head: hub folder vs ``torch.load`` of a .pth.

Prints one table of medians from the same run, and the ratios the hub issue sets as goals:
``from_pretrained`` of a local folder must be at least 3x faster than ``torch.load`` of the same
state dict saved as ``.pth``, and under 1 s on this CPU.

    python benchmarks/hub_load.py [--arch r50-fpn] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runner import measure, print_table  # noqa: E402
from insloc_hub.models import InsLocBackbone  # noqa: E402
from insloc_hub.pretrained import from_pretrained, save_pretrained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="r50-fpn")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
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

        workload = f"load {args.arch} ({size_mb:.0f} MB)"
        variants = {  # the first is the baseline; warm-up call first (page cache, lazy imports)
            "torch.load(.pth) state dict only": pth_state,
            "torch.load(.pth, mmap=True) state dict only": pth_mmap,
            "build model + torch.load(.pth) + load_state_dict": pth_model,
            "from_pretrained(folder), sha256 re-checked every time": lambda: from_pretrained(folder, verify=True),
            "from_pretrained(folder), default (sha256 once per file)": lambda: from_pretrained(folder),
            "torch.load(.pth) + read every tensor once": pth_touched,
            "from_pretrained(folder) + read every tensor once": ours_touched,
        }
        rows = [measure(workload, name, fn, repeats=args.repeats, baseline=i == 0)
                for i, (name, fn) in enumerate(variants.items())]
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {size_mb:.0f} MB, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (img/s = loads/s)")
    print_table(rows, title="Loading a backbone", json_path=args.json)
    base = rows[0].seconds
    ours = next(r for r in rows if r.variant.startswith("from_pretrained(folder), default")).seconds
    print(f"goal: >= 3x faster than torch.load and < 1 s -> {base / ours:.1f}x, {ours:.3f} s: "
          f"{'MET' if base / ours >= 3 and ours < 1 else 'NOT MET'}")


if __name__ == "__main__":
    main()
