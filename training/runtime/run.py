"""What every training command shares: resume, seeding, checkpoints, metrics, timing, DDP.

``pretrain`` (engine.py) and ``finetune`` use these, so a run folder behaves the same for both:
``--resume auto`` takes the newest usable checkpoint, a folder that already holds checkpoints is
never silently reused, checkpoints are written atomically and pruned, and ``metrics.jsonl`` never
keeps lines of steps a killed run did not checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from insloc_hub.errors import CheckpointError
from insloc_hub.training.runtime import distributed as dist_utils
from insloc_hub.training.runtime.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_newest_usable,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)

__all__ = ["INTERRUPTED_HINT", "MetricsWriter", "StepTimer", "StopRequest", "Stopped", "choose_resume",
           "ignore_stop_signals", "read_metrics", "resume", "save", "seed_everything", "wrap_ddp", "write_json"]

logger = logging.getLogger(__name__)

# what Ctrl-C prints when a run stopped before it could save (a second Ctrl-C, a multi-process run)
INTERRUPTED_HINT = ("the steps since the newest checkpoint in --output are lost (if it holds none, nothing "
                    "was kept); continue from it with the same command and --resume auto")


def choose_resume(run_dir: Path, resume: str | os.PathLike[str] | None) -> list[Path]:
    """The checkpoints a run may continue from, newest first (load with ``load_newest_usable``).

    ``"auto"``: the checkpoints of ``run_dir`` (none: start from scratch); a run folder: its
    checkpoints; a file: that file; nothing: ``[]``, but only if ``run_dir`` holds no checkpoint yet.

    Raises:
        CheckpointError: ``run_dir`` already holds checkpoints and no ``--resume`` was given, or a
            ``--resume`` folder holds none.
    """
    if resume in (None, "", "none"):
        existing = list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); pass --resume "
                                  "auto to continue that run, or choose another --output")
        return []
    auto = str(resume) == "auto"
    folder = run_dir if auto else Path(resume)
    if not auto and not folder.is_dir():
        return [folder]  # a checkpoint file
    found = list(reversed(list_checkpoints(folder)))
    if not found and auto:
        logger.info("--resume auto: no checkpoint in %s, starting from scratch", run_dir)
    elif not found:
        names = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(f"--resume {folder}: the folder holds no checkpoint_<step>.pt file (it has: "
                              f"{', '.join(names) or 'nothing'}). Pass a run folder whose training saved a "
                              "checkpoint, or a file.")
    return found


def resume(run_dir: Path, spec: str | None, check: Callable[[Path, dict[str, Any]], None]
           ) -> tuple[Path, dict[str, Any]] | None:
    """Load the checkpoint to continue from (rank 0 chooses for all) and restore its RNG states.

    ``None``: start from scratch. Newer checkpoints that fail to load or fail ``check`` are passed
    over with a warning (:func:`~insloc_hub.training.runtime.checkpoint.load_newest_usable`).
    """
    candidates = dist_utils.broadcast_object(choose_resume(run_dir, spec))
    if not candidates:
        return None
    path, state, _ = load_newest_usable(candidates, check)
    if "rng" in state:
        restore_rng_state(state["rng"])
    return path, state


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoint_<step>.pt`` atomically with the RNG states added, keep the newest ``keep``."""
    path = save_checkpoint(checkpoint_path(run_dir, step), {**state, "rng": capture_rng_state()})
    prune_checkpoints(run_dir, keep)
    return path


class Stopped(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after saving where it stood; ``str()`` says where and how to go on."""


class StopRequest:
    """Ctrl-C or SIGTERM during a training loop: finish the step, save a checkpoint, then stop.

    Used as a context manager around the loop, which checks :attr:`requested` after each step and,
    if set, saves and raises :class:`Stopped`. A second signal stops at once (``KeyboardInterrupt``),
    so a slow save can still be cut short; the checkpoints already written stay (they are atomic).
    Only a single process on the main thread handles the signals: the ranks of a multi-process
    run would stop after different steps and hang in their next collective, so there a signal
    stops at once and the run resumes from its newest periodic checkpoint.

    Example:
        >>> with StopRequest(enabled=True) as stop:  # doctest: +SKIP
        ...     for step in steps:
        ...         train_one(step)
        ...         if stop.requested:
        ...             raise stop.stopped(f"step {step}", save(step))
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def stopped(self, where: str, saved: Path | None) -> Stopped:
        """The :class:`Stopped` to raise once the loop saved ``where`` it stood (``"step 3/6"``) to ``saved``."""
        return Stopped(f"{self.requested} at {where}, saved {saved}; continue with the same command and "
                       "--resume auto")

    def _handle(self, number: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: Ctrl-C reaches the whole process group,
            return  # and the worker must keep serving batches until the main process has saved
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        logger.warning("%s: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once, "
                       "losing the steps since the last checkpoint)", self.requested)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore Ctrl-C and SIGTERM, which the main process handles.

    Both reach every process of the group; torch makes a worker die of SIGTERM, and a dead worker
    raises in the main process wherever it is, even while :class:`StopRequest` saves the checkpoint.
    The main process still stops its workers when it exits (they also exit if it dies).
    """
    for name in StopRequest.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a killed run leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int, **options: Any) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train it, else ``model`` itself."""
    if world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               **options)


class StepTimer:
    """Seconds per step and per data wait since the last :meth:`read` (the logging window)."""

    def __init__(self) -> None:
        self.start, self.steps, self.data = time.perf_counter(), 0, 0.0

    def tick(self, data_seconds: float = 0.0) -> None:
        self.steps += 1
        self.data += data_seconds

    def read(self) -> tuple[float, float]:
        """``(seconds per step, data seconds per step)`` of the window, then start a new one."""
        elapsed, steps, data = time.perf_counter() - self.start, max(self.steps, 1), self.data
        self.__init__()
        return elapsed / steps, data / steps


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (the three the official recipe relies on).

    DataLoader workers need nothing more: the DataLoader seeds all three in each worker itself.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_metrics(path: Path, up_to_step: int, step_key: str = "step") -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` up to ``up_to_step`` (a line cut by a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            record = json.loads(line)
            if record.get(step_key, 0) <= up_to_step:
                records.append(record)
    return records


class MetricsWriter:
    """``metrics.jsonl`` (rank 0 only), the records in memory (for curves and the card), TensorBoard on request.

    Each record is one JSON line; ``step_key`` names its step. On resume, lines of steps after
    ``resume_step`` (written by a killed run after its last checkpoint) are dropped first.
    ``tensorboard=True`` also logs every number to ``run_dir/tensorboard`` (the package must be installed).
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0, step_key: str = "step",
                 tensorboard: bool = False) -> None:
        self.enabled, self.step_key = enabled, step_key
        self.path = Path(run_dir) / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.tb: Any = None
        if not enabled:
            return
        if self.path.exists():
            self.records = read_metrics(self.path, resume_step, step_key)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # the caller checked that it is installed

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and key not in (self.step_key, "time"):
                    self.tb.add_scalar(key, value, record[self.step_key])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
