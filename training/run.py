"""What every training command shares: which checkpoint to resume, seeding, and the metrics log.

``pretrain`` (engine.py) and ``finetune`` use these, so a run folder behaves the same for both:
``--resume auto`` takes the newest checkpoint, a folder that already holds checkpoints is never
silently reused, and ``metrics.jsonl`` never keeps lines of steps a killed run did not checkpoint.
Checkpoints themselves are written atomically by :mod:`insloc_hub.training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insloc_hub.errors import CheckpointError

from .checkpoint import list_checkpoints, resume_candidates

__all__ = ["MetricsWriter", "choose_resume", "seed_everything"]

logger = logging.getLogger(__name__)


def choose_resume(run_dir: Path, resume: str | None) -> list[Path]:
    """The checkpoints a run may continue from, newest first (load with ``load_newest_usable``).

    ``"auto"``: the checkpoints of ``run_dir`` (none: start from scratch); a run folder: its
    checkpoints; a file: that file; nothing: ``[]``, but only if ``run_dir`` holds no checkpoint yet.

    Raises:
        CheckpointError: ``run_dir`` already holds checkpoints and no ``--resume`` was given, or a
            ``--resume`` folder holds none.
    """
    if resume not in (None, "", "none"):
        candidates = resume_candidates(resume, run_dir)
        if not candidates:
            logger.info("--resume auto: no checkpoint in %s, starting from scratch", run_dir)
        return candidates
    existing = list_checkpoints(run_dir)
    if existing:
        raise CheckpointError(f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); pass --resume auto "
                              "to continue that run, or choose another --output")
    return []


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (the three the official recipe relies on).

    DataLoader workers need nothing more: the DataLoader seeds all three in each worker itself.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, AttributeError):
                    record = json.loads(line)
                    if record.get(step_key, 0) <= resume_step:
                        self.records.append(record)
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
