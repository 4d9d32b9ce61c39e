"""Checkpoints: atomic writes, newest-readable lookup, safe loading, RNG round trip, config check."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from insloc_hub.errors import CheckpointError
from insloc_hub.training.runtime.checkpoint import (
    capture_rng_state,
    check_config,
    checkpoint_path,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    load_newest_usable,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((3,), float(step)), "config": {"arch": "tiny-fpn", "lr": [0.1]},
            "rng": capture_rng_state()}


def test_save_load_round_trip_is_weights_only_safe(tmp_path):
    path = save_checkpoint(checkpoint_path(tmp_path, 7), _state(7))
    assert path.name == "checkpoint_000000007.pt" and checkpoint_step(path) == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp file left
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["weights"], torch.full((3,), 7.0))


def test_the_newest_usable_checkpoint_skips_tmp_and_corrupt_files(tmp_path, caplog):
    for step in (2, 10, 4):
        save_checkpoint(checkpoint_path(tmp_path, step), _state(step))
    # a half-written newer checkpoint from a killed writer, and a truncated "complete" one
    (tmp_path / ".checkpoint_000000020.pt.tmp-999").write_bytes(b"partial")
    good = checkpoint_path(tmp_path, 10).read_bytes()
    checkpoint_path(tmp_path, 12).write_bytes(good[: len(good) // 2])
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 4, 10, 12]
    with caplog.at_level("WARNING"):
        path, state, skipped = load_newest_usable(reversed(list_checkpoints(tmp_path)))
    assert path == checkpoint_path(tmp_path, 10) and state["step"] == 10
    assert "checkpoint_000000012.pt" in caplog.text and skipped[0].startswith("checkpoint_000000012.pt")
    assert list_checkpoints(tmp_path / "missing") == []
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(checkpoint_path(tmp_path, 12))


def test_prune_keeps_newest_and_removes_stale_tmp(tmp_path):
    for step in range(1, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / ".checkpoint_000000009.pt.tmp-1").write_bytes(b"x")
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000000004.pt", "checkpoint_000000005.pt"]


class _Custom:
    pass


def test_untrusted_pickles_are_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "checkpoint_000000001.pt"
    torch.save({"obj": _Custom()}, path)  # a class weights_only does not allow
    with pytest.raises(CheckpointError, match="not written by this version of insloc-hub.*_Custom") as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value) and "allow_pickle" not in str(caught.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    path = save_checkpoint(tmp_path / "checkpoint_000000001.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_check_config_names_the_differing_fields():
    saved = {"arch": "r50-fpn", "queue_size": 65536, "lr": 0.03, "workers": 4, "canvas": (256, 256)}
    check_config(saved, {**saved, "workers": 8, "canvas": [256, 256]}, ignore={"workers"})
    with pytest.raises(CheckpointError) as err:
        check_config(saved, {**saved, "arch": "r50-c4", "lr": 0.06}, source="ckpt.pt")
    message = str(err.value)
    assert "arch" in message and "lr" in message and "queue_size" not in message and "ckpt.pt" in message


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint_000000001.pt", {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
