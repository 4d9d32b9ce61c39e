"""The shared decoder and preprocessing contract: every bad input gets InvalidImageError."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from insloc_hub.errors import InvalidImageError
from insloc_hub.transforms import (
    IMAGENET_MEAN,
    PREPROCESSING,
    decode_image,
    normalize,
    read_image_size,
    to_tensor,
)
from tests.photos import photo, photo_bytes


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_decodes_real_jpeg_from_bytes_path_and_stream(tmp_path):
    data = photo_bytes("coffee")
    path = tmp_path / "coffee.jpg"
    path.write_bytes(data)
    for source in (data, path, str(path), io.BytesIO(data)):
        image = decode_image(source)
        assert image.mode == "RGB" and image.size == (600, 400)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_converts_every_mode_to_rgb(mode):
    base = photo("chelsea").resize((64, 48))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 200)
        assert image.mode == "I;16"
    else:
        image = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    decoded = decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (64, 48)
    if mode == "I;16":  # scaled by the 16-bit range (v * 255 / 65535), never stretched per image
        expected = np.rint(np.asarray(image, dtype=np.float64) * 255 / 65535).astype(np.uint8)
        assert np.array_equal(np.asarray(decoded)[..., 0], expected)


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert decode_image(_encode(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


def test_zero_byte_input(tmp_path):
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(tmp_path / "empty.jpg")


def test_truncated_jpeg():
    data = photo_bytes("astronaut")
    with pytest.raises(InvalidImageError, match="truncated") as caught:
        decode_image(data[: len(data) // 3])
    assert caught.value.reason == "truncated"


def test_corrupt_body_with_valid_header():
    data = bytearray(_encode(photo("coffee").resize((64, 64)), "PNG"))
    data[60:400] = b"\x00" * 340
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data))


def test_non_image_input(tmp_path):
    with pytest.raises(InvalidImageError, match="not a recognised image format"):
        decode_image(b"%PDF-1.4 this is not an image at all")
    with pytest.raises(InvalidImageError, match="does not exist"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="cannot read an image"):
        decode_image(12345)


def test_enormous_dimensions_rejected_before_decoding():
    # a valid PNG header claiming 100000 x 100000 pixels, with no pixel data behind it
    def chunk(kind: bytes, payload: bytes) -> bytes:
        import zlib

        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    with pytest.raises(InvalidImageError, match="over the limit"):
        decode_image(header + chunk(b"IEND", b""))
    with pytest.raises(InvalidImageError, match="over the limit"):
        decode_image(photo_bytes("coffee"), max_pixels=1000)


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares ``width x height`` pixels and holds none."""
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (100_000, 100_000), (60_000, 40_000)])
def test_every_size_over_the_limit_gets_the_same_message(width, height):
    # 100 MP passes PIL's open but 10 GP and 2.4 GP trip its decompression-bomb error: the client hears
    # the same size-and-limit message either way, and nothing tells it to change PIL's global limit
    with pytest.raises(InvalidImageError) as caught:
        decode_image(_png_header(width, height))
    message = str(caught.value)
    assert f"{width}x{height} = {width * height:,} pixels, over the limit of 40,000,000" in message
    assert "MAX_IMAGE_PIXELS" not in message and caught.value.reason == "too_large"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the process-wide guard is left as PIL sets it


def test_max_pixels_above_pils_guard_is_the_one_limit():
    # a header between PIL's hard limit (~179 MP) and the caller's max_pixels is sized, not refused
    assert read_image_size(_png_header(20_000, 10_000), max_pixels=300_000_000) == (20_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize("damage", [slice(2, 20), slice(20, 200)])
def test_damaged_jpeg_header_is_corrupt_not_unsupported(damage):
    data = bytearray(_encode(photo("coffee").resize((64, 48)), "JPEG"))
    data[damage] = b"\x00" * (damage.stop - damage.start)  # the FF D8 start marker stays
    with pytest.raises(InvalidImageError, match="corrupt JPEG") as caught:
        decode_image(bytes(data))
    assert caught.value.reason == "corrupt"


def test_byte_limit():
    with pytest.raises(InvalidImageError, match="bytes"):
        decode_image(photo_bytes("coffee"), max_bytes=100)


def test_tensor_contract():
    tensor = to_tensor(decode_image(photo_bytes("coffee", "PNG")))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 400, 600)
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert torch.equal(tensor, to_tensor(photo("coffee")))
    grey = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 2, 2)
    assert torch.allclose(normalize(grey), torch.zeros(3, 2, 2), atol=1e-6)
    assert PREPROCESSING["color_space"] == "RGB" and PREPROCESSING["mean"] == list(IMAGENET_MEAN)
