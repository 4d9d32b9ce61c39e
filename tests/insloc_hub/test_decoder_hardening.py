"""The decoder policy under a few hundred generated bad inputs: each gets InvalidImageError with the
right ``reason``, never another exception, never a hang (per-case timeout), never wrong pixels."""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from insloc_hub.errors import InvalidImageError
from insloc_hub.transforms import decode_image, read_image_size
from tests.photos import photo

pytestmark = pytest.mark.timeout(20)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")
PHOTOS = ("coffee", "chelsea", "astronaut")


@functools.cache
def _encoded(name: str, fmt: str) -> bytes:
    buffer = io.BytesIO()
    photo(name).save(buffer, format=fmt)
    return buffer.getvalue()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _refused(data, *reasons: str, **limits) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, **limits)
    assert caught.value.reason in reasons, (caught.value.reason, str(caught.value))
    return caught.value


# --- cut-off files: every format, several cut points (90 cases) --------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.4, 0.6, 0.8])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", PHOTOS)
def test_cut_off_files_are_refused(name, fmt, fraction):
    data = _encoded(name, fmt)
    _refused(data[: int(len(data) * fraction)], "truncated", "corrupt")


# --- JPEG headers that promise more pixels than their bytes hold (24 cases) --------------------


def _jpeg_claiming(width: int, height: int, *, with_end_marker: bool) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim ``width x height``."""
    data = bytearray(_encode(photo("coffee").resize((32, 24)), "JPEG", quality=50))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    body = bytes(data[:-2])  # without its EOI marker
    return body + b"\xff\xd9" if with_end_marker else body


@pytest.mark.parametrize("with_end_marker", [True, False])
@pytest.mark.parametrize("size", [(6000, 6000), (4000, 3000), (3000, 4000), (2500, 2500), (6324, 6324), (2000, 1800)])
@pytest.mark.parametrize("reader", ["decode", "size"])
def test_implausibly_small_jpeg_is_refused_before_decoding(size, with_end_marker, reader):
    data = _jpeg_claiming(*size, with_end_marker=with_end_marker)
    assert len(data) < 2000
    with pytest.raises(InvalidImageError) as caught:
        (decode_image if reader == "decode" else read_image_size)(data)
    assert caught.value.reason == "truncated" and "cut off" in str(caught.value)


def test_flat_jpeg_at_its_real_size_is_accepted():
    # a real flat JPEG is the smallest a JPEG of that size gets; it must stay under the plausibility bar
    data = _encode(Image.new("L", (3000, 2000), 128), "JPEG", quality=10)
    assert decode_image(data).size == (3000, 2000)


# --- byte flips inside PNG data (CRC) and random garbage (60 cases) ----------------------------


@pytest.mark.parametrize("seed", range(30))
def test_png_with_flipped_bytes_is_refused(seed):
    data = bytearray(_encoded("coffee", "PNG"))
    rng = random.Random(seed)
    for _ in range(4):
        position = rng.randrange(100, len(data) - 20)
        data[position] ^= 0xFF
    _refused(bytes(data), "corrupt", "truncated")


@pytest.mark.parametrize("seed", range(30))
def test_random_bytes_are_unsupported(seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
    _refused(data, "unsupported", "corrupt", "truncated")


# --- what is not an image source at all (16 cases) ---------------------------------------------


@pytest.mark.parametrize(
    "make_source, reason",
    [
        (lambda tmp: b"", "empty"),
        (lambda tmp: bytearray(), "empty"),
        (lambda tmp: memoryview(b""), "empty"),
        (lambda tmp: io.BytesIO(b""), "empty"),
        (lambda tmp: io.StringIO("not bytes"), "unsupported"),
        (lambda tmp: open(_write(tmp, "t.png", _encoded("coffee", "PNG")), encoding="latin-1"), "unsupported"),  # noqa: SIM115
        (lambda tmp: open(_write(tmp, "t.jpg", _encoded("coffee", "JPEG")), encoding="utf-8"), "unsupported"),  # noqa: SIM115
        (lambda tmp: _StrReader(), "unsupported"),
        (lambda tmp: 12345, "unsupported"),
        (lambda tmp: None, "unsupported"),
        (lambda tmp: [1, 2, 3], "unsupported"),
        (lambda tmp: tmp, "missing"),  # a folder
        (lambda tmp: tmp / "missing.png", "missing"),
        (lambda tmp: "/dev/zero", "missing"),
        (lambda tmp: _write(tmp, "empty.jpg", b""), "empty"),
        (lambda tmp: _write(tmp, "text.jpg", b"hello, I am a text file"), "unsupported"),
    ],
)
def test_non_image_sources(tmp_path, make_source, reason):
    source = make_source(tmp_path)
    try:
        _refused(source, reason)
    finally:
        if hasattr(source, "close"):
            source.close()


class _StrReader:
    def read(self, size: int = -1) -> str:
        return "a string, not bytes"


def _write(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


# --- limits (12 cases) -------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(100_000, 100_000), (40_001, 1000), (1, 40_000_001), (7000, 6000), (65535, 65535)])
def test_pixel_limit_from_the_header(size):
    _refused(_png_header(*size), "too_large")


@pytest.mark.parametrize("fmt", FORMATS)
def test_byte_limit_for_every_source_kind(tmp_path, fmt):
    data = _encoded("coffee", fmt)
    _refused(data, "too_large", max_bytes=len(data) - 1)
    _refused(io.BytesIO(data), "too_large", max_bytes=len(data) - 1)


def test_byte_limit_for_a_path(tmp_path):
    path = _write(tmp_path, "c.png", _encoded("coffee", "PNG"))
    _refused(path, "too_large", max_bytes=100)


# --- high bit depth: scaled by the type's range, never per image (24 cases) --------------------


@pytest.mark.parametrize("value", [0, 1, 257, 1000, 32768, 65534, 65535, 12345])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_flat_16bit_images_keep_their_level(value, fmt):
    image = Image.fromarray(np.full((16, 24), value, dtype=np.uint16))
    decoded = np.asarray(decode_image(_encode(image, fmt)))
    assert decoded.shape == (16, 24, 3)
    assert (decoded == round(value * 255 / 65535)).all()


def test_dark_16bit_image_stays_dark():
    ramp = np.linspace(0, 2000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 3% of the range
    decoded = np.asarray(decode_image(_encode(Image.fromarray(ramp), "PNG")))
    assert decoded.max() <= 8


@pytest.mark.parametrize("value", [0.0, 0.25, 0.5, 1.0, -3.0, 7.5, 1e30, -1e30])
def test_float_images_are_taken_as_0_to_1_and_clipped(value):
    image = Image.fromarray(np.full((8, 8), value, dtype=np.float32))
    decoded = np.asarray(decode_image(_encode(image, "TIFF")))
    assert (decoded == round(min(max(value, 0.0), 1.0) * 255)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (7, 7), (3, 5)])
def test_nan_or_inf_in_a_float_image_is_refused(bad, where):
    array = np.full((8, 8), 0.5, dtype=np.float32)
    array[where] = bad
    error = _refused(_encode(Image.fromarray(array), "TIFF"), "corrupt")
    assert "NaN or infinite" in str(error)


def test_one_nan_does_not_black_out_a_readable_neighbour():
    # the readable image next to it decodes exactly (no state leaks between calls)
    array = np.full((8, 8), 0.5, dtype=np.float32)
    assert (np.asarray(decode_image(_encode(Image.fromarray(array), "TIFF"))) == 128).all()


# --- transparency, palette and odd modes decode to the right RGB (10 cases) --------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "L", "CMYK", "YCbCr", "I;16", "F"])
def test_every_mode_decodes_to_rgb(mode):
    base = photo("chelsea").resize((40, 30))
    image = base.convert("RGBA").convert(mode) if mode not in ("I;16", "F") else None
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    if mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255)
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "I;16": "TIFF", "F": "TIFF"}.get(mode, "PNG")
    decoded = decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    if mode in ("I;16", "F"):  # exact round trip through the type's range
        assert np.array_equal(np.asarray(decoded)[..., 0], np.asarray(base.convert("L")))


def test_reason_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(InvalidImageError("cut", "truncated")))
    assert error.reason == "truncated" and str(error) == "cut"
    with pytest.raises(ValueError):
        InvalidImageError("x", "no-such-reason")
