"""How much of a transferred box head is alive on detection inputs? One row per init.

Builds a Faster R-CNN (FPN) from each given backbone folder (or random init for ``random``), runs its
trunk, FPN and box head on random boxes over real photographs, and reports for the box head's
fc layer: the share of units that never activate (dead ReLUs: they get no gradient in fine-tuning
either), the mean activation and feature norm, the mean pairwise cosine of the RoI features and their
effective rank (exp of the entropy of the normalised squared singular values of the centred features).
Also the share of head conv channels that never activate.

Usage::

    python benchmarks/head_units.py --photos ../shared/data/raccoon/images \\
        random insloc=runs/raccoon/pretrain-insloc/final moco=runs/raccoon/pretrain-moco/final
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.transforms.functional import pil_to_tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from insloc_hub import build_detector, from_pretrained  # noqa: E402
from insloc_hub.transforms import IMAGE_EXTENSIONS, decode_image  # noqa: E402


def head_statistics(detector: torch.nn.Module, images: list[torch.Tensor], boxes_per_image: int = 64,
                    seed: int = 0) -> dict[str, float]:
    """Box-head statistics of ``detector`` (a torchvision R-CNN with an FPN box head) on ``images``
    (float [3, H, W] in [0, 1]), at ``boxes_per_image`` random boxes each.

    Example:
        >>> det = build_detector("faster_rcnn_fpn", 2, preset="tiny-fpn", min_size=64, max_size=64)
        >>> stats = head_statistics(det, [torch.rand(3, 64, 64)], boxes_per_image=8)
        >>> 0.0 <= stats["dead_fc_units"] <= 1.0
        True
    """
    generator = torch.Generator().manual_seed(seed)
    detector.eval()
    heads = detector.roi_heads
    fc_out, conv_max = [], []
    with torch.no_grad():
        for image in images:
            batch, _ = detector.transform([image])
            features = detector.backbone(batch.tensors)
            height, width = batch.image_sizes[0]
            size = torch.tensor([width, height], dtype=torch.float32)
            corner = torch.rand(boxes_per_image, 2, generator=generator) * size * 0.7
            extent = torch.rand(boxes_per_image, 2, generator=generator) * size * 0.5 + size * 0.05
            pooled = heads.box_roi_pool(features, [torch.cat([corner, corner + extent], 1)], batch.image_sizes)
            conv_max.append(heads.box_head.convs(pooled).amax(dim=(2, 3)))
            fc_out.append(heads.box_head(pooled))
    fc = torch.cat(fc_out)
    unit = torch.nn.functional.normalize(fc, dim=1)
    singular = torch.linalg.svdvals(fc - fc.mean(0))
    share = singular**2 / (singular**2).sum()
    return {
        "dead_fc_units": float((fc.amax(0) <= 0).float().mean()),
        "dead_conv_channels": float((torch.cat(conv_max).amax(0) <= 0).float().mean()),
        "mean_activation": float(fc.mean()),
        "feature_norm": float(fc.norm(dim=1).mean()),
        "mean_cosine": float((unit @ unit.T).mean()),
        "effective_rank": float(torch.exp(-(share * torch.log(share + 1e-12)).sum())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inits", nargs="+", help="'random' or NAME=BACKBONE_FOLDER")
    parser.add_argument("--photos", type=Path, required=True, help="folder of photographs")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--preset", default="tiny-fpn", help="architecture preset of the random-init row")
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=416)
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.images]
    if not paths:
        parser.error(f"no photographs in {args.photos}")
    images = [pil_to_tensor(decode_image(p)).float() / 255 for p in paths]
    sizes = dict(min_size=args.min_size, max_size=args.max_size)
    print(f"{len(images)} photographs from {args.photos}, detector sizes {sizes}\n")
    print("| init | dead fc units | dead head conv channels | mean activation | feature norm | mean cosine "
          "| effective rank |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.inits:
        name, _, folder = spec.partition("=")
        torch.manual_seed(0)  # the same fresh layers for every row
        if folder:
            detector = build_detector("faster_rcnn_fpn", 2, pretrained=from_pretrained(folder), **sizes)
        else:
            detector = build_detector("faster_rcnn_fpn", 2, preset=args.preset, **sizes)
        s = head_statistics(detector, images)
        print(f"| {name} | {s['dead_fc_units']:.1%} | {s['dead_conv_channels']:.1%} | {s['mean_activation']:.3f} "
              f"| {s['feature_norm']:.2f} | {s['mean_cosine']:.3f} | {s['effective_rank']:.1f} |")


if __name__ == "__main__":
    main()
