"""The preprocessing contract, in one place, shared by training, export and serving.

Models take RGB images as float tensors in [0, 1] (``[B, 3, H, W]``). Backbones are applied to
images normalised with ImageNet's mean and std in those units (equal to the official InsLoc code's
``mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]`` on 0-255); torchvision detectors
normalise inside their own ``GeneralizedRCNNTransform``, so they take the [0, 1] tensor as is.

``decode_image`` turns untrusted bytes or files into an RGB ``PIL.Image`` with limits, EXIF
orientation applied, and every failure reported as :class:`~insloc_hub.errors.InvalidImageError`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from insloc_hub.errors import InvalidImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: largest image accepted by default (about 8K x 5K); PIL's own bomb check allows ~89 MP
DEFAULT_MAX_PIXELS = 40_000_000
#: largest encoded input accepted by default
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: file name endings (lower case) that image folders and data sets are scanned for
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

PREPROCESSING: dict[str, Any] = {
    "color_space": "RGB",
    "input_range": [0.0, 1.0],
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "units": "mean/std apply to RGB values scaled to [0, 1] (x 255 gives the official 0-255 values)",
    "layout": "NCHW float32",
}


def decode_image(
    source: bytes | bytearray | memoryview | str | os.PathLike[str] | io.IOBase,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode an image file or bytes into an RGB ``PIL.Image``.

    EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and alpha images are converted to
    RGB (alpha is composited on white). The pixel limit is checked from the header, before any
    pixel is decoded.

    Raises:
        InvalidImageError: empty, truncated, corrupt, non-image or over-limit input; the message
            says which and what to do.

    Example:
        >>> img = decode_image(Path("photo.jpg"))  # doctest: +SKIP
        >>> img.mode
        'RGB'
    """
    name, data = _read_source(source, max_bytes)
    if not data:
        raise InvalidImageError(f"{name} is empty (0 bytes); send the image file's contents")
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces PIL's warning; its hard error (over twice
            # Image.MAX_IMAGE_PIXELS) still applies and is reported below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImageError(f"{name} has invalid dimensions {width}x{height}")
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
                    "downscale it first or raise max_pixels"
                )
            image.load()
    except InvalidImageError:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name} is not a recognised image format (JPEG, PNG, WebP, BMP, TIFF...)") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            f"{name} is over the limit of PIL's decompression-bomb guard ({exc}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels to decode it"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError(f"{name} could not be decoded (truncated or corrupt): {exc}") from exc
    return _to_rgb(ImageOps.exif_transpose(image))


def _read_source(source: Any, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "image data"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"image file {str(path)!r}"
        if not path.is_file():
            raise InvalidImageError(f"{name} does not exist or is not a file")
        if path.stat().st_size > max_bytes:
            raise InvalidImageError(f"{name} is {path.stat().st_size:,} bytes, over the limit of {max_bytes:,}")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
        name = "image stream"
    else:
        raise InvalidImageError(f"cannot read an image from a {type(source).__name__}; pass bytes or a path")
    if len(data) > max_bytes:
        raise InvalidImageError(f"{name} is over the limit of {max_bytes:,} bytes")
    return name, data


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # high bit-depth grayscale: rescale the actual range to 0-255 instead of clipping
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL.Image`` -> float32 tensor ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Apply ImageNet mean/std to ``[..., 3, H, W]`` tensors in [0, 1] (what backbones expect)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def load_image_tensor(source: Any, **limits: int) -> torch.Tensor:
    """``decode_image`` then ``to_tensor``: the [0, 1] RGB tensor a torchvision detector takes."""
    return to_tensor(decode_image(source, **limits))
