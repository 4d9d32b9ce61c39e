"""The pretraining loop: config, data, DDP, AMP, checkpoint/resume, logging, export.

:class:`PretrainConfig` holds every hyper-parameter (each one is also an ``insloc-train pretrain``
flag, see ``pretrain.py``); :func:`train` runs it. Defaults are the official recipe
(limbo0000/InstanceLoc @ a419bb6, ``configs/FPN/insloc_fpn_200ep.py``; sources next to each field).

Exact resumption. A run killed at any moment (SIGKILL included) and resumed with ``--resume auto``
ends with the same weights as an uninterrupted run (bit for bit on CPU in deterministic mode),
because every random number is a function of the seed and a position, never of how far a process
got:

* data: the sampler's order of epoch ``e`` is drawn from ``(seed, e)``; sample ``i`` of epoch ``e``
  from ``(seed, e, i)`` (``pretrain_data.sample_rng``), whatever worker decodes it;
* model: the box jitter and the shuffle-BN permutation of global step ``s`` come from a generator
  seeded with ``(seed, s)``;
* resuming at step ``j`` of epoch ``e`` starts the sampler at its ``j``-th batch: the skipped
  batches are never loaded, so they consume no randomness;
* the checkpoint holds both encoders, the queues and their pointer, the optimizer (momentum
  buffers), the schedule, the epoch / step-in-epoch / global step and the RNG states.

Global batches do not depend on the number of processes (rank ``r`` takes the ``r``-th slice of
each global batch), so a run may also be resumed on another number of GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from insloc_hub import __version__
from insloc_hub.configs import JsonConfig, device_name, flag, output_folder
from insloc_hub.errors import CheckpointError, ConfigError, DatasetError, WeightsMismatchError
from insloc_hub.models import PRESETS, BackboneConfig, InsLocBackbone, backbone_config
from insloc_hub.pretrained import save_pretrained
from insloc_hub.training.pretraining.compose import CompositionConfig, compose_batch, make_composition_grid
from insloc_hub.training.pretraining.diagnostics import CollapseMonitor, plot_curves, summarize
from insloc_hub.training.pretraining.insloc import PROJECTION_NORMS, InsLoc, host_to_device
from insloc_hub.training.pretraining.moco import MoCo, MocoDecodeDataset, MocoPretrainDataset, moco_backbone_config
from insloc_hub.training.pretraining.pretrain_data import (
    DevicePrefetcher,
    InsLocBytesDataset,
    InsLocPretrainDataset,
    UnlabelledImages,
    collate_decoded,
    compose_encoded_batch,
)
from insloc_hub.training.runtime import distributed as dist_utils
from insloc_hub.training.runtime import run as run_lib
from insloc_hub.training.runtime.checkpoint import check_config, list_checkpoints, load_newest_usable
from insloc_hub.training.runtime.run import MetricsWriter, StepTimer, seed_everything

__all__ = ["Runtime", "build_dataset", "resolve_runtime", "PretrainConfig", "PRETRAIN_PRESETS",
           "RESUME_IGNORED_FIELDS", "CHECKPOINT_FORMAT", "ResumableDistributedSampler", "cosine_by_epoch",
           "set_schedule_epoch", "build_model", "compile_encoders", "train", "train_step", "batch_to_views",
           "host_boxes", "jitter_on_host", "resolve_config", "export_checkpoint", "query_backbone_config",
           "device_batches", "build_optimizer_and_schedule"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "insloc-hub/pretrain-checkpoint/v1"
METHODS = ("insloc", "moco")
TRI_STATE = ("auto", "on", "off")
OPTIMIZERS = ("sgd", "adamw")
EMBED_INITS = ("official", "default")


@dataclass
class PretrainConfig(JsonConfig):
    """Every setting of a pretraining run; serialised to ``RUN_DIR/config.json`` and checkpoints.

    Defaults are the official FPN recipe; each field's help names its source, and its limits are
    checked by the ``pretrain`` parser and by :meth:`validate` alike.
    """

    config_kind = "pretraining config"

    data: str = flag("", help="folder of images (any tree, class folders ignored) or a text file listing them "
                              "(official DATA.md)")
    output: str = flag("", help="run folder: config.json, metrics.jsonl, checkpoints, final/ hub folder",
                       parse=output_folder)
    data_root: str | None = flag(None, help="folder that the paths of a --data list file are relative to (default: "
                                            "the list's folder)")
    dataset_name: str | None = flag(None, help="dataset name recorded in the model card (e.g. imagenet-1k)")
    preset: str | None = flag(None, help="tiny (CPU smoke run), r50-fpn-200ep / r50-fpn-400ep (official), "
                                         "r50-c4-200ep (reconstruction), small-data (a few hundred to a few "
                                         "thousand photos; not the official recipe, see docs/pretraining.md)")
    arch: str = flag("r50-fpn", help="architecture preset: r50-fpn (official), r50-c4 (reconstruction), r18-fpn, "
                                     "r101-fpn, tiny-fpn, tiny-c4", choices=sorted(PRESETS))
    method: str = flag("insloc", help="insloc, or moco (image-level MoCo v2 baseline on the same trunk, data and "
                                      "schedule)", choices=METHODS)
    epochs: int = flag(200, help="epochs; official 200 (configs/FPN/insloc_fpn_200ep.py total_epochs), 400ep models "
                                 "also released", min=1)
    batch_size: int = flag(256, help="GLOBAL batch over all GPUs; official 256 = 8 GPUs x samples_per_gpu=32", min=1)
    lr: float = flag(0.03, help="base learning rate for a batch of 256, scaled linearly (config L110: 0.03; "
                                "GETSTARTED.md)", above=0)
    optimizer: str = flag("sgd", help="sgd (official, config L110) or adamw (NOT official; preset small-data: "
                                      "short runs from random init); --momentum/--nesterov apply to sgd only",
                          choices=OPTIMIZERS)
    momentum: float = flag(0.9, help="SGD momentum (config L110: 0.9)", min=0, max=1)
    nesterov: bool = flag(True, help="Nesterov momentum (config L110: nesterov=True, unlike MoCo)")
    weight_decay: float = flag(1e-4, help="weight decay on ALL parameters, BN and biases included (config L110: "
                                          "1e-4)", min=0)
    warmup_epochs: int = flag(0, help="linear lr warmup over the first N epochs, then the cosine (official: 0, no "
                                      "warmup)", min=0)
    dim: int = flag(128, help="embedding size (momentum_cfg dim=128, config L48)", min=1)
    queue_size: int = flag(65536, help="queue length K per level (momentum_cfg K=65536, config L48); multiple of "
                                       "--batch-size", min=1)
    key_momentum: float = flag(0.999, help="key-encoder momentum m (momentum_cfg m=0.999, config L48)", min=0, max=1)
    temperature: float = flag(0.2, help="InfoNCE temperature T (momentum_cfg T=0.2, config L48)", above=0)
    canvas: int = flag(256, help="composition canvas side, a multiple of 16 (CopyAndPaste base_scale=(256, 256), "
                                 "config L5-16)", min=16)
    box_jitter: bool = flag(True, help="jitter the query's P5 box (AnchorAugHead, config L41-47 / L93-106)")
    c4_roi_size: int = flag(14, help="RoIAlign size on res4 for the C4 reconstruction (not in the official code)",
                            min=1)
    shuffle_bn: bool = flag(True, help="shuffle keys across GPUs for the key forward (insloc_fpn.py L304-336, "
                                       "L401-460)")
    sync_bn: bool = flag(False, help="SyncBatchNorm in both encoders (NOT official: plain BN per GPU, config L37-92)")
    projection_norm: str = flag("off", help="BatchNorm in the projection fc2/embed (NOT official): off, batch (MoCo "
                                            "v3 style) or level (statistics per FPN level); preset small-data: batch",
                                choices=PROJECTION_NORMS)
    inbatch_negatives: bool = flag(False, help="the other keys of the batch are negatives too (NOT official; preset "
                                               "small-data)")
    queue_negatives: bool = flag(True, help="the queue's keys are negatives (official); off (NOT official, needs "
                                            "--inbatch-negatives): only the keys of the current batch, as MoCo v3")
    symmetric_loss: bool = flag(False, help="both views serve as query, the loss is the mean of the two directions "
                                            "(NOT official; MoCo v3 style)")
    predictor_hidden: int = flag(0, help="hidden width of a predictor MLP on the query side (dim-hidden-BN-ReLU-dim, "
                                         "BYOL / MoCo v3 style; NOT official); 0: none", min=0)
    embed_init: str = flag("official", help="init of the 128-d embed layer: official (N(0, 0.01)) or default "
                                            "(nn.Linear's)", choices=EMBED_INITS)
    workers: int = flag(4, help="data loader processes per GPU (workers_per_gpu=4 in the config)", min=0)
    seed: int = flag(0, help="random seed; data order and augmentation are functions of (seed, epoch, index)", min=0)
    deterministic: bool = flag(False, help="deterministic kernels (torch.use_deterministic_algorithms, cuDNN "
                                           "deterministic)")
    amp: str = flag("auto", help="mixed precision: auto = bf16 autocast on CUDA, off on CPU (official: fp32)",
                    choices=TRI_STATE)
    channels_last: str = flag("auto", help="channels-last memory format: auto = on for CUDA", choices=TRI_STATE)
    compile: bool = flag(False, help="torch.compile the encoders' modules (slow start, faster steps)")
    gpu_composition: str = flag("auto", help="compose on the device (auto = on for CUDA): loader workers only read "
                                             "JPEG bytes, decode (nvJPEG on CUDA) and the batched composer run on "
                                             "the device; off: the fast PIL pipeline in the workers",
                                choices=TRI_STATE)
    batch_backgrounds: bool = flag(False, help="device composition only, NOT the official recipe: take both "
                                               "backgrounds from the other images of the batch (one decode per "
                                               "sample instead of three)")
    max_side: int = flag(512, help="MoCo device composition: images are decoded and downscaled to this long side "
                                   "first", min=1)
    device: str = flag("auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N or mps",
                       parse=device_name)
    threads: int = flag(0, help="torch intra-op CPU threads per process (0: torch's default); 1 avoids spin-wait "
                                "slowdowns on a busy CPU", min=0)
    checkpoint_every_steps: int = flag(1000, help="write a checkpoint every N steps (0: only at epoch ends); "
                                                  "official: every 5 epochs", min=0)
    keep_checkpoints: int = flag(3, help="keep the newest N checkpoints (0 keeps all)", min=0)
    log_every: int = flag(20, help="write metrics.jsonl / progress every N steps", min=1)
    tensorboard: bool = flag(False, help="also log the scalars to RUN_DIR/tensorboard (needs: pip install "
                                         "tensorboard)")
    max_steps: int = flag(0, help="stop after this many steps in total (0: run all epochs); the schedule still spans "
                                  "--epochs", min=0)
    resume: str | None = flag(None, help="'auto' (newest checkpoint in --output, if any) or a checkpoint path")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible settings (checked again once the data is known)."""
        self.check_limits()
        if self.queue_size % self.batch_size != 0:
            raise ConfigError(
                f"--queue-size {self.queue_size} must be a multiple of the global --batch-size {self.batch_size} "
                f"(the queue is filled one whole batch at a time; official 65536 / 256). For example use "
                f"--queue-size {max(self.batch_size, self.queue_size // self.batch_size * self.batch_size)}."
            )
        if not self.queue_negatives and not self.inbatch_negatives:
            raise ConfigError("--no-queue-negatives needs --inbatch-negatives (otherwise the loss has no negatives)")
        if self.canvas % 16 != 0:
            raise ConfigError(f"--canvas must be a multiple of 16 (box-jitter anchors), got {self.canvas}")
        if self.method == "moco" and not self.box_jitter:
            raise ConfigError("--no-box-jitter applies to --method insloc only (MoCo v2 has no boxes); drop it")
        if self.projection_norm == "level" and (self.method == "moco" or self.arch.endswith("-c4")):
            raise ConfigError("--projection-norm level keeps statistics per FPN level, and "
                              f"{'MoCo v2' if self.method == 'moco' else self.arch} has one level: use batch")

    @property
    def scaled_lr(self) -> float:
        """``lr * batch_size / 256``: the linear scaling rule (official: 0.03 for 8 GPUs x 32)."""
        return self.lr * self.batch_size / 256.0


# Fields that may change between a run and its resumption (they do not change the results).
RESUME_IGNORED_FIELDS = frozenset({
    "data", "data_root", "dataset_name", "output", "preset", "resume", "workers", "device", "compile", "threads",
    "checkpoint_every_steps", "keep_checkpoints", "log_every", "max_steps", "tensorboard",
})

_OFFICIAL_FPN = dict(arch="r50-fpn", method="insloc", epochs=200, batch_size=256, lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=1e-4, dim=128, queue_size=65536, key_momentum=0.999, temperature=0.2, canvas=256,
                     box_jitter=True, shuffle_bn=True, sync_bn=False, workers=4)
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # CPU smoke run: ResNet-18 at 1/4 width, 64 px canvas, short queue, a few steps per epoch.
    "tiny": dict(arch="tiny-fpn", canvas=64, queue_size=256, batch_size=16, epochs=2, workers=2,
                 log_every=1, checkpoint_every_steps=0, keep_checkpoints=2),
    # The released recipe (configs/FPN/insloc_fpn_200ep.py) and its 400-epoch variant (MODELZOO.md).
    "r50-fpn-200ep": _OFFICIAL_FPN,
    "r50-fpn-400ep": dict(_OFFICIAL_FPN, epochs=400),
    # A few hundred to a few thousand photos on one machine: the best combination measured at batch 16 on the
    # raccoon CPU budget (docs/pretraining.md, "Collapse"); every deviation is recorded in the card with its
    # reason (DEVIATION_REASONS). Choose the size with --arch (tiny-fpn, r18-fpn, r50-fpn).
    "small-data": dict(method="insloc", batch_size=16, optimizer="adamw", lr=0.048, weight_decay=0.05,
                       warmup_epochs=5, queue_size=256, key_momentum=0.0, projection_norm="batch",
                       inbatch_negatives=True, queue_negatives=False),
    # Reconstruction: the C4 pretraining config was never released (issue #14).
    "r50-c4-200ep": dict(_OFFICIAL_FPN, arch="r50-c4", c4_roi_size=14),
}

#: every field's default: the official recipe, and the value a checkpoint written before a field existed was
#: trained with (each field added later defaults to the behaviour that came before it)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}

#: the settings of the released recipe (the defaults) that change what is learned; a run records where it differs
RECIPE_FIELDS = ("batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs", "dim",
                 "queue_size", "key_momentum", "temperature", "canvas", "box_jitter", "shuffle_bn", "sync_bn",
                 "projection_norm", "inbatch_negatives", "queue_negatives", "symmetric_loss", "predictor_hidden",
                 "embed_init")

#: why a preset deviates from the official recipe (the ablation rows are in docs/pretraining.md, "Collapse")
DEVIATION_REASONS: dict[str, str] = {
    "projection_norm": "the N(0, 0.01) 128-d layer makes the pre-normalisation embedding tiny (|z| 0.38), so the "
                       "gradient through the L2 norm is large and nearly rank one along the mean of the post-ReLU fc "
                       "features: one SGD step takes the query cosine from 0.66 to 0.94 (probe `official`); with BN "
                       "it stays 0.03 (probe `projection-bn`); ablation rows `official` vs `projection-bn` and "
                       "`projection-bn+inbatch` (statistics per FPN level kept the cosines lower but did not learn: "
                       "row `projection-levelbn+inbatch`)",
    "inbatch_negatives": "queue-only negatives reward recency (current keys differ from older queued ones) instead of "
                         "telling the images of the batch apart: with projection BN alone the in-batch top-1 stays "
                         "at chance (6 % at step 200), with in-batch negatives it rises (11 % at step 200, 14 % "
                         "over steps 561-660); ablation rows `projection-bn` vs `projection-bn+inbatch`",
    "queue_negatives": "with queued keys as negatives the loss also falls when every current embedding moves away from "
                       "the older keys (recency): key momentum 0.9 with the queue collapses (warning at step 170, "
                       "loss 20.2 below its 22.4 chance level while the in-batch top-1 stays at chance), without the "
                       "queue the same run keeps the key cosine at 0.11 and reaches 11 % at step 200; ablation rows "
                       "`projection-bn+inbatch+adamw+km-0.9` vs `projection-bn+inbatch+no-queue+adamw+km-0.9`",
    "key_momentum": "without queued negatives the keys need not stay consistent over many steps; keys from the "
                    "current query weights (SimCLR with a stop-gradient) learn fastest: in-batch top-1 14 % at step "
                    "200 against 11 % at 0.9 and 8 % at 0.99, while the official 0.999 stays at chance (6 % at step "
                    "200); ablation rows `projection-bn+inbatch+no-queue+adamw+km-0`, `...+km-0.9`, "
                    "`projection-bn+inbatch+no-queue+adamw`, `projection-bn+inbatch+km-0.999`",
    "optimizer": "AdamW 3e-3 is the best combination measured over 660 steps (24 % over steps 561-660, row "
                 "`projection-bn+inbatch+no-queue+adamw-x3+km-0`); it is not what makes the run learn: SGD at "
                 "the official per-sample lr with the same loss gets 15 % at step 200 (row "
                 "`projection-bn+inbatch+no-queue+km-0`, not run to 660), SGD at 10x with warmup drifts (query "
                 "cosine 0.76 at step 200, row `projection-bn+inbatch+no-queue+sgd-x10-warmup`)",
    "lr": "AdamW at 3e-3 for batch 16 (0.048 per 256 under the linear scaling rule): 17 % at step 200 against 14 % "
          "at 1e-3, and 24 % over steps 561-660 (MoCo v2 in the same setting: 24 %); ablation rows "
          "`projection-bn+inbatch+no-queue+adamw-x3+km-0` vs `projection-bn+inbatch+no-queue+adamw+km-0`",
    "weight_decay": "0.05, the usual AdamW value (MoCo v3), with AdamW's decoupled decay",
    "warmup_epochs": "5 of 60 epochs of linear warmup, usual with AdamW from random init",
    "batch_size": "one machine; the collapse diagnostics and the ablations were measured at batch 16",
    "queue_size": "a multiple of the batch; unused as negatives by this preset (no queue negatives)",
}
DEVIATION_PRESETS = ("small-data",)


def resolve_config(overrides: dict[str, Any]) -> PretrainConfig:
    """Defaults < ``PRETRAIN_PRESETS[overrides["preset"]]`` < the other explicit ``overrides``."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    values: dict[str, Any] = {}
    preset = overrides.get("preset")
    if preset is not None:
        if preset not in PRETRAIN_PRESETS:
            raise ConfigError(f"unknown --preset {preset!r}; choose one of {sorted(PRETRAIN_PRESETS)}")
        values.update(PRETRAIN_PRESETS[preset])
    values.update(overrides)
    return PretrainConfig.from_dict(values)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(v) % 2**63 for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Per-epoch shuffled order, padded to whole global batches, split by rank, resumable mid-epoch.

    Like the official ``DistributedGroupSampler`` (one group, reshuffled every epoch, padded so every
    GPU gets full batches), with two additions: rank ``r`` takes the ``r``-th slice of each global
    batch, so the global batches do not depend on the number of processes; and
    :meth:`set_start_step` skips the first batches of an epoch without drawing anything.

    Yields ``(epoch, index)`` keys, which the pretraining datasets accept, so the epoch of a sample
    never depends on shared state in the workers.
    """

    def __init__(self, num_samples: int, batch_per_rank: int, world_size: int = 1, rank: int = 0, seed: int = 0
                 ) -> None:
        if num_samples <= 0 or batch_per_rank <= 0:
            raise ValueError("need a positive number of samples and batch size")
        self.num_samples, self.batch_per_rank = int(num_samples), int(batch_per_rank)
        self.world_size, self.rank, self.seed = int(world_size), int(rank), int(seed)
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / (self.batch_per_rank * self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start_step(self, step: int) -> None:
        """Begin the current epoch at its ``step``-th batch (0 for a full epoch)."""
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"start step {step} outside [0, {self.steps_per_epoch}]")
        self.start_step = int(step)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n, total = self.num_samples, self.steps_per_epoch * self.batch_per_rank * self.world_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0x5A3D)))
        order = order.repeat(math.ceil(total / n))[:total]  # padded to whole global batches by wrapping around
        # [step, rank, position in the rank's part of the global batch]
        mine = order.view(self.steps_per_epoch, self.world_size, self.batch_per_rank)[self.start_step:, self.rank]
        return ((self.epoch, index) for index in mine.flatten().tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_per_rank


def cosine_by_epoch(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """mmcv ``CosineAnnealingLrUpdaterHook(min_lr=0, by_epoch=True)`` as a ``LambdaLR``: the lr of epoch
    ``e`` is ``lr * (1 + cos(pi * e / epochs)) / 2``, fixed within the epoch, no warmup (official).

    With ``warmup_epochs`` = W > 0 (not official) the first W epochs ramp linearly, ``lr * (e + 1) / (W + 1)``
    times the cosine. Go to epoch ``e`` with :func:`set_schedule_epoch` (closed form, so resuming is exact).
    """
    def factor(epoch: int) -> float:
        ramp = (epoch + 1) / (warmup_epochs + 1) if epoch < warmup_epochs else 1.0
        return ramp * (1.0 + math.cos(math.pi * epoch / epochs)) / 2

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_schedule_epoch(schedule: torch.optim.lr_scheduler.LambdaLR, epoch: int) -> float:
    """Set the optimizer's lr to that of ``epoch`` and return it."""
    schedule.last_epoch = epoch - 1
    with warnings.catch_warnings():  # stepping before optimizer.step() is intended here: lr per epoch start
        warnings.simplefilter("ignore", UserWarning)
        schedule.step()
    return schedule.get_last_lr()[0]


def build_model(cfg: PretrainConfig) -> InsLoc:
    """The pretraining model of a config: :class:`InsLoc` or the :class:`MoCo` baseline."""
    cls = MoCo if cfg.method == "moco" else InsLoc
    return cls(cfg.arch, cfg.dim, cfg.queue_size, cfg.key_momentum, cfg.temperature,
               box_jitter=cfg.box_jitter and cfg.method == "insloc", canvas=cfg.canvas, shuffle_bn=cfg.shuffle_bn,
               c4_roi_size=cfg.c4_roi_size, projection_norm=cfg.projection_norm,
               inbatch_negatives=cfg.inbatch_negatives, embed_init=cfg.embed_init,
               symmetric_loss=cfg.symmetric_loss, predictor_hidden=cfg.predictor_hidden,
               queue_negatives=cfg.queue_negatives)


def query_backbone_config(cfg: PretrainConfig) -> BackboneConfig:
    """Architecture of the exported bundle: trunk+FPN+box head (InsLoc FPN), trunk+res5 (C4), trunk (MoCo FPN)."""
    arch = backbone_config(cfg.arch)
    return moco_backbone_config(arch) if cfg.method == "moco" else dataclasses.replace(arch, parts=None)


def composition_config(cfg: PretrainConfig) -> CompositionConfig:
    """The official composition scaled to the canvas (``for_canvas(256)`` is the official one)."""
    return CompositionConfig.for_canvas(cfg.canvas)


@dataclass
class Runtime:
    """What the ``auto`` settings of a config mean on a device."""

    amp_dtype: torch.dtype | None
    channels_last: bool
    gpu_composition: bool


def resolve_runtime(cfg: PretrainConfig, device: torch.device) -> Runtime:
    """bf16 autocast, channels-last and device composition: on for CUDA under ``auto``, else as asked."""
    cuda = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if cuda else None, "on": torch.bfloat16, "off": None}[cfg.amp]
    channels_last = {"auto": cuda, "on": True, "off": False}[cfg.channels_last]
    gpu_comp = {"auto": cuda, "on": True, "off": False}[cfg.gpu_composition]
    return Runtime(amp, channels_last, gpu_comp)


def build_dataset(cfg: PretrainConfig, images: UnlabelledImages, gpu_composition: bool) -> Any:
    """The pretraining dataset of ``cfg.method``: composed on the CPU (PIL reference) or decoded only,
    for composition on the device."""
    comp = composition_config(cfg)
    if cfg.batch_backgrounds and cfg.method == "moco":
        raise ConfigError("--batch-backgrounds applies to --method insloc only (MoCo views have no background)")
    if cfg.method == "moco":
        if gpu_composition:
            return MocoDecodeDataset(images, comp, cfg.seed, max_side=cfg.max_side)
        return MocoPretrainDataset(images, comp, cfg.seed)
    if gpu_composition:  # workers read bytes; decode (nvJPEG on CUDA) and composition on the device
        return InsLocBytesDataset(images, comp, cfg.seed, batch_backgrounds=cfg.batch_backgrounds)
    if cfg.batch_backgrounds:
        raise ConfigError("--batch-backgrounds needs composition on the device: add --gpu-composition on")
    return InsLocPretrainDataset(images, comp, cfg.seed)


def batch_to_views(batch: dict[str, Any], comp: CompositionConfig, device: torch.device, channels_last: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_img, q_box, k_img, k_box)`` on ``device`` from a CPU-composed or a decoded batch."""
    if "bg_draw" in batch:  # encoded: decode and compose on the device
        q_img, q_box, k_img, k_box = compose_encoded_batch(batch, comp, device)
    elif "params" in batch:  # decoded: compose on the device
        q_img, q_box, k_img, k_box = compose_batch(batch["fg"], batch["bg_q"], batch["bg_k"], comp,
                                                   params=batch["params"], device=device)
    else:
        q_img, q_box, k_img, k_box = (batch[k].to(device, non_blocking=device.type == "cuda")
                                      for k in ("q_img", "q_box", "k_img", "k_box"))
    if channels_last:
        q_img = q_img.contiguous(memory_format=torch.channels_last)
        k_img = k_img.contiguous(memory_format=torch.channels_last)
    return q_img, q_box, k_img, k_box


def host_boxes(batch: dict[str, Any], comp: CompositionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_box, k_box)`` of an InsLoc loader batch on the host: the boxes :func:`batch_to_views` gives the step
    (a batch for composition on the device holds its parameters, from which the boxes follow)."""
    if "params" in batch:
        q_box = torch.tensor([p.query.box(comp.canvas) for p in batch["params"]], dtype=torch.float32)
        k_box = torch.tensor([p.key.box(comp.canvas) for p in batch["params"]], dtype=torch.float32)
        return q_box, k_box
    return batch["q_box"], batch["k_box"]


def jitter_on_host(model: InsLoc, boxes: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator | None,
                   device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``model.jitter_boxes`` of host ``boxes`` (:func:`host_boxes`), sent to ``device`` without waiting.

    The box jitter's NMS has a data-dependent output size: drawn inside the step on a GPU it would make the
    step wait for the device; on the host it needs nothing from the device (the boxes come from the loader).
    """
    q_box, k_box = model.jitter_boxes(*boxes, generator=generator)
    return (None if q_box is None else host_to_device(q_box, device),
            None if k_box is None else host_to_device(k_box, device))


def deviations_from_official(cfg: PretrainConfig) -> list[str]:
    """Each setting that differs from the released recipe, with the reason when a preset documents one.

    Example: ``["lr 0.3 (official 0.03)", ...]``.
    """
    out = []
    for name in RECIPE_FIELDS:
        value, official = getattr(cfg, name), DEFAULTS[name]
        if value != official:
            reason = DEVIATION_REASONS.get(name) if cfg.preset in DEVIATION_PRESETS else None
            out.append(f"{name} {value} (official {official})" + (f": {reason}" if reason else ""))
    return out


def _provenance(cfg: PretrainConfig, position: dict[str, Any]) -> dict[str, Any]:
    """The card's training record; ``position`` holds a checkpoint's epoch, step and data-size fields."""
    variant = backbone_config(cfg.arch).variant
    steps_per_epoch = position["steps_per_epoch"]
    done = position["epoch"] + (position["step_in_epoch"] / steps_per_epoch if steps_per_epoch else 0.0)
    if cfg.optimizer == "adamw":
        opt = f"AdamW lr {cfg.lr} x {cfg.batch_size}/256 = {cfg.scaled_lr:g}"
    else:
        opt = (f"SGD lr {cfg.lr} x {cfg.batch_size}/256 = {cfg.scaled_lr:g}, momentum "
               f"{cfg.momentum}{' nesterov' if cfg.nesterov else ''}")
    warmup = f", {cfg.warmup_epochs}-epoch warmup" if cfg.warmup_epochs else ""
    recipe = (f"{cfg.method} {cfg.arch}: {opt}, wd {cfg.weight_decay}, cosine per epoch{warmup}, "
              f"batch {cfg.batch_size}, K {cfg.queue_size}, m {cfg.key_momentum}, T {cfg.temperature}, "
              f"canvas {cfg.canvas}")
    prov: dict[str, Any] = {
        "method": "InsLoc" if cfg.method == "insloc" else "MoCo v2 (image-level baseline)", "recipe": recipe,
        "epochs": cfg.epochs, "epochs_completed": round(done, 4), "steps": position["global_step"],
        "num_images": position["num_images"],
        "data_path": str(cfg.data), "seed": cfg.seed,
        "official_code": "limbo0000/InstanceLoc @ a419bb6 (configs/FPN/insloc_fpn_200ep.py)"}
    if cfg.dataset_name:
        prov["data"] = cfg.dataset_name
    deviations = deviations_from_official(cfg)
    if deviations:
        prov["deviations_from_official"] = deviations
    notes = []
    if cfg.method == "insloc" and variant == "c4":
        notes.append(f"C4 head is a reconstruction (official config unreleased, issue #14): RoIAlign "
                     f"{cfg.c4_roi_size}x{cfg.c4_roi_size} on res4 -> res5 -> avgpool -> MLP -> 128, box jitter on it")
    if cfg.method == "moco":
        notes.append("MoCo v2 baseline: two RandomResizedCrop(scale 0.2-1) views of the whole image at the canvas "
                     "size with the InsLoc colour/blur/flip ops, MLP head, the InsLoc schedule")
    if notes:
        prov["reconstruction"] = "; ".join(notes)
    return prov


def _export(model_state: dict[str, torch.Tensor], out_dir: Path, cfg: PretrainConfig, provenance: dict[str, Any],
            run_dir: Path | None, records: Sequence[dict[str, Any]], collapsed_at: int | None,
            overwrite: bool = False) -> Path:
    """The query backbone of ``model_state`` as a hub folder; the card also gets the run's diagnostics."""
    prefix = "encoder_q.backbone."
    backbone = InsLocBackbone(query_backbone_config(cfg))
    state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    header = f"the checkpoint's query backbone does not match {cfg.arch!r}:"
    WeightsMismatchError.check(backbone.state_dict(), state, header)
    backbone.load_state_dict(state)
    diagnostics = summarize(records, batch_size=cfg.batch_size, dim=cfg.dim, collapsed_at=collapsed_at)
    if diagnostics:
        provenance["diagnostics"] = diagnostics
    files = {"metrics.jsonl": "metrics.jsonl", "training_args.json": "config.json"}
    extra = {name: run_dir / file for name, file in files.items() if run_dir is not None and (run_dir / file).is_file()}
    name = f"insloc-{cfg.arch}" if cfg.method == "insloc" else f"moco-{cfg.arch}"
    return save_pretrained(backbone, out_dir, name=name, provenance=provenance, extra_files=extra, overwrite=overwrite)


def _check_format(path: Path, state: dict[str, Any]) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an insloc-train pretraining checkpoint (format {state.get('format')!r})")


def export_checkpoint(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      overwrite: bool = False) -> Path:
    """Write the query-side backbone of a pretraining checkpoint, or of the newest usable checkpoint of a run
    folder, as a hub folder (``export-weights``); ``overwrite`` replaces another model already there."""
    path = Path(checkpoint)
    candidates = list(reversed(list_checkpoints(path))) if path.is_dir() else [path]
    if not candidates:
        raise CheckpointError(f"{path} holds no checkpoint_*.pt")
    path, state, _ = load_newest_usable(candidates, _check_format)
    cfg = PretrainConfig.from_dict(state["config"])
    prov = _provenance(cfg, state)
    prov["checkpoint"] = path.name
    run_dir = path.parent if (path.parent / "config.json").is_file() else None
    records, collapsed = [], None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        records = run_lib.read_metrics(run_dir / "metrics.jsonl", state["global_step"])
        collapsed = CollapseMonitor(cfg.dim, cfg.batch_size).replay(records)
    return _export(state["model"], Path(out_dir), cfg, prov, run_dir, records, collapsed, overwrite)


def chance_loss(model: InsLoc, batch_size: int) -> float:
    """The loss of embeddings that tell nothing apart: sum over levels of weight x ln(negatives + 1)."""
    negatives = (model.K if model.queue_negatives else 0) + (batch_size - 1 if model.inbatch_negatives else 0)
    return float(model.level_weights.sum()) * math.log(negatives + 1)


Views = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, views: Views, *,
               amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
               diagnostics: bool = True, jittered: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
               ) -> dict[str, torch.Tensor]:
    """One optimizer step: forward (autocast to ``amp_dtype`` if given), zero_grad, backward, SGD step.

    The order is mmcv's ``OptimizerHook`` (zero_grad, backward, step; no gradient clipping).
    ``diagnostics``: the outputs also hold the collapse diagnostics (see :meth:`InsLoc.forward`).
    ``jittered``: the jittered boxes drawn beforehand (:func:`jitter_on_host`); ``None``: the model draws them.
    Without diagnostics and with ``jittered`` the step reads nothing back from the device (held by
    tests/training/test_sync_free.py).
    """
    q_img, q_box, k_img, k_box = views
    device_type = q_img.device.type
    with torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
        out = model(q_img, q_box, k_img, k_box, generator=generator, diagnostics=diagnostics, jittered=jittered)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return out


def build_optimizer_and_schedule(cfg: PretrainConfig, model: nn.Module
                                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and per-epoch schedule of a config, over the trainable parameters of ``model``.

    Official: SGD (momentum 0.9, Nesterov, wd 1e-4 on all parameters) at ``cfg.scaled_lr``, cosine per
    epoch. ``optimizer="adamw"`` (the small-data preset) uses AdamW (betas 0.9/0.999) at the same
    linearly scaled lr, with ``cfg.weight_decay`` on all parameters; ``warmup_epochs`` adds a linear ramp.

    Example:
        >>> optimizer, schedule = build_optimizer_and_schedule(cfg, model)
        >>> lr = set_schedule_epoch(schedule, epoch)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.scaled_lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.scaled_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
    return optimizer, cosine_by_epoch(optimizer, cfg.epochs, cfg.warmup_epochs)


def device_batches(loader: Iterable[Any], prepare: Callable[[Any], tuple[Any, ...]], device: torch.device,
                   prefetch: bool) -> Iterator[tuple[tuple[Any, ...], float]]:
    """``(prepare(batch), seconds waited for the batch)`` for each batch of ``loader``.

    ``prefetch``: through :class:`~insloc_hub.training.pretraining.pretrain_data.DevicePrefetcher`, so on CUDA the
    next batch is decoded and composed on a side stream while the current step runs (the same
    batches either way).
    """
    source = iter(DevicePrefetcher(loader, prepare, device) if prefetch else loader)
    while True:
        start = time.perf_counter()
        item = next(source, None)
        if item is None:
            return
        waited = time.perf_counter() - start
        yield (item if prefetch else prepare(item)), waited


Callback = Callable[[str, dict[str, Any]], None]


def train(cfg: PretrainConfig, *, callbacks: Sequence[Callback] = ()) -> Path:
    """Run (or resume) pretraining; returns ``RUN_DIR/final`` (the exported hub folder).

    ``callbacks`` are called on every process as ``fn(event, info)``: ``"step"`` after each optimizer
    step (``info``: ``model`` (the unwrapped :class:`InsLoc`), ``step``, ``epoch``, ``outputs``, which hold
    the diagnostics at log steps only) and
    ``"end"`` once training stops, before the export (``model``, ``step``, ``epoch``).

    Raises:
        DatasetError: missing data, or fewer images than one global batch.
        ConfigError: impossible settings, CUDA out of memory (with advice).
        CheckpointError: ``--resume`` of a checkpoint from another configuration or data set.
    """
    cfg.validate()
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop "
                              "--tensorboard; metrics.jsonl and curves.png hold the same numbers)") from err
    if not cfg.data:
        raise DatasetError("--data is required: a folder of images or a text file listing them")
    if not cfg.output:
        raise ConfigError("--output is required: the run folder")
    info = dist_utils.init_distributed(cfg.device)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run = _PretrainRun(cfg, info)  # checks, runtime settings, seeding
        run.build_data()
        run.build_model()
        run.resume()  # before anything of the run is written
        run.write_config()
        try:
            with run_lib.StopRequest(enabled=info.world_size == 1) as stop:  # Ctrl-C / SIGTERM: save, then stop
                run.loop(callbacks, stop)
        except torch.cuda.OutOfMemoryError as err:
            world = info.world_size
            raise ConfigError(
                f"CUDA ran out of memory with {cfg.batch_size // world} images per GPU (--batch-size "
                f"{cfg.batch_size} over {world} process(es)). Use a smaller batch (e.g. --batch-size "
                f"{max(world, cfg.batch_size // 2)}; the lr is rescaled automatically and --queue-size must stay a "
                "multiple of it), more GPUs, or --amp on / --channels-last on.") from err
        finally:
            run.close()
        for callback in callbacks:
            callback("end", {"model": run.model, "step": run.global_step, "epoch": run.epoch})
        return run.export()
    finally:
        # leave the process as we found it (matters when train() is called from Python, e.g. tests)
        torch.set_num_threads(previous_threads)
        if torch.are_deterministic_algorithms_enabled() != previous_deterministic:
            torch.use_deterministic_algorithms(previous_deterministic)
        dist_utils.cleanup()


def compile_encoders(model: nn.Module) -> None:
    """``torch.compile`` the trunk, FPN, box head and projection of both encoders, in place.

    Module by module rather than the whole model: the momentum update, queues and loss stay eager.
    """
    for encoder in (model.encoder_q, model.encoder_k):
        for module in (encoder.backbone.trunk, encoder.backbone.fpn, encoder.backbone.box_head, encoder.projection):
            if module is not None:
                module.compile()


class _PretrainRun:
    """The state of one pretraining run, built by :func:`train` step by step."""

    def __init__(self, cfg: PretrainConfig, info: dist_utils.DistInfo) -> None:
        self.cfg, self.info, self.device, self.is_main = cfg, info, info.device, info.is_main
        self.run_dir = Path(cfg.output)
        if not self.is_main:
            logging.getLogger("insloc_hub").setLevel(logging.WARNING)
        if cfg.batch_size % info.world_size != 0:
            raise ConfigError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {info.world_size} "
                              "processes")
        self.batch_per_rank = cfg.batch_size // info.world_size
        self.rt = resolve_runtime(cfg, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.metrics: MetricsWriter | None = None
        self.bar: tqdm | None = None

    def build_data(self) -> None:
        cfg, info = self.cfg, self.info
        self.images = UnlabelledImages(cfg.data, root=cfg.data_root)
        if len(self.images) < cfg.batch_size:
            raise DatasetError(
                f"found {len(self.images)} images in {cfg.data!r} but one global batch needs --batch-size "
                f"{cfg.batch_size}; add images or use a smaller --batch-size (with a --queue-size that is a "
                "multiple of it)")
        self.dataset = build_dataset(cfg, self.images, self.rt.gpu_composition)
        self.comp = composition_config(cfg)
        self.sampler = ResumableDistributedSampler(len(self.images), self.batch_per_rank, info.world_size,
                                                   info.rank, cfg.seed)
        self.loader = DataLoader(
            self.dataset, batch_size=self.batch_per_rank, sampler=self.sampler, num_workers=cfg.workers,
            collate_fn=collate_decoded if self.rt.gpu_composition else None,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
            worker_init_fn=run_lib.ignore_stop_signals, generator=torch.Generator().manual_seed(cfg.seed))
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def build_model(self) -> None:
        cfg, world = self.cfg, self.info.world_size
        model = build_model(cfg).to(self.device)
        if cfg.sync_bn and world > 1:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation); drop it")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer, self.schedule = build_optimizer_and_schedule(cfg, model)
        logger.info("%s lr %g per 256 images x %d/256 = %g (global batch %d = %d process(es) x %d)", cfg.optimizer,
                    cfg.lr, cfg.batch_size, cfg.scaled_lr, cfg.batch_size, world, self.batch_per_rank)

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        _check_format(path, state)
        saved_config = {**DEFAULTS, **state["config"]}  # a field newer than the checkpoint: its default
        check_config(saved_config, self.cfg.to_dict(), ignore=RESUME_IGNORED_FIELDS, source=path)
        if state["num_images"] != len(self.images):
            raise CheckpointError(f"{path} was trained on {state['num_images']} images but --data has "
                                  f"{len(self.images)}; resume with the same data")

    def resume(self) -> None:
        found = run_lib.resume(self.run_dir, self.cfg.resume, self._check_resumable)
        if found is not None:
            path, state = found
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            self.epoch, self.step_in_epoch, self.global_step = (state["epoch"], state["step_in_epoch"],
                                                                state["global_step"])
            logger.info("resumed from %s: epoch %d, step %d of %d in the epoch, global step %d", path, self.epoch,
                        self.step_in_epoch, self.steps_per_epoch, self.global_step)
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.cfg.compile:
            compile_encoders(self.model)
        self.train_model = run_lib.wrap_ddp(self.model, self.device, self.info.world_size, broadcast_buffers=False)

    def write_config(self) -> None:
        cfg, rt = self.cfg, self.rt
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_lib.write_json(self.run_dir / "config.json", {**cfg.to_dict(), "resolved": {
                "device": str(self.device), "world_size": self.info.world_size,
                "batch_per_process": self.batch_per_rank, "scaled_lr": cfg.scaled_lr,
                "amp": str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "off",
                "channels_last": rt.channels_last, "gpu_composition": rt.gpu_composition,
                "num_images": len(self.images), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "insloc_hub": __version__, "torch": torch.__version__,
                "launcher": self.info.launcher, "backbone": query_backbone_config(cfg).to_dict()}})
        self.metrics = MetricsWriter(self.run_dir, self.is_main, self.global_step, tensorboard=cfg.tensorboard)
        self.monitor = CollapseMonitor(cfg.dim, cfg.batch_size)
        self.monitor.replay(self.metrics.records)  # a resumed run keeps the step it collapsed at
        self.loss_at_chance = chance_loss(self.model, cfg.batch_size)
        self.bar = tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not (self.is_main and sys.stderr.isatty()))  # disabled: no-ops

    def loop(self, callbacks: Sequence[Callback], stop: run_lib.StopRequest) -> None:
        cfg = self.cfg
        jitter = self.model.box_jitter is not None  # drawn on the host: see jitter_on_host

        def prepare(batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:  # the views, then the host boxes
            views = batch_to_views(batch, self.comp, self.device, self.rt.channels_last)
            return views + host_boxes(batch, self.comp) if jitter else views

        prefetch = self.rt.gpu_composition and self.device.type == "cuda"
        self.train_model.train()
        wrote_grid = (self.run_dir / "composition.png").exists()
        timer = StepTimer()
        while self.global_step < self.total_steps and self.epoch < cfg.epochs:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start_step(self.step_in_epoch)
            self.dataset.set_epoch(self.epoch)
            lr = set_schedule_epoch(self.schedule, self.epoch)
            for (q_img, q_box, k_img, k_box, *boxes), waited in device_batches(self.loader, prepare, self.device,
                                                                               prefetch):
                generator = torch.Generator().manual_seed(_mix(cfg.seed, self.global_step, 0x3C0DE))
                jittered = jitter_on_host(self.model, boxes, generator, self.device) if jitter else None
                if self.is_main and not wrote_grid:
                    _write_grid(self.run_dir, q_img, q_box, k_img, k_box, None if jittered is None else jittered[0],
                                self.comp)
                    wrote_grid = True
                if cfg.method == "moco":
                    q_box = k_box = None
                self.global_step += 1
                self.step_in_epoch += 1
                finished = self.global_step >= self.total_steps
                logged = self.global_step % cfg.log_every == 0 or finished  # the diagnostics are measured only then
                out = train_step(self.train_model, self.optimizer, (q_img, q_box, k_img, k_box),
                                 amp_dtype=self.rt.amp_dtype, generator=generator, diagnostics=logged,
                                 jittered=jittered)
                timer.tick(waited)
                for callback in callbacks:
                    callback("step", {"model": self.model, "step": self.global_step, "epoch": self.epoch,
                                      "outputs": out})
                if logged:
                    self._log(out, lr, timer)
                self.bar.update(1)
                saved = None
                if self.step_in_epoch == self.steps_per_epoch:
                    saved = self._save(self.epoch + 1, 0)
                elif (finished or stop.requested
                      or (cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0)):
                    saved = self._save(self.epoch, self.step_in_epoch)
                if finished:
                    break
                if stop.requested:
                    raise stop.stopped(f"step {self.global_step}/{self.total_steps}", saved)
            report = self.images.pop_epoch_report()
            if report and self.is_main:
                self.metrics.write({"step": self.global_step, "epoch": self.epoch, "unreadable_draws": report.events,
                                    "unreadable_files": len(report.files)})
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _log(self, out: dict[str, torch.Tensor], lr: float, timer: StepTimer) -> None:
        values = dict(zip(out, torch.stack([v.detach().float() for v in out.values()]).tolist()))  # one sync
        step_time, data_time = timer.read()
        record = {"step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "lr": lr,
                  **values, "img_per_s": self.cfg.batch_size / max(step_time, 1e-9), "data_time": data_time,
                  "step_time": step_time, "time": time.time()}
        self.metrics.write(record)
        if self.is_main:
            self.monitor.update(self.global_step, record)
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", top1=f"{values['inbatch_top1']:.0f}%",
                                 cos_k=f"{values['cos_k']:.2f}", lr=f"{lr:.4g}", img_s=f"{record['img_per_s']:.0f}",
                                 data=f"{data_time:.3f}s", step=f"{step_time:.3f}s")
        elif self.is_main and (self.global_step // self.cfg.log_every) % 10 == 1:
            logger.info("step %d/%d epoch %d loss %.4f (chance %.2f) in-batch top-1 %.0f%% cos_q %.2f cos_k %.2f "
                        "std %.3f lr %.4g %.1f img/s", self.global_step, self.total_steps, self.epoch,
                        values["loss"], self.loss_at_chance, values["inbatch_top1"], values["cos_q"],
                        values["cos_k"], values["emb_std"], lr, record["img_per_s"])

    def _save(self, epoch: int, step_in_epoch: int) -> Path | None:
        """Write the checkpoint of this position (rank 0; other ranks return ``None``)."""
        if not self.is_main:
            return None
        path = run_lib.save(self.run_dir, self.global_step, {
            "format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
            **self._position(epoch, step_in_epoch), "world_size": self.info.world_size,
        }, self.cfg.keep_checkpoints)
        self._draw_curves()
        return path

    def _position(self, epoch: int, step_in_epoch: int) -> dict[str, int]:
        """Where the run stands: the checkpoint fields that the card's provenance reads too."""
        return {"epoch": epoch, "step_in_epoch": step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
                "global_step": self.global_step, "num_images": len(self.images)}

    def _draw_curves(self) -> None:  # rank 0 only
        plot_curves(self.metrics.records, self.run_dir / "curves.png", chance_loss=self.loss_at_chance,
                    batch_size=self.cfg.batch_size)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def export(self) -> Path:
        """Write the query backbone as the hub folder ``RUN_DIR/final`` (rank 0); every rank returns its path."""
        cfg, final = self.cfg, self.run_dir / "final"
        if self.is_main:
            prov = _provenance(cfg, self._position(self.epoch, self.step_in_epoch))
            self._draw_curves()
            _export(self.model.state_dict(), final, cfg, prov, self.run_dir, self.metrics.records,
                    self.monitor.collapsed_at)
            logger.info("exported the query backbone to %s", final)
        dist_utils.barrier()
        return final


@torch.no_grad()
def _write_grid(run_dir: Path, q_img: torch.Tensor, q_box: torch.Tensor, k_img: torch.Tensor, k_box: torch.Tensor,
                jittered: torch.Tensor | None, comp: CompositionConfig) -> None:
    """composition.png: query row (GT box green, the step's jittered P5 box red) over the key row."""
    try:
        make_composition_grid(q_img.float(), q_box, k_img.float(), k_box, jittered, run_dir / "composition.png",
                              mean=comp.mean, std=comp.std)
    except Exception as err:  # noqa: BLE001 - a picture must never stop training
        logger.warning("could not write composition.png: %s", err)
