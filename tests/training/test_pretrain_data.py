"""Unlabelled images and the InsLoc pretraining datasets: inputs, bad files, reproducibility."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg

from insloc_hub.errors import ConfigError, DatasetError, InvalidImageError
from insloc_hub.training.pretraining import pretrain_data
from insloc_hub.training.pretraining.compose import CompositionConfig
from insloc_hub.training.pretraining.pretrain_data import (
    DevicePrefetcher,
    EncodedImage,
    InsLocBytesDataset,
    InsLocPretrainDataset,
    UnlabelledImages,
    apply_exif_orientation,
    collate_encoded,
    compose_encoded_batch,
    decode_batch,
    in_batch_background_indices,
    sample_rng,
)
from insloc_hub.transforms import decode_image
from tests.photos import photo, photo_bytes

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
    with caplog.at_level(logging.WARNING, logger="insloc_hub.training.pretraining.pretrain_data"):
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
    parallel = list(DataLoader(ds, batch_size=3, num_workers=2))
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


# -- fast CPU pipeline (default) -------------------------------------------------------------------
def test_fast_pipeline_has_the_reference_draws(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", corrupt=True)
    images = UnlabelledImages(tmp_path / "train")
    ref = InsLocPretrainDataset(images, TINY, seed=2, pipeline="reference")
    fast = InsLocPretrainDataset(images, TINY, seed=2)
    for i in range(len(images)):
        r, f = ref[i], fast[i]
        assert torch.equal(r["q_box"], f["q_box"]) and torch.equal(r["k_box"], f["k_box"])  # same draws
        assert f["q_img"].dtype == torch.float32 and f["q_img"].shape == (3, 64, 64)
        # same geometry and colour parameters; the tensor ops differ from PIL's by about a grey level
        # (tests/training/test_compose.py holds each one to its PIL counterpart)
        for view in ("q_img", "k_img"):
            assert (f[view] - r[view]).abs().mean() * 0.226 * 255 < 3.0
    with pytest.raises(ConfigError):
        InsLocPretrainDataset(images, TINY, pipeline="turbo")


def _jpeg_with_orientation(path: Path, orientation: int, size: tuple[int, int] = (50, 30)) -> Image.Image:
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return img


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision >= 0.29 deprecates its codecs
@pytest.mark.parametrize("orientation", range(1, 9))
def test_encoded_image_applies_exif_orientation_like_decode_image(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "o.jpg"
    _jpeg_with_orientation(path, orientation)
    expected = np.asarray(decode_image(path))
    enc = EncodedImage.open(path)
    assert enc.size == (expected.shape[1], expected.shape[0]) and enc.orientation == orientation
    assert np.array_equal(np.asarray(enc.decode()), expected)
    assert np.array_equal(EncodedImage.open(path).decode_uint8().permute(1, 2, 0).numpy(), expected)
    on_device = apply_exif_orientation(decode_jpeg(enc.as_tensor()), enc.orientation)  # the GPU path's way
    assert np.array_equal(on_device.permute(1, 2, 0).numpy(), expected)


def test_encoded_image_reduced_decode_and_errors(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    photo("astronaut").save(big, quality=90)  # 512 x 512
    enc = EncodedImage.open(big)
    assert enc.decode().size == (512, 512)
    assert enc.decode((200, 130)).size == (256, 256)  # the smallest DCT scale still >= the request
    assert enc.decode((64, 64)).size == (64, 64)
    assert enc.decode((600, 600)).size == (512, 512)
    for request, shape in (((200, 130), (3, 256, 256)), ((300, 300), (3, 512, 512)), (None, (3, 512, 512))):
        decoded = EncodedImage.open(big).decode_uint8(request)  # full scale: torchvision; reduced: PIL draft
        assert decoded.shape == shape and decoded.dtype == torch.uint8
        assert decoded.permute(1, 2, 0).is_contiguous()  # channels-last, as the CPU resize wants it
    png = tmp_path / "a.png"
    photo("coffee").resize((60, 40)).convert("RGBA").save(png)
    enc_png = EncodedImage.open(png)
    assert not enc_png.is_jpeg and enc_png.size == (60, 40) and enc_png.decode().mode == "RGB"
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(big.read_bytes()[:2000])  # a valid header, then nothing
    header_only = EncodedImage.open(truncated)
    with pytest.raises(InvalidImageError):
        header_only.decode()
    with pytest.raises(InvalidImageError):  # torchvision refuses it, then PIL words the error
        EncodedImage.open(truncated).decode_uint8()
    for bad in (tmp_path / "missing.jpg", tmp_path / "n01"):
        with pytest.raises(InvalidImageError):
            EncodedImage.open(bad)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        EncodedImage.open(tmp_path / "empty.jpg")
    with pytest.raises(InvalidImageError, match="pixels"):
        EncodedImage.open(big, max_pixels=1000)


def test_fast_pipeline_replaces_a_file_that_fails_after_its_header(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train")
    good = (tmp_path / "train" / "n01" / "astronaut.jpg").read_bytes()
    (tmp_path / "train" / "n03" / "cut.jpg").write_bytes(good[:1500])
    images = UnlabelledImages(tmp_path / "train")
    ds = InsLocPretrainDataset(images, TINY, seed=0)
    cut = next(i for i, p in enumerate(images.paths) if p.endswith("cut.jpg"))
    for epoch in range(3):
        sample = ds[(epoch, cut)]
        assert sample["q_img"].shape == (3, 64, 64) and torch.isfinite(sample["q_img"]).all()
    assert images.is_known_unreadable(cut)
    assert str(tmp_path / "train" / "n03" / "cut.jpg") in images.pop_epoch_report(log=False).files


# -- bytes in the workers, decode + composition on the device (run here on the CPU) ------------------
def test_bytes_dataset_feeds_the_device_decoder(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train")
    images = UnlabelledImages(tmp_path / "train")
    ref = InsLocPretrainDataset(images, TINY, seed=5, pipeline="reference")
    enc = InsLocBytesDataset(images, TINY, seed=5)
    samples = [enc[i] for i in range(len(enc))]
    kinds = {Path(images.paths[s["index"]]).suffix.lower(): s["fg"][0] for s in samples}
    assert kinds[".jpg"] == "jpeg" and kinds[".png"] == "pixels"  # other formats: decoded in the worker
    batch = collate_encoded(samples)
    q, qb, k, kb = compose_encoded_batch(batch, TINY, "cpu")
    assert q.shape == k.shape == (5, 3, 64, 64) and q.dtype == torch.float32
    for i in range(len(ref)):
        r = ref[i]  # same draws -> same boxes as the CPU reference
        assert torch.equal(qb[i], r["q_box"]) and torch.equal(kb[i], r["k_box"])
        assert (q[i] - r["q_img"]).abs().mean() * 0.226 * 255 < 12.0  # float colour ops, antialiased resize
    loader = DataLoader(enc, batch_size=5, num_workers=2, collate_fn=collate_encoded)
    (again,) = list(loader)
    assert torch.equal(compose_encoded_batch(again, TINY, "cpu")[1], qb)


def test_in_batch_backgrounds_decode_once_per_sample(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train")
    images = UnlabelledImages(tmp_path / "train")
    ds = InsLocBytesDataset(images, TINY, seed=1, batch_backgrounds=True)
    batch = collate_encoded([ds[i] for i in range(len(ds))])
    assert batch["bg_q"] is None and batch["bg_draw"].shape == (5, 2)
    q, qb, k, kb = compose_encoded_batch(batch, TINY, "cpu")
    assert q.shape == (5, 3, 64, 64) and torch.isfinite(q).all()
    draws = torch.tensor(np.random.default_rng(0).random((4000, 2)))
    jq, jk = in_batch_background_indices(draws)
    assert all(j != i % 4000 for i, j in enumerate(jq)) and all(j != i for i, j in enumerate(jk))
    counts = np.bincount([(j - i) % 4000 for i, j in enumerate(jq)], minlength=4000)
    assert counts[0] == 0 and counts.max() <= 6  # uniform over the 3999 others
    assert in_batch_background_indices(torch.tensor([[0.3, 0.9]])) == ([0], [0])


def test_decode_batch_falls_back_for_a_jpeg_the_decoder_refuses(tmp_path: Path, caplog) -> None:
    good = photo_bytes("chelsea")
    payloads = [("jpeg", torch.frombuffer(bytearray(good), dtype=torch.uint8), 1),
                ("jpeg", torch.frombuffer(bytearray(good[:300]), dtype=torch.uint8), 1),
                ("pixels", torch.zeros(3, 4, 5, dtype=torch.uint8), 1)]
    with caplog.at_level(logging.WARNING):
        out = decode_batch(payloads, "cpu")
    assert out[0].shape == (3, 300, 451) and out[2].shape == (3, 4, 5)
    assert out[1].dtype == torch.uint8 and "undecodable" in caplog.text


@pytest.mark.parametrize("orientation", [3, 6])
def test_decode_batch_pil_fallback_orients_a_rotated_jpeg_once(tmp_path: Path, orientation: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "o.jpg"
    _jpeg_with_orientation(path, orientation)
    enc = EncodedImage.open(path)

    def refuse(data, device):  # the device decoder refuses this JPEG: PIL decodes it on the CPU
        raise RuntimeError("unsupported JPEG")

    monkeypatch.setattr(pretrain_data, "_decode_jpeg", refuse)
    (out,) = decode_batch([("jpeg", enc.as_tensor(), enc.orientation)], "cpu")
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(decode_image(path)))


def test_device_prefetcher_yields_every_prepared_batch_in_order() -> None:
    prepared = list(DevicePrefetcher(range(4), lambda b: (torch.full((2,), float(b)),), "cpu"))
    assert [float(t[0][0]) for t in prepared] == [0.0, 1.0, 2.0, 3.0]
    assert list(DevicePrefetcher([], lambda b: (b,), "cpu")) == []
