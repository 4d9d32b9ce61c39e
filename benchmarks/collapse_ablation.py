"""Why does InsLoc collapse at small batch? One factor at a time, same data, seed and budget.

Each variant changes one thing of the raccoon CPU configuration (``transfer_raccoon.py --config cpu``:
tiny-fpn, batch 16, canvas 128, queue 256, lr 0.03 per 256, key momentum 0.99, 60-epoch cosine) and
pretrains for ``--steps`` steps; the table reports the collapse diagnostics of
``training/pretraining/diagnostics.py`` (in-batch top-1, key / query cosine, embedding std) at fixed steps,
averaged over the logged steps in a window around each.

Usage (one variant per process, so several can run side by side; finished runs are reused)::

    python benchmarks/collapse_ablation.py run official --data UNLABELLED --work runs/ablation --steps 300
    python benchmarks/collapse_ablation.py table --work runs/ablation --at 50,150,300
    python benchmarks/collapse_ablation.py probe --data UNLABELLED --steps 10    # the first steps, parts frozen
    python benchmarks/collapse_ablation.py list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from insloc_hub.training.pretraining import engine

#: the raccoon CPU configuration every variant starts from
BASE: dict[str, Any] = dict(arch="tiny-fpn", method="insloc", epochs=60, batch_size=16, canvas=128, queue_size=256,
                            lr=0.03, key_momentum=0.99, workers=0, threads=1, log_every=10, checkpoint_every_steps=0,
                            keep_checkpoints=1, seed=0)

#: the two changes that stop the collapse (projection BN + in-batch negatives); the part-3 variants build on them
SMALL: dict[str, Any] = dict(projection_norm="batch", inbatch_negatives=True)

#: AdamW at 1e-3 for batch 16 (0.016 per 256 under the linear scaling rule), wd 0.05, 5-epoch (55-step) warmup
ADAMW: dict[str, Any] = dict(optimizer="adamw", lr=0.016, weight_decay=0.05, warmup_epochs=5)

#: ``--preset small-data`` as the engine defines it (projection BN, only the batch's keys as negatives, key
#: momentum 0, AdamW 3e-3); its batch, queue and method are BASE's
PRESET: dict[str, Any] = dict(engine.PRETRAIN_PRESETS["small-data"])

#: name -> (what changes, config overrides, InsLoc keyword overrides, a named patch of the engine: "no_wd_norm"
#: (SGD without decay on BN and biases) or "blur_scaled" (the blur sigma range scaled by canvas / 256))
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str | None]] = {
    "official": ("the official recipe (raccoon CPU configuration)", {}, {}, None),
    "moco": ("MoCo v2 image-level baseline (same everything)", {"method": "moco"}, {}, None),
    "embed-default-init": ("128-d embed with nn.Linear's init instead of N(0, 0.01)", {"embed_init": "default"}, {},
                           None),
    "projection-bn": ("BatchNorm in the projection (fc2-BN-ReLU-embed-BN)", {"projection_norm": "batch"}, {}, None),
    "inbatch-negatives": ("other keys of the batch as extra negatives", {"inbatch_negatives": True}, {}, None),
    "loss-p5-only": ("loss on P5 only (level weights 0, 0, 0, 1)", {}, {"level_weights": (0, 0, 0, 1)}, None),
    "loss-p2-only": ("loss on P2 only (level weights 1, 0, 0, 0)", {}, {"level_weights": (1, 0, 0, 0)}, None),
    "no-jitter": ("no box jitter (P5 pools the ground truth too)", {"box_jitter": False}, {}, None),
    "jitter-all-levels": ("box jitter on every query level", {}, {"jitter_levels": ("p2", "p3", "p4", "p5")}, None),
    "no-wd-norm": ("no weight decay on BN parameters and biases", {}, {}, "no_wd_norm"),
    "key-momentum-0.999": ("key momentum 0.999 (official)", {"key_momentum": 0.999}, {}, None),
    "temperature-0.5": ("temperature 0.5", {"temperature": 0.5}, {}, None),
    "temperature-0.07": ("temperature 0.07", {"temperature": 0.07}, {}, None),
    "batch-32": ("batch 32 (BN over 32 images; lr scaled)", {"batch_size": 32}, {}, None),
    "lr-x10": ("lr 0.3 per 256 (10x)", {"lr": 0.3}, {}, None),
    "projection-bn+inbatch": ("projection BN + in-batch negatives", {"projection_norm": "batch",
                                                                      "inbatch_negatives": True}, {}, None),
    "projection-levelbn+inbatch": ("projection BN with per-level statistics + in-batch negatives", {
        "inbatch_negatives": True, "projection_norm": "level"}, {}, None),
    "projection-levelbn+inbatch+lr-x10": ("projection BN per level + in-batch negatives + lr 0.3 per 256", {
        "inbatch_negatives": True, "lr": 0.3, "projection_norm": "level"}, {}, None),
    "projection-bn+inbatch+lr-x3": ("projection BN + in-batch negatives + lr 0.1 per 256", {
        "projection_norm": "batch", "inbatch_negatives": True, "lr": 0.1}, {}, None),
    "projection-bn+inbatch+lr-div3": ("projection BN + in-batch negatives + lr 0.01 per 256", {
        "projection_norm": "batch", "inbatch_negatives": True, "lr": 0.01}, {}, None),
    "projection-bn+inbatch+queue-16": ("projection BN + in-batch negatives + queue 16 (the previous batch only)", {
        "projection_norm": "batch", "inbatch_negatives": True, "queue_size": 16}, {}, None),
    "inbatch+lr-x10": ("in-batch negatives + lr 0.3 per 256", {"inbatch_negatives": True, "lr": 0.3}, {}, None),
    "projection-bn+inbatch+lr-x10": ("projection BN + in-batch negatives + lr 0.3 per 256",
                                     {"projection_norm": "batch", "inbatch_negatives": True, "lr": 0.3}, {}, None),
    # issue 11 part 3: what makes the small-data preset learn (all on top of projection BN + in-batch negatives)
    "projection-bn+inbatch+km-0.999": ("projection BN + in-batch negatives + key momentum 0.999 (official)", {
        **SMALL, "key_momentum": 0.999}, {}, None),
    "projection-bn+inbatch+km-0.9": ("projection BN + in-batch negatives + key momentum 0.9", {
        **SMALL, "key_momentum": 0.9}, {}, None),
    "projection-bn+inbatch+t-0.1": ("projection BN + in-batch negatives + temperature 0.1", {
        **SMALL, "temperature": 0.1}, {}, None),
    "projection-bn+inbatch+adamw": ("projection BN + in-batch negatives + AdamW lr 1e-3 (0.016 per 256), wd 0.05, "
                                    "5-epoch warmup", {**SMALL, **ADAMW}, {}, None),
    "projection-bn+inbatch+sgd-x10-warmup": ("projection BN + in-batch negatives + SGD lr 0.3 per 256, 5-epoch warmup",
                                             {**SMALL, "lr": 0.3, "warmup_epochs": 5}, {}, None),
    "projection-bn+inbatch+symmetric": ("projection BN + in-batch negatives + symmetric loss", {
        **SMALL, "symmetric_loss": True}, {}, None),
    "projection-bn+inbatch+predictor": ("projection BN + in-batch negatives + predictor MLP 128-512-128", {
        **SMALL, "predictor_hidden": 512}, {}, None),
    "projection-bn+inbatch+adamw+symmetric": ("... + AdamW (as above) + symmetric loss", {
        **SMALL, **ADAMW, "symmetric_loss": True}, {}, None),
    "projection-bn+inbatch+adamw+predictor": ("... + AdamW (as above) + predictor 128-512-128", {
        **SMALL, **ADAMW, "predictor_hidden": 512}, {}, None),
    "projection-bn+inbatch+adamw+t-0.1": ("... + AdamW (as above) + temperature 0.1", {
        **SMALL, **ADAMW, "temperature": 0.1}, {}, None),
    "projection-bn+inbatch+no-queue": ("projection BN + in-batch negatives only (no queue negatives, MoCo v3)", {
        **SMALL, "queue_negatives": False}, {}, None),
    "projection-bn+inbatch+no-queue+adamw": ("... + no queue negatives + AdamW (as above)", {
        **SMALL, **ADAMW, "queue_negatives": False}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+symmetric": ("... + no queue negatives + AdamW + symmetric loss", {
        **SMALL, **ADAMW, "queue_negatives": False, "symmetric_loss": True}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+km-0.9": ("... + no queue negatives + AdamW + key momentum 0.9", {
        **SMALL, **ADAMW, "queue_negatives": False, "key_momentum": 0.9}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+km-0": ("... + no queue negatives + AdamW + key momentum 0 (keys from a "
                                                  "copy of the query encoder, SimCLR with a stop-gradient)", {
        **SMALL, **ADAMW, "queue_negatives": False, "key_momentum": 0.0}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+predictor": ("... + no queue negatives + AdamW + predictor 128-512-128", {
        **SMALL, **ADAMW, "queue_negatives": False, "predictor_hidden": 512}, {}, None),
    "projection-bn+inbatch+no-queue+sgd-x10-warmup": ("... + no queue negatives + SGD lr 0.3 per 256, 5-epoch "
                                                      "warmup", {**SMALL, "queue_negatives": False, "lr": 0.3,
                                                                 "warmup_epochs": 5}, {}, None),
    "projection-bn+inbatch+no-queue+symmetric": ("... + no queue negatives + symmetric loss", {
        **SMALL, "queue_negatives": False, "symmetric_loss": True}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+km-0+t-0.1": ("... + no queue negatives + AdamW + key momentum 0 + "
                                                        "temperature 0.1", {
        **SMALL, **ADAMW, "queue_negatives": False, "key_momentum": 0.0, "temperature": 0.1}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+km-0.9+predictor": ("... + no queue negatives + AdamW + key momentum 0.9 + "
                                                              "predictor 128-512-128", {
        **SMALL, **ADAMW, "queue_negatives": False, "key_momentum": 0.9, "predictor_hidden": 512}, {}, None),
    "projection-bn+inbatch+no-queue+adamw+km-0+symmetric": ("... + no queue negatives + AdamW + key momentum 0 + "
                                                            "symmetric loss", {
        **SMALL, **ADAMW, "queue_negatives": False, "key_momentum": 0.0, "symmetric_loss": True}, {}, None),
    "projection-bn+inbatch+no-queue+km-0": ("... + no queue negatives + key momentum 0 (SGD, lr 0.03 per 256)", {
        **SMALL, "queue_negatives": False, "key_momentum": 0.0}, {}, None),
    "projection-bn+inbatch+no-queue+adamw-x3+km-0": ("... + no queue negatives + AdamW lr 3e-3 (0.048 per 256) + "
                                                     "key momentum 0", {
        **SMALL, **ADAMW, "lr": 0.048, "queue_negatives": False, "key_momentum": 0.0}, {}, None),
    "preset": ("the small-data preset (reference)", PRESET, {}, None),
    "preset+t-0.5": ("the small-data preset + temperature 0.5", {**PRESET, "temperature": 0.5}, {}, None),
    "preset+t-0.3": ("the small-data preset + temperature 0.3", {**PRESET, "temperature": 0.3}, {}, None),
    "preset+lr-x2": ("the small-data preset with AdamW 6e-3 (0.096 per 256)", {**PRESET, "lr": 0.096}, {}, None),
    "preset+t-0.5+batchbg": ("the small-data preset + temperature 0.5 + in-batch backgrounds (device composer)", {
        **PRESET, "temperature": 0.5, "gpu_composition": "on", "batch_backgrounds": True}, {}, None),
    "preset+t-0.5+batchbg+symmetric": ("... + symmetric loss", {
        **PRESET, "temperature": 0.5, "gpu_composition": "on", "batch_backgrounds": True, "symmetric_loss": True},
        {}, None),
    "preset+epochs-240": ("the small-data preset over 4x the raccoon budget (240 epochs, 2,640 steps)", {
        **PRESET, "epochs": 240}, {}, None),
    "preset+p2-only": ("the small-data preset, loss on P2 only (level weights 1, 0, 0, 0)", PRESET,
                       {"level_weights": (1, 0, 0, 0)}, None),
    "preset+r18-fpn": ("the small-data preset on r18-fpn (ResNet-18 at full width: 4x tiny-fpn's channels, 16x its "
                       "trunk's multiply-adds)", {**PRESET, "arch": "r18-fpn"}, {}, None),
    "preset+r18-fpn+lr-div3": ("the small-data preset on r18-fpn with AdamW 1e-3 (0.016 per 256)", {
        **PRESET, "arch": "r18-fpn", "lr": 0.016}, {}, None),
    "preset+canvas-256": ("the small-data preset at the official 256-pixel canvas (4x the pixels per instance)", {
        **PRESET, "canvas": 256}, {}, None),
    "preset+canvas-256+lr-x2": ("the small-data preset at canvas 256 with AdamW 6e-3 (0.096 per 256)", {
        **PRESET, "canvas": 256, "lr": 0.096}, {}, None),
    "moco+canvas-256": ("MoCo v2 image-level baseline at canvas 256", {"method": "moco", "canvas": 256}, {}, None),
    "preset+canvas-256+epochs-240": ("the small-data preset at canvas 256 over 4x the raccoon budget (240 epochs, "
                                     "2,640 steps)", {**PRESET, "canvas": 256, "epochs": 240}, {}, None),
    "moco+canvas-256+epochs-240": ("MoCo v2 at canvas 256 over 4x the raccoon budget (240 epochs, 2,640 steps)", {
        "method": "moco", "canvas": 256, "epochs": 240}, {}, None),
    "preset+blur-scaled": ("the small-data preset with the blur sigma range scaled to the canvas (0.05-1.0 px at "
                           "128, as 0.1-2.0 px at the official 256)", PRESET, {}, "blur_scaled"),
    "moco+r18-fpn": ("MoCo v2 image-level baseline on r18-fpn", {"method": "moco", "arch": "r18-fpn"}, {}, None),
    "projection-bn+inbatch+adamw+km-0.999": ("... + AdamW (as above) + key momentum 0.999", {
        **SMALL, **ADAMW, "key_momentum": 0.999}, {}, None),
    "projection-bn+inbatch+adamw+km-0.9": ("... + AdamW (as above) + key momentum 0.9", {
        **SMALL, **ADAMW, "key_momentum": 0.9}, {}, None),
}


def _patch(model_kwargs: dict[str, Any], change: str | None) -> None:
    """Route the variant's InsLoc keywords and engine patch into ``engine.train``."""
    if model_kwargs:
        build = engine.build_model

        def build_model(cfg: engine.PretrainConfig) -> Any:
            cls = type(build(cfg))
            kwargs = dict(box_jitter=cfg.box_jitter, canvas=cfg.canvas, shuffle_bn=cfg.shuffle_bn,
                          projection_norm=cfg.projection_norm, inbatch_negatives=cfg.inbatch_negatives,
                          embed_init=cfg.embed_init, symmetric_loss=cfg.symmetric_loss,
                          predictor_hidden=cfg.predictor_hidden, queue_negatives=cfg.queue_negatives)
            return cls(cfg.arch, cfg.dim, cfg.queue_size, cfg.key_momentum, cfg.temperature,
                       **{**kwargs, **model_kwargs})

        engine.build_model = build_model
    if change == "blur_scaled":  # the official sigmas are pixels of a 256 canvas
        official = engine.composition_config

        def composition_config(cfg: engine.PretrainConfig) -> Any:
            comp = official(cfg)
            lo, hi = comp.blur_sigma
            return dataclasses.replace(comp, blur_sigma=(lo * cfg.canvas / 256, hi * cfg.canvas / 256))

        engine.composition_config = composition_config
    if change == "no_wd_norm":
        sgd = torch.optim.SGD

        def split_sgd(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
            params = list(params)
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]  # BN weights/biases and every bias
            return sgd([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **kwargs)

        engine.torch.optim.SGD = split_sgd  # type: ignore[misc]


def run(name: str, data: str, work: Path, steps: int, seed: int = 0) -> Path:
    """Pretrain one variant for ``steps`` steps into ``work/name`` (``name-seedN`` for another seed); returns
    its metrics.jsonl."""
    _, overrides, model_kwargs, change = VARIANTS[name]
    out = work / (name if seed == 0 else f"{name}-seed{seed}")
    metrics = out / "metrics.jsonl"
    final = out / "final" / "config.json"
    if final.exists() and json.loads(final.read_text())["provenance"]["steps"] >= steps:
        return metrics  # done; a larger --steps continues the run from its last checkpoint
    _patch(model_kwargs, change)
    values = {**BASE, **overrides, "data": data, "output": str(out), "max_steps": steps, "resume": "auto", "seed": seed}
    if values["queue_size"] % values["batch_size"]:
        values["queue_size"] = values["batch_size"] * 16
    cfg = engine.PretrainConfig.from_dict(values)
    engine.train(cfg)
    return metrics


#: one-step probe variants: name -> (what changes, config overrides, which query parameters train)
PROBES: dict[str, tuple[str, dict[str, Any], str]] = {
    "official": ("every parameter trains (official)", {}, "all"),
    "projection-only": ("only the projection (fc2, embed) trains", {}, "projection"),
    "projection-frozen": ("the projection is frozen", {}, "not-projection"),
    "embed-bias-frozen": ("the embed bias is frozen", {}, "not-embed-bias"),
    "embed-default-init": ("embed with nn.Linear's init", {"embed_init": "default"}, "all"),
    "projection-bn": ("BatchNorm in the projection", {"projection_norm": "batch"}, "all"),
}


def probe(data: str, steps: int, batches: int = 6) -> str:
    """Markdown table: query cosine, |z| and in-batch top-1 after 1, 5 and ``steps`` SGD steps.

    The same ``batches`` composed batches (batch 16, canvas 128, seed 0) are cycled for every variant,
    with the engine's SGD settings, so the rows differ only by what the variant changes.
    """
    from insloc_hub.training.pretraining.pretrain_data import InsLocPretrainDataset, UnlabelledImages

    torch.set_num_threads(1)
    base = engine.PretrainConfig.from_dict({**BASE, "data": data, "output": "unused"})
    dataset = InsLocPretrainDataset(UnlabelledImages(data), engine.composition_config(base), seed=0)
    views = []
    for b in range(batches):
        samples = [dataset[(0, b * 16 + i)] for i in range(16)]
        views.append([torch.stack([s[k] for s in samples]) for k in ("q_img", "q_box", "k_img", "k_box")])
    report = sorted({1, 5, steps})
    lines = ["| probe | what changes | step 0 | " + " | ".join(f"after {s} step{'s' * (s > 1)}" for s in report) + " |",
             "|" + "---|" * (3 + len(report)),
             "| | | " + " | ".join([r"cos_q / \|z\| / top-1 %"] * (1 + len(report))) + " |"]
    for name, (what, overrides, trains) in PROBES.items():
        torch.manual_seed(0)
        cfg = engine.PretrainConfig.from_dict({**base.to_dict(), **overrides})
        model = engine.build_model(cfg)
        for pname, param in model.encoder_q.named_parameters():
            in_projection = pname.startswith("projection.")
            param.requires_grad = {"all": True, "projection": in_projection, "not-projection": not in_projection,
                                   "not-embed-bias": pname != "projection.embed.bias"}[trains]
        norms: list[float] = []

        def record_norm(module: Any, inputs: Any, output: torch.Tensor, norms: list[float] = norms) -> None:
            norms.append(float(output.detach().norm(dim=1).mean()))  # |z| before the L2 normalisation

        model.encoder_q.projection.register_forward_hook(record_norm)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.scaled_lr,
                                    momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        model.train()
        cells = {}
        for step in range(steps + 1):
            q_img, q_box, k_img, k_box = views[step % batches]
            out = model(q_img, q_box, k_img, k_box, generator=torch.Generator().manual_seed(step))
            if step == 0 or step in report:
                cells[step] = f"{float(out['cos_q']):.2f} / {norms[-1]:.2f} / {float(out['inbatch_top1']):.0f}"
            if step == steps:
                break
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
        lines.append(f"| `{name}` | {what} | " + " | ".join(cells[s] for s in [0, *report]) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _window(records: list[dict[str, Any]], step: int, key: str, width: int = 20) -> float | None:
    values = [r[key] for r in records if key in r and step - width < r["step"] <= step]
    return sum(values) / len(values) if values else None


def table(work: Path, at: list[int], window: int = 20) -> str:
    """Markdown table: per variant, in-batch top-1 / key cosine / query cosine / std at each step of ``at``."""
    header = "| variant | what changes | " + " | ".join(f"step {s}: top-1 % / cos_k / cos_q / std" for s in at) + " |"
    lines = [header, "|" + "---|" * (2 + len(at))]
    for name, (what, *_rest) in VARIANTS.items():
        path = work / name / "metrics.jsonl"
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        cells = []
        for step in at:
            vals = [_window(records, step, k, window) for k in ("inbatch_top1", "cos_k", "cos_q", "emb_std")]
            cells.append("-" if vals[0] is None else f"{vals[0]:.0f} / {vals[1]:.2f} / {vals[2]:.2f} / {vals[3]:.3f}")
        lines.append(f"| `{name}` | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="pretrain one variant")
    p_run.add_argument("variant", choices=sorted(VARIANTS))
    p_run.add_argument("--data", required=True, help="folder of unlabelled images")
    p_run.add_argument("--work", type=Path, required=True)
    p_run.add_argument("--steps", type=int, default=300)
    p_run.add_argument("--seed", type=int, default=0, help="pretraining seed (another seed runs in NAME-seedN)")
    p_table = sub.add_parser("table", help="print the markdown table of the finished variants")
    p_table.add_argument("--work", type=Path, required=True)
    p_table.add_argument("--at", default="50,150,300", help="steps (comma separated)")
    p_table.add_argument("--window", type=int, default=20, help="average the logged steps in (step - window, step]")
    p_probe = sub.add_parser("probe", help="the first SGD steps on fixed batches, with parts frozen")
    p_probe.add_argument("--data", required=True)
    p_probe.add_argument("--steps", type=int, default=10)
    sub.add_parser("list", help="list the variants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        print(run(args.variant, args.data, args.work, args.steps, args.seed))
    elif args.command == "probe":
        print(probe(args.data, args.steps))
    elif args.command == "table":
        print(table(args.work, [int(s) for s in args.at.split(",")], args.window))
    else:
        for name, (what, *_rest) in VARIANTS.items():
            print(f"{name:24s} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
