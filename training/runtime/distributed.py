"""Distributed helpers: one process per GPU, started by ``torchrun`` (``srun torchrun`` on SLURM).

Everything here also works in a plain single process (no process group): ranks are 0, the world
size is 1, gathers return their input, broadcasts return the object and barriers do nothing, so
the training code runs unchanged on a laptop CPU, one GPU, or many nodes. The backend is NCCL on
CUDA devices, gloo otherwise (the CPU tests use gloo).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from insloc_hub.errors import ConfigError

__all__ = ["DistInfo", "all_gather_tensor", "barrier", "broadcast_object", "broadcast_tensor", "cleanup",
           "detect_launch_env", "get_rank", "get_world_size", "init_distributed", "is_distributed", "select_device"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """The rank layout: read from the environment by :func:`detect_launch_env` (before any process group
    exists), with the device and backend that :func:`init_distributed` set up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    """``"torchrun"`` or ``"none"``."""
    device: torch.device | None = None
    backend: str | None = None
    """``"nccl"``, ``"gloo"``, or ``None`` when no process group was created (one process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from err


def detect_launch_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read the rank layout from torchrun's variables (``env`` defaults to ``os.environ``)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"),
                        _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun")
    return DistInfo()


def select_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ConfigError for CUDA without CUDA."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if dev.index is None:
            count = torch.cuda.device_count()
            dev = torch.device("cuda", local_rank % max(count, 1))
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | torch.device = "auto", *, env: Mapping[str, str] | None = None) -> DistInfo:
    """Create the process group when the launcher asked for several processes (NCCL on CUDA, else gloo).

    ``device`` as :func:`select_device`; ``env`` defaults to ``os.environ``. With a world size of 1
    no process group is created; called again when a group exists, it returns the current layout.
    """
    launch = detect_launch_env(env)
    dev = select_device(device, launch.local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), launch.local_rank, launch.launcher, dev,
                        dist.get_backend())
    if launch.world_size <= 1:
        return DistInfo(launcher=launch.launcher, device=dev)
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(f"{launch.launcher}: MASTER_ADDR/MASTER_PORT are not set; start with torchrun "
                          "(srun torchrun on SLURM)")
    chosen = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(chosen, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(minutes=30))
    logger.info("process group: %s, rank %d of %d (local rank %d), device %s, launcher %s", chosen, launch.rank,
                launch.world_size, launch.local_rank, dev, launch.launcher)
    return replace(launch, device=dev, backend=chosen)


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call always)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); no gradient flows.

    Every rank must pass the same shape. Without a process group the input is returned as is.
    This is MoCo's ``concat_all_gather``.
    """
    world = get_world_size()
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    # list-based all_gather: the same call on every torch version (the single-tensor variant was
    # renamed between releases) and on every backend
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``tensor`` in place from ``src`` and return it (no-op in a single process)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank; returns it everywhere."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)
