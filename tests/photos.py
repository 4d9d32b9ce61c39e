"""Real photographs shipped with scikit-image, for tests (no download needed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(name: str = "astronaut") -> Image.Image:
    """A scikit-image sample photograph as an RGB PIL image (astronaut, coffee, chelsea, rocket)."""
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def photo_bytes(name: str = "astronaut", fmt: str = "JPEG", **save_args) -> bytes:
    buffer = io.BytesIO()
    photo(name).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()
