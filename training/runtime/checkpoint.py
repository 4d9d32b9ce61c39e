"""Training checkpoints: atomic writes, finding the newest, safe loading, RNG state, config checks.

A checkpoint is one ``torch.save`` file holding a plain dict, named by step
(``RUN_DIR/checkpoint_000001234.pt``). Shared by pretraining and fine-tuning:

* atomic: written to ``.NAME.tmp-PID``, fsynced, then ``os.replace``-d, so a process killed at any
  moment leaves the previous file or the new one, never a truncated ``NAME``;
* never unpickled: ``torch.load(weights_only=True)``, so RNG states are stored as lists and tensors;
* resumed only with the same configuration (:func:`check_config` names every differing field);
* bounded on disk (:func:`prune_checkpoints` keeps the newest ``keep``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insloc_hub.convert import describe_unpickling_refusal
from insloc_hub.errors import CheckpointError

__all__ = ["CHECKPOINT_PATTERN", "capture_rng_state", "check_config", "checkpoint_path", "checkpoint_step",
           "list_checkpoints", "load_checkpoint", "load_newest_usable", "prune_checkpoints",
           "restore_rng_state", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")
_TMP_MARK = ".tmp-"


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``RUN_DIR/checkpoint_{step:09d}.pt``."""
    return Path(run_dir) / f"checkpoint_{int(step):09d}.pt"


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step encoded in a checkpoint file name, or ``None`` for other files (tmp files included)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files of a run folder, oldest step first (no readability check)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and checkpoint_step(p) is not None), key=checkpoint_step)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. Windows: directories cannot be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """``torch.save`` a checkpoint dict to ``path`` atomically (tmp file in the same folder, fsync,
    ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all) and stale tmp files of dead writers."""
    folder = Path(run_dir)
    stale = [p for p in folder.glob(f".checkpoint_*{_TMP_MARK}*") if not p.name.endswith(f"{_TMP_MARK}{os.getpid()}")]
    for p in stale + (list_checkpoints(folder)[:-keep] if keep > 0 else []):
        p.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``torch.load(weights_only=True)`` (a file holding other objects, e.g.
    a foreign checkpoint, is refused: unpickling runs code).

    Raises:
        CheckpointError: missing, unreadable, corrupt or foreign file (the message says what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch.save archive: the file is truncated or corrupt, or not a "
                              "checkpoint. If it is a partially written checkpoint, delete it to resume from the "
                              "previous one.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} was not written by this version of insloc-hub: "
                              f"{describe_unpickling_refusal(err)}. Resume from another checkpoint of the run, or "
                              "start a new run.") from err
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}. The file is truncated or corrupt; delete it "
                              "to resume from the previous checkpoint.") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_newest_usable(
    candidates: Iterable[Path], check: Callable[[Path, dict[str, Any]], None] | None = None
) -> tuple[Path, dict[str, Any], list[str]]:
    """``(path, state, skipped)`` of the first of ``candidates`` (newest first) that loads and passes ``check``.

    A foreign, corrupt or mismatching newer checkpoint is skipped with a warning (``skipped``: ``"name:
    why"`` of each). CheckpointError when none is usable, listing each file and why (a single candidate
    raises its own error).
    """
    candidates = list(candidates)
    skipped: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(path, state)
        except CheckpointError as err:
            if len(candidates) == 1:
                raise
            why = str(err).splitlines()[0]
            logger.warning("skipping checkpoint %s: %s", path, why)
            skipped.append(f"{Path(path).name}: {why}")
            continue
        if skipped:
            logger.warning("using %s: %d newer checkpoint(s) were unusable", path, len(skipped))
        return Path(path), state, skipped
    raise CheckpointError("no usable checkpoint to resume from:\n  " + "\n  ".join(skipped))


def capture_rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global RNG, torch CPU and every CUDA device, as safe types.

    The result contains only lists, ints, floats, strings and tensors, so it survives
    ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    numpy_state = {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
                   "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"python": [int(version), list(internal), gauss], "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if cuda else []}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when the device count matches
    (otherwise a warning: the data and model randomness of this project does not depend on them)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npst = state["numpy"]
    keys = npst["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((npst["name"], keys.astype(np.uint32), int(npst["pos"]), int(npst["has_gauss"]),
                         float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else
                        torch.tensor(state["torch"], dtype=torch.uint8))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; not restored",
                           len(cuda_states), torch.cuda.device_count())


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Iterable[str] = (),
                 source: str | os.PathLike[str] = "the checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every field where ``saved`` and ``current`` differ.

    ``ignore``: fields that may change between runs (output folder, loader workers, logging...).
    Values are compared as JSON reads them back (tuples as lists); a missing field shows as ``<absent>``.
    """

    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    skip = set(ignore)
    diffs = {key: (saved.get(key, "<absent>"), current.get(key, "<absent>"))
             for key in sorted(set(saved) | set(current)) if key not in skip}
    diffs = {key: (a, b) for key, (a, b) in diffs.items() if norm(a) != norm(b)}
    if diffs:
        lines = [f"  {k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items()]
        raise CheckpointError(
            f"{source} was written by a run with another configuration; differing fields:\n" + "\n".join(lines)
            + "\nUse the same settings to resume, or start a new run in another --output folder."
        )
