"""Unlabelled images and the InsLoc pretraining datasets: inputs, bad files, reproducibility."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from insloc_hub.errors import DatasetError
from insloc_hub.training.compose import CompositionConfig, compose_batch
from insloc_hub.training.pretrain_data import (
    InsLocDecodeDataset,
    InsLocPretrainDataset,
    UnlabelledImages,
    collate_decoded,
    sample_rng,
    worker_init_fn,
)
from tests.photos import photo

TINY = CompositionConfig.for_canvas(64)


def _write_tree(root: Path, *, corrupt: bool = False) -> list[Path]:
    """An ImageNet-like tree: class folders, several formats, plus files that must be ignored."""
    files = [
        (root / "n01" / "astronaut.jpg", photo("astronaut").resize((160, 160)), "JPEG"),
        (root / "n01" / "coffee.PNG", photo("coffee").resize((150, 100)), "PNG"),
        (root / "n02" / "chelsea.webp", photo("chelsea").resize((120, 80)), "WEBP"),
        (root / "n02" / "deep" / "rocket.bmp", photo("rocket").resize((96, 64)), "BMP"),
    ]
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    files.append((root / "n03" / "noise.jpeg", noise, "JPEG"))
    written = []
    for path, img, fmt in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format=fmt)
        written.append(path)
    (root / "n01" / "notes.txt").write_text("not an image")
    (root / "n01" / ".hidden.jpg").write_bytes(b"")
    if corrupt:
        (root / "n03" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return written


# -- UnlabelledImages ------------------------------------------------------------------------------
def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    written = _write_tree(tmp_path / "train")
    images = UnlabelledImages(tmp_path / "train")
    assert len(images) == 5
    assert sorted(images.paths) == sorted(str(p) for p in written)
    assert images.load(0).mode == "RGB"
    only_png = UnlabelledImages(tmp_path / "train", extensions=("png",))
    assert [Path(p).name for p in only_png.paths] == ["coffee.PNG"]


def test_list_file_relative_to_its_folder_or_root(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train")
    lines = "n01/astronaut.jpg 0\nn02/chelsea.webp 1\n\n# comment\nn02/deep/rocket.bmp\n"
    (tmp_path / "train" / "train.txt").write_text(lines)
    images = UnlabelledImages(tmp_path / "train" / "train.txt")
    assert [Path(p).name for p in images.paths] == ["astronaut.jpg", "chelsea.webp", "rocket.bmp"]
    assert images.load(2).size == (96, 64)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text(lines)
    with_root = UnlabelledImages(tmp_path / "lists" / "train.txt", root=tmp_path / "train")
    assert with_root.paths == images.paths
    with pytest.raises(DatasetError, match="root="):
        UnlabelledImages(tmp_path / "lists" / "train.txt")
    listed = UnlabelledImages([str(tmp_path / "train" / "n01" / "astronaut.jpg")])
    assert len(listed) == 1


def test_missing_or_empty_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        UnlabelledImages(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        UnlabelledImages(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(DatasetError, match="no images"):
        UnlabelledImages(tmp_path / "empty.txt")
    with pytest.raises(DatasetError):
        UnlabelledImages([])


def test_corrupt_file_is_skipped_counted_and_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_tree(tmp_path / "train", corrupt=True)
    images = UnlabelledImages(tmp_path / "train")
    bad = next(i for i, p in enumerate(images.paths) if p.endswith("broken.jpg"))
    ds = InsLocPretrainDataset(images, TINY, seed=0)
    sample = ds[bad]  # the foreground is unreadable: replaced by a random image, not fatal
    assert sample["index"] == bad and sample["q_img"].shape == (3, 64, 64)
    for i in range(len(ds)):
        ds[i]
    assert images.unreadable_count >= 1 and images.is_known_unreadable(bad)
    with caplog.at_level(logging.WARNING, logger="insloc_hub.training.pretrain_data"):
        report = images.pop_epoch_report()
    assert report.events >= 1 and report.files == (images.paths[bad],)
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1
    assert not images.pop_epoch_report()  # reset
    # an image over max_pixels counts as unreadable too
    strict = UnlabelledImages(tmp_path / "train", max_pixels=100 * 100)
    InsLocPretrainDataset(strict, TINY, seed=0)[0]
    assert strict.unreadable_count >= 1


def test_all_unreadable_gives_up_with_dataset_error(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"garbage")
    ds = InsLocPretrainDataset(UnlabelledImages(tmp_path), TINY, seed=0)
    with pytest.raises(DatasetError, match="unreadable"):
        ds[0]


# -- InsLocPretrainDataset ----------------------------------------------------------------------
def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_sample_is_a_function_of_seed_epoch_index(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train")
    a = InsLocPretrainDataset(UnlabelledImages(tmp_path / "train"), TINY, seed=3)
    b = InsLocPretrainDataset(UnlabelledImages(tmp_path / "train"), TINY, seed=3)
    s = a[2]
    assert set(s) == {"q_img", "q_box", "k_img", "k_box", "index"}
    assert s["q_box"].shape == (4,) and s["q_box"].dtype == torch.float32
    b[4], b[1]  # other samples in between change nothing
    assert _equal(s, b[2])
    b.set_epoch(1)
    assert not _equal(s, b[2])
    assert _equal(b[2], a[(1, 2)])  # a sampler may pass (epoch, idx) keys
    c = InsLocPretrainDataset(UnlabelledImages(tmp_path / "train"), TINY, seed=4)
    assert not _equal(s, c[2])
    with pytest.raises(IndexError):
        a[5]


def test_same_samples_whatever_the_number_of_workers(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", corrupt=True)
    images = UnlabelledImages(tmp_path / "train")
    ds = InsLocPretrainDataset(images, TINY, seed=1)
    ds.set_epoch(2)
    serial = list(DataLoader(ds, batch_size=3, num_workers=0))
    images.pop_epoch_report(log=False)
    parallel = list(DataLoader(ds, batch_size=3, num_workers=2, worker_init_fn=worker_init_fn))
    assert len(serial) == len(parallel) == 2
    for x, y in zip(serial, parallel, strict=True):
        assert _equal(x, y)
    assert images.pop_epoch_report(log=False).events >= 1  # counted inside the workers too
    # set_epoch reaches persistent workers (the epoch lives in shared memory)
    loader = DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    ds.set_epoch(0)
    first = list(loader)
    ds.set_epoch(2)
    again = list(loader)
    assert not _equal(first[0], serial[0])
    assert all(_equal(x, y) for x, y in zip(serial, again, strict=True))


def test_backgrounds_are_drawn_uniformly_with_replacement() -> None:
    # imagenet.py: two np.random.randint(0, len) draws per sample, independent of the foreground
    draws = np.array([[sample_rng(0, 0, i).integers(0, 10) for _ in range(2)] for i in range(2000)])
    counts = np.bincount(draws.ravel(), minlength=10)
    assert counts.min() > 300 and counts.max() < 500


# -- InsLocDecodeDataset (batched device path) ---------------------------------------------------
def test_decode_dataset_feeds_the_batched_composer(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train")
    images = UnlabelledImages(tmp_path / "train")
    ref = InsLocPretrainDataset(images, TINY, seed=5)
    dec = InsLocDecodeDataset(images, TINY, seed=5, max_side=512)
    batch = collate_decoded([dec[i] for i in range(len(dec))])
    assert batch["bg_q"].shape == (5, 3, 64, 64) and batch["bg_q"].dtype == torch.uint8
    assert [tuple(f.shape[1:]) for f in batch["fg"]][0] == (160, 160)
    q, qb, k, kb = compose_batch(batch["fg"], batch["bg_q"], batch["bg_k"], TINY, params=batch["params"])
    assert q.shape == (5, 3, 64, 64)
    for i in range(len(ref)):
        s = ref[i]  # same draws -> same boxes as the CPU reference path
        assert torch.equal(qb[i], s["q_box"]) and torch.equal(kb[i], s["k_box"])
    small = InsLocDecodeDataset(images, TINY, seed=5, max_side=100)
    fg = small[0]["fg"]
    assert max(fg.shape[1:]) == 100
    p = small[0]["params"]
    assert p.foreground_size == (fg.shape[2], fg.shape[1])
