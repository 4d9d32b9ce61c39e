"""Pretraining throughput: the plain fp32 eager baseline vs our optimised configuration, same run.

Two workloads, each measured for both configurations in the same process:

* **model step** -- one InsLoc optimizer step (query forward + backward, momentum update, key
  forward, loss, enqueue, SGD) on fixed synthetic inputs; no data loading;
* **pipeline** -- the whole loop body: DataLoader over real photographs (copy-paste composition),
  host-to-device copy, the step.

Configurations:

* ``baseline``: what the official code does: fp32, NCHW, eager, composition on the CPU with PIL in
  the loader;
* ``optimised``: the engine's ``auto`` settings on the device: bf16 autocast and channels-last on
  CUDA, composition with the batched tensor composer on the device (CUDA), optionally ``--compile``.
  On the CPU the engine leaves autocast, channels-last and device composition off, so there both
  configurations run the same step. (The ``torch._foreach`` momentum update and the batched loss are
  the model's only path; tests/training/test_insloc.py holds them equal to the official loops.)

Example::

    python benchmarks/train_throughput.py --device cpu --arch tiny-fpn --canvas 64 --batch-size 32 \\
        --queue-size 4096 --steps 20
    python benchmarks/train_throughput.py --device cuda --arch r50-fpn --batch-size 256 --steps 30

Prints a ratio table (img/s, higher is better).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.runner import Row, print_table  # noqa: E402
from insloc_hub.training.pretraining.engine import (  # noqa: E402
    PretrainConfig,
    batch_to_views,
    build_dataset,
    build_model,
    compile_encoders,
    composition_config,
    host_boxes,
    jitter_on_host,
    resolve_runtime,
    train_step,
)
from insloc_hub.training.pretraining.pretrain_data import UnlabelledImages, collate_decoded  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "cat", "camera", "brick", "grass", "gravel", "moon", "coins", "horse")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_photos(folder: Path, count: int, side: int = 500) -> Path:
    """ImageNet-sized JPEGs (long side ``side``) from scikit-image's sample photographs."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.fromarray(np.asarray(getattr(data, PHOTOS[i % len(PHOTOS)])())).convert("RGB")
        if i >= len(PHOTOS):  # variety: a different crop of the same photograph
            w, h = img.size
            f = 0.6 + 0.4 * ((i // len(PHOTOS)) % 4) / 4
            img = img.crop((0, 0, int(w * f), int(h * f)))
        img.thumbnail((side, side))
        img.save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def synthetic_views(cfg: PretrainConfig, device: torch.device, channels_last: bool = False,
                    seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two random views ``(q, q_boxes, k, k_boxes)`` of ``cfg``'s batch and canvas, one box per image."""
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.batch_size, cfg.canvas
    images = [torch.randn(b, 3, s, s, generator=g).to(device) for _ in range(2)]
    if channels_last:
        images = [img.contiguous(memory_format=torch.channels_last) for img in images]
    boxes = []
    for _ in range(2):
        wh = (torch.rand(b, 2, generator=g) * 0.5 + 0.25) * s
        xy = torch.rand(b, 2, generator=g) * (s - wh)
        boxes.append(torch.cat([xy, xy + wh], dim=1).floor())
    return images[0], boxes[0].to(device), images[1], boxes[1].to(device)


def make_setup(cfg: PretrainConfig, device: torch.device, *, amp: torch.dtype | None = None,
               channels_last: bool = False, compile_model: bool = False,
               gpu_composition: bool = False) -> dict[str, Any]:
    """``cfg``'s model on ``device`` in train mode, with pretraining's SGD, for timing steps."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        compile_encoders(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.scaled_lr,
                                momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    model.train()
    return {"model": model, "optimizer": optimizer, "amp": amp, "channels_last": channels_last,
            "gpu_composition": gpu_composition}


def runtime_setup(cfg: PretrainConfig, device: torch.device, optimised: bool, compile_model: bool) -> dict[str, Any]:
    """:func:`make_setup` as pretraining runs: fp32 eager (baseline) or with ``resolve_runtime``'s choices."""
    if not optimised:
        return make_setup(cfg, device)
    rt = resolve_runtime(cfg, device)
    return make_setup(cfg, device, amp=rt.amp_dtype, channels_last=rt.channels_last, compile_model=compile_model,
                      gpu_composition=rt.gpu_composition)


def step_throughput(cfg: PretrainConfig, setup: dict[str, Any], device: torch.device, steps: int,
                    warmup: int) -> float:
    q, qb, k, kb = synthetic_views(cfg, device, setup["channels_last"])
    boxes = (qb.cpu(), kb.cpu())  # on the host, for the box jitter (as the trainer); copied once, before timing
    if cfg.method == "moco":
        qb = kb = None
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(i)
        jittered = jitter_on_host(setup["model"], boxes, generator, device)
        train_step(setup["model"], setup["optimizer"], (q, qb, k, kb), amp_dtype=setup["amp"], generator=generator,
                   diagnostics=False, jittered=jittered)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return cfg.batch_size / statistics.median(times)


class Pipeline:
    """A persistent loader + step for one configuration; :meth:`measure` returns img/s over ``steps``."""

    def __init__(self, cfg: PretrainConfig, setup: dict[str, Any], device: torch.device,
                 images: UnlabelledImages) -> None:
        self.cfg, self.setup, self.device = cfg, setup, device
        dataset = build_dataset(cfg, images, setup["gpu_composition"])
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers, drop_last=True,
            collate_fn=collate_decoded if setup["gpu_composition"] else None, pin_memory=device.type == "cuda",
            persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(0))
        self.comp = composition_config(cfg)
        self.iterator = itertools.chain.from_iterable(itertools.repeat(self.loader))  # epoch after epoch
        self.done = 0

    def _batch(self) -> Any:
        return next(self.iterator)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            batch = self._batch()
            q, qb, k, kb = batch_to_views(batch, self.comp, self.device, self.setup["channels_last"])
            generator, jittered = torch.Generator().manual_seed(self.done), None
            if self.cfg.method == "moco":
                qb = kb = None
            else:  # drawn on the host, as the trainer does
                jittered = jitter_on_host(self.setup["model"], host_boxes(batch, self.comp), generator, self.device)
            train_step(self.setup["model"], self.setup["optimizer"], (q, qb, k, kb), amp_dtype=self.setup["amp"],
                       generator=generator, diagnostics=False, jittered=jittered)
            self.done += 1

    def measure(self, steps: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.run(steps)
        _sync(self.device)
        return self.cfg.batch_size * steps / (time.perf_counter() - start)


def _fmt(rates: dict[str, list[float]]) -> str:
    return ", ".join(f"{name} [{' '.join(f'{r:.0f}' for r in values)}]" for name, values in rates.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--arch", default=None, help="backbone preset (default: r50-fpn on CUDA, tiny-fpn on CPU)")
    parser.add_argument("--method", default="insloc", choices=("insloc", "moco"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--canvas", type=int, default=None, help="default: 256 on CUDA, 64 on CPU")
    parser.add_argument("--queue-size", type=int, default=None, help="default: 65536 on CUDA, 4096 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate baseline/optimised this many times and report the median (noise)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: CPU count - 1)")
    parser.add_argument("--data", default=None, help="folder of photographs (default: scikit-image samples)")
    parser.add_argument("--num-images", type=int, default=256, help="photographs to write when --data is not given")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the optimised model")
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="optimised config: bf16 autocast (auto = on CUDA)")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="optimised config: channels-last (auto = on CUDA)")
    parser.add_argument("--gpu-composition", default="auto", choices=("auto", "on", "off"),
                        help="optimised config: batched composition on the device (auto = on CUDA)")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the model step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    import os

    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 1) - 1)
    cfg = PretrainConfig(
        data="bench", output="bench", arch=args.arch or ("r50-fpn" if cuda else "tiny-fpn"), method=args.method,
        batch_size=args.batch_size or (256 if cuda else 32), canvas=args.canvas or (256 if cuda else 64),
        queue_size=args.queue_size or (65536 if cuda else 4096), workers=workers, device=str(device), amp=args.amp,
        channels_last=args.channels_last, gpu_composition=args.gpu_composition)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, arch {cfg.arch}, method {cfg.method}, batch {cfg.batch_size}, "
          f"canvas {cfg.canvas}, K {cfg.queue_size}, loader workers {workers}, steps {args.steps}", flush=True)

    rows = []
    setups = {name: runtime_setup(cfg, device, name == "optimised", args.compile) for name in ("baseline", "optimised")}
    for name, setup in setups.items():
        print(f"  {name}: amp {setup['amp']}, channels_last {setup['channels_last']}, device composition "
              f"{setup['gpu_composition']}", flush=True)
    step: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(args.rounds):  # alternate, so load changes on a shared machine hit both alike
        for name, setup in setups.items():
            step[name].append(step_throughput(cfg, setup, device, args.steps, args.warmup if r == 0 else 1))
    rows.append(("model step", statistics.median(step["baseline"]), statistics.median(step["optimised"])))
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.data) if args.data else write_photos(Path(tmp) / "photos", args.num_images)
            images = UnlabelledImages(folder)
            pipes = {name: Pipeline(cfg, setup, device, images) for name, setup in setups.items()}
            for pipe in pipes.values():
                pipe.run(args.warmup)
            pipe_rates: dict[str, list[float]] = {name: [] for name in setups}
            for _ in range(args.rounds):
                for name, pipe in pipes.items():
                    pipe_rates[name].append(pipe.measure(args.steps))
            del pipes
        rows.append(("pipeline (data included)", statistics.median(pipe_rates["baseline"]),
                     statistics.median(pipe_rates["optimised"])))

    print(f"  per-round img/s: step {_fmt(step)}" + ("" if args.skip_pipeline else f"; pipeline {_fmt(pipe_rates)}"))
    table = []
    for name, base, opt in rows:  # medians of the rounds, as seconds per batch
        table.append(Row(name, "baseline fp32 eager", cfg.batch_size / base, cfg.batch_size, baseline=True))
        table.append(Row(name, "optimised", cfg.batch_size / opt, cfg.batch_size))
    print()
    print_table(table, title=f"Pretraining throughput ({cfg.arch}, batch {cfg.batch_size}, canvas {cfg.canvas})",
                json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
