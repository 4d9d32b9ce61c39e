"""The decoder's refusals as HTTP statuses: what a client sees for each kind of bad image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from insloc_hub.errors import InvalidImageError
from insloc_hub.serve.errors import image_error
from insloc_hub.transforms import decode_image


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _status(data: bytes) -> tuple[int, str, str]:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data)
    error = image_error(caught.value, 2)
    return error.status, error.code, error.message


def test_damaged_jpeg_header_is_400_corrupt_jpeg():
    data = bytearray(_jpeg())
    data[20:200] = b"\x00" * 180  # start marker intact, header tables gone
    status, code, message = _status(bytes(data))
    assert (status, code) == (400, "corrupt_image") and message.startswith("image 2") and "JPEG" in message


def test_not_an_image_is_still_415():
    assert _status(b"hello, not an image")[:2] == (415, "unsupported_image")
