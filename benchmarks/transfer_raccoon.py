"""Transfer experiment on real photographs: random init vs MoCo v2 vs InsLoc, Faster R-CNN FPN on raccoon.

Every row fine-tunes the same detector (Faster R-CNN FPN, same trunk) with the same budget on the
raccoon TRAIN split and is scored on its TEST split (COCO AP / AP50 / AP75), over several seeds:

* ``random``: no pretraining (``--init random``).
* ``moco``: image-level MoCo v2 pretraining (``insloc-train pretrain --method moco``).
* ``insloc``: InsLoc pretraining (``insloc-train pretrain --method insloc``).

Diagnostic rows (``--rows``, see ``ROW_SPECS``): ``insloc-trunk`` / ``insloc-fpn`` keep only the trunk /
the trunk and FPN of the InsLoc pretraining (the rest re-initialised); ``*-xnorm`` fine-tune with the
official InsLoc fine-tuning head (``--box-head-extra-norm``: a new BN after the box head's fc);
``insloc-newfc`` keeps everything but the box head's fc (re-initialised); ``insloc-batchbg`` pretrains
with the backgrounds taken from the other images of the batch, ``insloc-sgd`` with SGD at the official lr,
``insloc-e240-*`` over four times the pretraining steps; ``*-c256`` rows pretrain (InsLoc and MoCo v2 alike) at
the official 256-pixel canvas instead of the configuration's.

Both pretrainings use the same unlabelled images, trunk, schedule and seed. The unlabelled folder
is built here in the work folder: the photographs of the raccoon train split (never the test
split; the script checks) plus the real photographs shipped with scikit-image. Labels are not used
by pretraining.

The stages run the real CLIs (``python -m insloc_hub.training.cli pretrain|finetune``) as
subprocesses, ``--jobs`` at a time, each with ``--threads`` intra-op threads; finished stages are
reused when the script is run again with the same ``--work`` folder (``--resume auto``).

Usage::

    python benchmarks/transfer_raccoon.py --config cpu --work /tmp/raccoon-transfer --table table.md
    python benchmarks/transfer_raccoon.py --config gpu --work runs/raccoon --table table.md --device cuda

``--config cpu`` is sized for a 2-core CPU (about 25 minutes); ``--config gpu`` is the same
experiment at a useful size (ResNet-50 FPN, official 256-pixel pretraining canvas, detection at
480-800 pixels, 5 seeds) for one GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Row:
    """One row of the table: where its detector's weights come from and how it is fine-tuned."""

    title: str
    pretraining: str | None = None  # a key of PRETRAININGS; None: random init
    parts: tuple[str, ...] | None = None  # keep only these parts of the pretrained bundle (the rest re-initialised)
    finetune_flags: tuple[str, ...] = ()


#: pretraining runs rows can share: (method, extra pretrain flags)
PRETRAININGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "moco": ("moco", ()),
    "insloc": ("insloc", ()),
    # issue 13's option: both backgrounds from the other images of the batch (device composition, here on the CPU)
    "insloc-batchbg": ("insloc", ("--gpu-composition", "on", "--batch-backgrounds")),
    # four times the pretraining budget (240 epochs; the cosine stretched to match)
    "insloc-e240": ("insloc", ("--epochs", "240")),
    # the preset's loss with the official optimiser: SGD, lr 0.03 per 256, wd 1e-4, no warmup
    "insloc-sgd": ("insloc", ("--optimizer", "sgd", "--lr", "0.03", "--weight-decay", "1e-4", "--warmup-epochs", "0")),
    # the official 256-pixel canvas instead of the config's (both methods, so MoCo v2 keeps the same budget)
    "insloc-c256": ("insloc", ("--canvas", "256")),
    "moco-c256": ("moco", ("--canvas", "256")),
    # both at canvas 256 over four times the budget: where the preset's in-batch top-1 passes 50 %
    "insloc-c256-e240": ("insloc", ("--canvas", "256", "--epochs", "240")),
    "moco-c256-e240": ("moco", ("--canvas", "256", "--epochs", "240")),
}
EXTRA_NORM = ("--box-head-extra-norm",)  # the official InsLoc fine-tuning head (a new BN after the head's fc)
NEW_FC = ("--reinit", "box_head.fc1")  # the pretrained box head's convs, its fc left at a fresh init
ROW_SPECS: dict[str, Row] = {
    "random": Row("random init"),
    "moco": Row("MoCo v2 (image-level)", "moco"),
    "insloc": Row("InsLoc", "insloc"),
    # diagnostic rows, not run by default
    "insloc-trunk": Row("InsLoc trunk, FPN and box head re-initialised", "insloc", parts=("trunk",)),
    "insloc-fpn": Row("InsLoc trunk and FPN, box head re-initialised", "insloc", parts=("trunk", "fpn")),
    "random-xnorm": Row("random init, extra head BN", finetune_flags=EXTRA_NORM),
    "moco-xnorm": Row("MoCo v2, extra head BN", "moco", finetune_flags=EXTRA_NORM),
    "insloc-xnorm": Row("InsLoc, extra head BN", "insloc", finetune_flags=EXTRA_NORM),
    "insloc-trunk-xnorm": Row("InsLoc trunk (FPN, box head re-initialised), extra head BN", "insloc",
                              parts=("trunk",), finetune_flags=EXTRA_NORM),
    "insloc-fpn-xnorm": Row("InsLoc trunk and FPN (box head re-initialised), extra head BN", "insloc",
                            parts=("trunk", "fpn"), finetune_flags=EXTRA_NORM),
    "insloc-newfc": Row("InsLoc, box head fc re-initialised (its convs kept)", "insloc", finetune_flags=NEW_FC),
    "insloc-newfc-xnorm": Row("InsLoc, box head fc re-initialised (its convs kept), extra head BN", "insloc",
                              finetune_flags=NEW_FC + EXTRA_NORM),
    "insloc-sgd": Row("InsLoc, preset loss with SGD at the official lr", "insloc-sgd"),
    "insloc-sgd-xnorm": Row("InsLoc, preset loss with SGD at the official lr, extra head BN", "insloc-sgd",
                            finetune_flags=EXTRA_NORM),
    "insloc-e240-fpn": Row("InsLoc, 4x pretraining steps: trunk and FPN, box head re-initialised", "insloc-e240",
                           parts=("trunk", "fpn")),
    "insloc-e240-newfc": Row("InsLoc, 4x pretraining steps: box head fc re-initialised (its convs kept)",
                             "insloc-e240", finetune_flags=NEW_FC),
    "insloc-batchbg": Row("InsLoc, in-batch backgrounds", "insloc-batchbg"),
    "moco-c256": Row("MoCo v2, canvas 256", "moco-c256"),
    "insloc-c256": Row("InsLoc, canvas 256", "insloc-c256"),
    "insloc-c256-fpn": Row("InsLoc, canvas 256: trunk and FPN, box head re-initialised", "insloc-c256",
                           parts=("trunk", "fpn")),
    "insloc-c256-newfc": Row("InsLoc, canvas 256: box head fc re-initialised (its convs kept)", "insloc-c256",
                             finetune_flags=NEW_FC),
    "moco-c256-xnorm": Row("MoCo v2, canvas 256, extra head BN", "moco-c256", finetune_flags=EXTRA_NORM),
    "insloc-c256-trunk-xnorm": Row("InsLoc, canvas 256: trunk (FPN, box head re-initialised), extra head BN",
                                   "insloc-c256", parts=("trunk",), finetune_flags=EXTRA_NORM),
    "insloc-c256-fpn-xnorm": Row("InsLoc, canvas 256: trunk and FPN (box head re-initialised), extra head BN",
                                 "insloc-c256", parts=("trunk", "fpn"), finetune_flags=EXTRA_NORM),
    "moco-c256-e240": Row("MoCo v2, canvas 256, 4x pretraining steps", "moco-c256-e240"),
    "insloc-c256-e240-fpn": Row("InsLoc, canvas 256, 4x pretraining steps: trunk and FPN, box head re-initialised",
                                "insloc-c256-e240", parts=("trunk", "fpn")),
    "moco-c256-e240-xnorm": Row("MoCo v2, canvas 256, 4x pretraining steps, extra head BN", "moco-c256-e240",
                                finetune_flags=EXTRA_NORM),
    "insloc-c256-e240-trunk-xnorm": Row("InsLoc, canvas 256, 4x pretraining steps: trunk (FPN, box head "
                                        "re-initialised), extra head BN", "insloc-c256-e240", parts=("trunk",),
                                        finetune_flags=EXTRA_NORM),
}
ROWS = ("random", "moco", "insloc")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"

#: scikit-image sample photographs that load without a download (real photos; synthetic ones left out)
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "clock", "hubble_deep_field",
    "immunohistochemistry", "retina", "grass", "gravel", "brick", "stereo_motorcycle",
)  # fmt: skip


@dataclass
class Budget:
    """One configuration of the experiment: pretraining and fine-tuning budgets, shared by all rows."""

    name: str
    trunk: str
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_canvas: int
    pretrain_queue: int
    pretrain_lr: float
    pretrain_key_momentum: float
    pretrain_workers: int
    finetune_workers: int
    iterations: int
    batch_size: int
    lr: float
    warmup: int
    min_size: str
    max_size: int
    test_size: int
    seeds: int
    detector_opts: list[str] = field(default_factory=list)
    pretrain_extra: list[str] = field(default_factory=list)


CONFIGS: dict[str, Budget] = {
    # ~25 min on 2 CPU cores: ResNet-18 at 1/4 width, 128-pixel pretraining canvas, 256-320-pixel detection.
    # Pretraining lr is the official 0.03 per 256 images (10x that collapses InsLoc's embeddings: its loss
    # then sits at exactly chance); key momentum 0.99 instead of 0.999 so the key encoder moves in 660 steps.
    "cpu": Budget(
        name="cpu", trunk="tiny-fpn", pretrain_epochs=60, pretrain_batch=16, pretrain_canvas=128,
        pretrain_queue=256, pretrain_lr=0.03, pretrain_key_momentum=0.99, pretrain_workers=0, finetune_workers=0,
        iterations=300, batch_size=4, lr=0.02, warmup=50,
        min_size="256-320", max_size=512, test_size=320, seeds=3,
        detector_opts=["rpn_pre_nms_top_n_train=1000", "rpn_post_nms_top_n_train=500",
                       "box_batch_size_per_image=128"],
    ),
    # one GPU: ResNet-50 FPN, official canvas; still a small-data pretraining (a few hundred photos)
    "gpu": Budget(
        name="gpu", trunk="r50-fpn", pretrain_epochs=200, pretrain_batch=64, pretrain_canvas=256,
        pretrain_queue=4096, pretrain_lr=0.03, pretrain_key_momentum=0.99, pretrain_workers=8, finetune_workers=4,
        iterations=3000, batch_size=8, lr=0.01, warmup=200,
        min_size="480-800", max_size=1333, test_size=800, seeds=5,
    ),
}


# ----------------------------------------------------------------------------------------------
# Unlabelled images
# ----------------------------------------------------------------------------------------------


def _split_names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def build_unlabelled_folder(data: Path, folder: Path) -> dict[str, int]:
    """Raccoon train-split photos + scikit-image photos in ``folder`` (created); returns counts.

    Raises:
        RuntimeError: a test-split image would end up in the folder.
    """
    train = _split_names(data / "train_split.txt")
    test = set(_split_names(data / "test_split.txt"))
    leaked = test & set(train)
    if leaked:
        raise RuntimeError(f"train and test splits overlap: {sorted(leaked)[:5]}")
    folder.mkdir(parents=True, exist_ok=True)
    image_dir = data / "images"
    for name in train:
        target = folder / f"raccoon-train-{name}"
        if not target.exists():
            os.symlink((image_dir / name).resolve(), target)
    from skimage import data as skdata

    extra = 0
    for name in SKIMAGE_PHOTOS:
        arrays = getattr(skdata, name)()
        arrays = list(arrays[:2]) if isinstance(arrays, tuple) else [arrays]  # stereo pair: both views
        for k, array in enumerate(arrays):
            target = folder / f"skimage-{name}{'-' + str(k) if len(arrays) > 1 else ''}.jpg"
            if not target.exists():
                Image.fromarray(np.asarray(array)).convert("RGB").save(target, quality=95)
            extra += 1
    present = {p.name for p in folder.iterdir()}
    if any(f"raccoon-train-{name}" in present for name in test):
        raise RuntimeError("a test-split image is in the unlabelled folder")
    return {"raccoon_train": len(train), "skimage": extra, "total": len(present)}


def parts_folder(folder: Path, out: Path, parts: tuple[str, ...]) -> Path:
    """A copy of a backbone hub folder holding only ``parts`` (e.g. the trunk, like a converted MoCo ResNet)."""
    import dataclasses

    from insloc_hub.models import InsLocBackbone
    from insloc_hub.pretrained import from_pretrained, save_pretrained

    full = from_pretrained(folder)
    kept = InsLocBackbone(dataclasses.replace(full.config, parts=parts))
    kept.load_state_dict({k: v for k, v in full.state_dict().items() if k.split(".")[0] in parts})
    provenance = {**full.hub_config.get("provenance", {}), "derived": f"{'+'.join(parts)} of {folder}"}
    return save_pretrained(kept, out, name=out.name, provenance=provenance)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run a CLI command, its output to ``log``; returns (wall seconds, CPU seconds of the process).

    CPU seconds (user + system, from ``wait4``) do not depend on what else runs on the machine, so
    they size the experiment even on a shared one. Raises on failure with the log tail.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed ({process.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


CLI = [sys.executable, "-m", "insloc_hub.training.cli"]


#: optimisation settings a pretraining preset keeps when it sets them (explicit flags would override it); the
#: budget (epochs, batch, canvas, queue) always comes from the config, so every row has the same budget
PRESET_OWNED = {"lr": "--lr", "key_momentum": "--key-momentum"}


def pretrain_command(method: str, unlabelled: Path, out: Path, budget: Budget, device: str, seed: int,
                     preset: str | None = None) -> list[str]:
    """The ``pretrain`` CLI call of one row; with ``preset``, the preset's lr and key momentum win (if it sets them)."""
    owned: set[str] = set()
    if preset is not None:
        from insloc_hub.training.pretraining.engine import PRETRAIN_PRESETS

        owned = set(PRETRAIN_PRESETS.get(preset, {})) & set(PRESET_OWNED)
    optimisation = {"lr": str(budget.pretrain_lr), "key_momentum": str(budget.pretrain_key_momentum)}
    cmd = [*CLI, "pretrain", "--data", str(unlabelled), "--output", str(out),
           "--arch", budget.trunk, "--method", method, "--epochs", str(budget.pretrain_epochs),
           "--batch-size", str(budget.pretrain_batch), "--canvas", str(budget.pretrain_canvas),
           "--queue-size", str(budget.pretrain_queue)]
    for name, value in optimisation.items():
        if name not in owned:
            cmd += [PRESET_OWNED[name], value]
    cmd += ["--workers", str(budget.pretrain_workers), "--log-every", "10", "--keep-checkpoints", "1", "--seed",
            str(seed), "--device", device, "--dataset-name", "raccoon-train+skimage-photos", "--resume", "auto",
            *budget.pretrain_extra]
    if preset is not None:
        cmd += ["--preset", preset]
    return cmd


def pretrain_settings(run: Path) -> str:
    """What a finished pretraining actually used (from its ``config.json``), for the table header."""
    path = run / "config.json"
    if not path.is_file():
        return "settings unknown (no config.json)"
    cfg = json.loads(path.read_text())
    scaled = cfg.get("resolved", {}).get("scaled_lr", cfg["lr"] * cfg["batch_size"] / 256)
    parts = [f"{cfg.get('optimizer', 'sgd')} lr {scaled:g} ({cfg['lr']:g} per 256)", f"wd {cfg['weight_decay']:g}",
             f"warmup {cfg.get('warmup_epochs', 0)} epochs", f"key momentum {cfg['key_momentum']:g}",
             f"T {cfg['temperature']:g}", f"canvas {cfg['canvas']}"]
    for name in ("projection_norm", "inbatch_negatives", "symmetric_loss", "predictor_hidden"):
        if cfg.get(name) not in (None, False, 0, "off"):
            parts.append(f"{name} {cfg[name]}")
    if cfg.get("queue_negatives") is False:
        parts.append("no queue negatives")
    preset = f"preset {cfg['preset']}: " if cfg.get("preset") else ""
    return preset + ", ".join(parts)


def finetune_command(init: str, data: Path, out: Path, budget: Budget, device: str, seed: int) -> list[str]:
    cmd = [*CLI, "finetune", "--data", str(data / "train_split.txt"), "--val-data", str(data / "test_split.txt"),
           "--init", init, "--arch", "faster_rcnn_fpn", "--iterations", str(budget.iterations),
           "--batch-size", str(budget.batch_size), "--lr", str(budget.lr), "--warmup", str(budget.warmup),
           "--min-size", budget.min_size, "--max-size", str(budget.max_size), "--test-size", str(budget.test_size),
           "--seed", str(seed), "--workers", str(budget.finetune_workers), "--log-every", "50", "--device", device,
           "--output", str(out), "--resume", "auto"]
    if init == "random":
        cmd += ["--preset", budget.trunk]
    for opt in budget.detector_opts:
        cmd += ["--detector-opt", opt]
    return cmd


def _metrics(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    return {"AP": 100 * metrics["ap"], "AP50": 100 * metrics["ap50"], "AP75": 100 * metrics["ap75"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def render_table(results: dict[str, list[dict[str, float]]], budget: Budget, seeds: list[int]) -> str:
    """Markdown: mean +- sample std over seeds, then the per-seed values."""
    lines = [
        f"| init ({budget.trunk} trunk) | AP | AP50 | AP75 | seeds |",
        "|---|---|---|---|---|",
    ]
    for row, runs in results.items():
        cells = []
        for key in ("AP", "AP50", "AP75"):
            mean, std = _mean_std([r[key] for r in runs])
            cells.append(f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {ROW_SPECS[row].title} | {' | '.join(cells)} | {len(runs)} |")
    lines += ["", "Per seed (AP / AP50 / AP75):", "", "| init | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for row, runs in results.items():
        cells = [f"{r['AP']:.1f} / {r['AP50']:.1f} / {r['AP75']:.1f}" for r in runs]
        lines.append(f"| {ROW_SPECS[row].title} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="raccoon folder (read only)")
    parser.add_argument("--work", type=Path, required=True, help="work folder: unlabelled images, runs, logs")
    parser.add_argument("--table", type=Path, required=True, help="markdown table to write")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated subset of {tuple(ROW_SPECS)} (default: %(default)s)")
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds (default: the config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=2, help="stages run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per stage")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--insloc-preset", help="pretraining preset for the InsLoc row only (e.g. small-data); the "
                                                "config's epochs, batch, canvas and queue still apply (the same "
                                                "budget as MoCo v2), the preset's own lr and key momentum win when it "
                                                "sets them (the table header says what each row used)")
    args = parser.parse_args(argv)

    budget = CONFIGS[args.config]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROW_SPECS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {tuple(ROW_SPECS)}")
    seeds = list(range(args.seeds or budget.seeds))
    data = args.data.resolve()
    if not (data / "train_split.txt").is_file() or not (data / "test_split.txt").is_file():
        parser.error(f"{data} has no train_split.txt / test_split.txt (the raccoon set)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cpu_times: dict[str, float] = {}
    started = time.perf_counter()

    counts = build_unlabelled_folder(data, work / "unlabelled")
    print(f"unlabelled folder {work / 'unlabelled'}: {counts}", flush=True)

    # Pretrainings first, then every (row, seed) fine-tuning as soon as its init exists (random at once).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs))
    pending: dict[concurrent.futures.Future[tuple[float, float]], str] = {}
    pretrained: dict[str, str] = {}  # pretraining name -> its finished hub folder
    queued: list[tuple[int, str, list[str]]] = []  # (seed, stage name, command) not yet submitted

    def submit_finetunes(row: str) -> None:
        spec = ROW_SPECS[row]
        init = "random"
        if spec.pretraining is not None:
            init = pretrained[spec.pretraining]
            if spec.parts is not None:
                init = str(parts_folder(Path(init), work / f"{row}-init", spec.parts))
        for seed in seeds:
            name = f"finetune-{row}-seed{seed}"
            out = work / name
            if (out / "final" / "config.json").is_file() and (out / "eval" / "metrics.json").is_file():
                print(f"{name}: reusing {out}", flush=True)
                continue
            cmd = finetune_command(init, data, out, budget, args.device, seed) + list(spec.finetune_flags)
            queued.append((seed, name, cmd))

    def submit_queued() -> None:
        # seed-major, so the rows advance together: a run stopped early still holds whole seeds of every row
        for _, name, cmd in sorted(queued, key=lambda job: job[0]):
            pending[pool.submit(_run, cmd, work / "logs" / f"{name}.log", args.threads)] = name
        queued.clear()

    def pretraining_done(name: str) -> None:
        pretrained[name] = str(work / f"pretrain-{name}" / "final")
        for row in rows:
            if ROW_SPECS[row].pretraining == name:
                submit_finetunes(row)

    for name in dict.fromkeys(ROW_SPECS[r].pretraining for r in rows if ROW_SPECS[r].pretraining):
        out = work / f"pretrain-{name}"
        if (out / "final" / "config.json").is_file():
            print(f"pretrain-{name}: reusing {out / 'final'}", flush=True)
            pretraining_done(name)
            continue
        method, flags = PRETRAININGS[name]
        preset = args.insloc_preset if method == "insloc" else None
        cmd = pretrain_command(method, work / "unlabelled", out, budget, args.device, args.pretrain_seed, preset)
        cmd += flags
        print(f"pretrain-{name}: {' '.join(cmd[len(CLI):])}", flush=True)
        pending[pool.submit(_run, cmd, work / "logs" / f"pretrain-{name}.log", args.threads)] = f"pretrain-{name}"
    for row in rows:
        if ROW_SPECS[row].pretraining is None:
            submit_finetunes(row)
    submit_queued()
    while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            name = pending.pop(future)
            timings[name], cpu_times[name] = future.result()
            print(f"{name}: {timings[name]:.0f} s wall, {cpu_times[name]:.0f} s CPU", flush=True)
            if name.startswith("pretrain-"):
                pretraining_done(name[len("pretrain-"):])
                submit_queued()
    pool.shutdown()

    results = {row: [_metrics(work / f"finetune-{row}-seed{seed}") for seed in seeds] for row in rows}
    total = time.perf_counter() - started
    table = render_table(results, budget, seeds)
    header = (
        f"Raccoon transfer, config `{budget.name}` ({datetime.date.today().isoformat()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, device {args.device}); total {total / 60:.1f} min.\n\n"
        f"Pretraining budget (MoCo v2 and InsLoc alike): {counts['total']} unlabelled photos, {budget.trunk}, "
        f"{budget.pretrain_epochs} epochs, batch {budget.pretrain_batch}, canvas {budget.pretrain_canvas}, "
        f"queue {budget.pretrain_queue}. "
        + "".join(f"{name}: {pretrain_settings(work / f'pretrain-{name}')}. " for name in pretrained)
        + "Fine-tuning (every row): "
        f"Faster R-CNN FPN, {budget.iterations} iterations, batch {budget.batch_size}, lr {budget.lr}, "
        f"short side {budget.min_size} (test {budget.test_size}); test split of 40 photos.\n\n"
    )
    args.table.parent.mkdir(parents=True, exist_ok=True)
    stages = ", ".join(f"{k} {v / 60:.1f} min ({cpu_times[k] / 60:.1f} CPU-min)" for k, v in sorted(timings.items()))
    args.table.write_text(header + table + (f"\nStage wall times (CPU time): {stages}.\n" if stages else ""))
    (work / "results.json").write_text(json.dumps(
        {"config": asdict(budget), "seeds": seeds, "results": results, "timings_s": timings, "cpu_s": cpu_times,
         "total_s": total, "unlabelled": counts}, indent=2) + "\n")
    print(header + table)
    print("stage timings (s):", json.dumps({k: round(v) for k, v in sorted(timings.items())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
