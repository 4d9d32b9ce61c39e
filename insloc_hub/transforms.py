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
import math
import os
import re
import stat
import warnings
from pathlib import Path
from struct import error as struct_error
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

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


#: a JPEG needs at least about one bit per 8x8 luma block even when flat (measured: a flat 6000x6000
#: JPEG is >= 211 KB, i.e. one byte per 170 pixels); one byte per 2048 pixels leaves a 4x margin and
#: still refuses headers that promise far more pixels than their bytes can hold (a cut-off file).
JPEG_MIN_BYTES_PER_PIXEL = 1 / 2048

_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: pixels converted at a time from 16-bit/float to 8-bit (bounds the temporary arrays to a few MB)
_STRIP_PIXELS = 1 << 20

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | io.IOBase


def decode_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode an image file or bytes into an 8-bit RGB ``PIL.Image``: the one decoder policy.

    Every reader of insloc-hub (pretraining, fine-tuning, evaluation, the CLI, serving) opens pixels
    through this function, so they accept and refuse the same inputs.

    * Limits are checked before any pixel is decoded: ``max_bytes`` on the encoded input, then
      ``max_pixels`` and (for JPEG) a plausible byte count for the pixel count, from the header.
      ``max_pixels`` is the one pixel limit: a header over PIL's own decompression-bomb guard gets
      the same "W x H = N pixels, over the limit" message, and PIL's global limit is left alone.
    * EXIF orientation is applied.
    * Conversion to RGB: grayscale, palette, CMYK... as PIL converts them; alpha is composited on
      white; 16-bit images are scaled by their type's range (``v * 255 / 65535``, never stretched
      per image); float images are taken as [0, 1], clipped, and refused if they hold NaN or inf;
      32-bit integer images are scaled by ``2**31 - 1`` (negative values clipped to 0).

    Raises:
        InvalidImageError: with ``.reason`` one of ``empty``, ``missing``, ``too_large``,
            ``unsupported``, ``truncated``, ``corrupt``; the message says what to do. Bytes that
            start like a JPEG, PNG, GIF, WebP, BMP or TIFF but do not open are ``corrupt``, not
            ``unsupported``.

    Example:
        >>> img = decode_image(Path("photo.jpg"))  # doctest: +SKIP
        >>> img.mode
        'RGB'
    """
    name, data = _read_source(source, max_bytes)
    image = _open_checked(name, data, max_pixels)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, exc) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise InvalidImageError(f"{name} could not be decoded ({reason}): {exc}", reason) from exc
    orientation = _orientation(image)
    image = _to_8bit(image, name)  # rebinding frees the high-bit-depth pixels before the RGB copy
    image = _flatten_to_rgb(image)
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def read_image_size(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, int]:
    """``(width, height)`` that :func:`decode_image` would return, from the header only.

    Applies every check of :func:`decode_image` that needs no pixel (bytes, pixels, JPEG
    plausibility, format) and the EXIF orientation; a file that passes may still turn out truncated
    or corrupt when decoded. Used by the dataset loaders to size images without decoding them.

    Raises:
        InvalidImageError: as :func:`decode_image`.
    """
    name, data = _read_source(source, max_bytes)
    image = _open_checked(name, data, max_pixels)
    width, height = image.size
    # PNG's getexif() decodes the whole image to find an eXIf chunk after the pixels: read only one
    # placed before them (where writers put it), so sizing stays a header read
    orientation = 1 if image.format == "PNG" and "exif" not in image.info else _orientation(image)
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees: decoded as height x width
        width, height = height, width
    return int(width), int(height)


def _bomb_error(name: str, exc: Exception) -> InvalidImageError:
    """PIL's own guard fired where ours could not look first (a format that checks while decoding)."""
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"declares {int(pixels[1]):,} pixels" if pixels else "declares more pixels than can be decoded safely"
    return InvalidImageError(f"{name} {size}, over the decompression-bomb limit; downscale it first", "too_large")


def _open_unguarded(data: bytes) -> Image.Image | None:
    """The header parsed by the format's own reader, as ``Image.open`` does, minus PIL's bomb guard.

    Used only after that guard refused the image: ``max_pixels`` is then checked on the real size, so the
    client hears the size and the limit, and PIL's process-wide ``MAX_IMAGE_PIXELS`` is never raised.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept is not None else True
        if isinstance(accepted, str) or not accepted:  # a str is PIL's "possibly this format" warning
            continue
        try:
            return factory(io.BytesIO(data), "")
        except Exception:  # noqa: BLE001 - another reader may accept the bytes, as in Image.open
            continue
    return None


#: first bytes of the formats the decoder serves: a file that starts like one but does not open is damaged
_MAGIC = ((b"\xff\xd8", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _claimed_format(data: bytes) -> str | None:
    """The format the file's magic bytes announce (JPEG, PNG, GIF, WebP, BMP, TIFF), or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    # "BM" alone is too common in text: also ask for a known DIB header size at byte 14
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 64, 108,
                                                                                             124):
        return "BMP"
    return None


def _open_checked(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with the format, pixel-count and plausibility checks."""
    if not data:
        raise InvalidImageError(f"{name} is empty (0 bytes); send the image file's contents", "empty")
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces PIL's warning; its hard error (over twice
            # Image.MAX_IMAGE_PIXELS) is caught below and the header read again without it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        claimed = _claimed_format(data)
        if claimed is not None:  # the bytes say what they are: a damaged file, not a wrong format
            raise InvalidImageError(
                f"{name} starts like a {claimed} file but its header cannot be read (corrupt {claimed}); "
                "send an undamaged file", "corrupt") from exc
        raise InvalidImageError(
            f"{name} is not a recognised image format (JPEG, PNG, WebP, BMP, TIFF...)", "unsupported"
        ) from exc
    except Image.DecompressionBombError as exc:
        unguarded = _open_unguarded(data)
        if unguarded is None:
            raise _bomb_error(name, exc) from exc
        image = unguarded
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise InvalidImageError(f"{name} has an unreadable header ({reason}): {exc}", reason) from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name} has invalid dimensions {width}x{height}", "corrupt")
    pixels = width * height
    if pixels > max_pixels:
        raise InvalidImageError(
            f"{name} is {width}x{height} = {pixels:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it first or raise max_pixels",
            "too_large",
        )
    if image.format == "JPEG" and len(data) < pixels * JPEG_MIN_BYTES_PER_PIXEL:
        raise InvalidImageError(
            f"{name} is a {width}x{height} JPEG in only {len(data):,} bytes (a real one needs at least "
            f"{math.ceil(pixels * JPEG_MIN_BYTES_PER_PIXEL):,}): the file is cut off; send the whole file",
            "truncated",
        )
    return image


def _orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1 = as stored); a broken EXIF block does not make the pixels unusable."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - PIL raises many types for malformed EXIF
        return 1
    return value if isinstance(value, int) else 1


def _read_source(source: Any, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "image data"
        if len(source) > max_bytes:
            raise InvalidImageError(f"{name} is {len(source):,} bytes, over the limit of {max_bytes:,}", "too_large")
        return name, bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"image file {str(path)!r}"
        try:
            info = path.stat()
        except (OSError, ValueError) as exc:
            raise InvalidImageError(f"{name} does not exist or cannot be read ({exc})", "missing") from exc
        if not stat.S_ISREG(info.st_mode):  # a folder, /dev/zero, a FIFO...
            raise InvalidImageError(f"{name} is not a regular file", "missing")
        if info.st_size > max_bytes:
            raise InvalidImageError(f"{name} is {info.st_size:,} bytes, over the limit of {max_bytes:,}", "too_large")
        try:
            with path.open("rb") as f:
                data = f.read(max_bytes + 1)  # the file may grow after stat: never read past the limit
        except OSError as exc:
            raise InvalidImageError(f"{name} cannot be read ({exc})", "missing") from exc
    elif isinstance(source, io.TextIOBase):
        raise InvalidImageError("image stream is opened in text mode; open the file with 'rb'", "unsupported")
    elif hasattr(source, "read"):
        name = "image stream"
        try:
            data = source.read(max_bytes + 1)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InvalidImageError(f"{name} cannot be read ({exc}); pass a binary stream", "unsupported") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidImageError(
                f"{name}.read() returned {type(data).__name__}, not bytes; open the file with 'rb'", "unsupported"
            )
        data = bytes(data)
    else:
        raise InvalidImageError(
            f"cannot read an image from a {type(source).__name__}; pass bytes, a path or a binary stream",
            "unsupported",
        )
    if len(data) > max_bytes:
        raise InvalidImageError(f"{name} is over the limit of {max_bytes:,} bytes", "too_large")
    return name, data


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8-bit ``L`` scaled by their type's range.

    Works in strips of rows so the temporaries stay small at 40 MP (no full float64 copy).
    """
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):  # old Pillow reads 16-bit PNG as "I"
        low, high = 0.0, 65535.0
    elif mode == "I":
        low, high = 0.0, float(2**31 - 1)
    elif mode == "F":
        low, high = 0.0, 1.0
    else:
        return image
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    bad = 0
    for top in range(0, height, rows):
        strip = np.array(image.crop((0, top, width, min(top + rows, height))), dtype=np.float32)
        if mode == "F":
            finite = np.isfinite(strip)
            if not finite.all():
                bad += int(strip.size - np.count_nonzero(finite))
                continue
        np.clip(strip, low, high, out=strip)
        strip *= 255.0 / high
        out[top:top + strip.shape[0]] = np.rint(strip).astype(np.uint8)
    if bad:
        raise InvalidImageError(
            f"{name} is a float image with {bad:,} NaN or infinite pixels; replace them before sending it", "corrupt"
        )
    return Image.fromarray(out, "L")


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """Any 8-bit mode -> RGB; transparency is composited on white with one RGB canvas (no RGBA copies)."""
    if image.mode == "RGB":
        return image
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, (0, 0), image)  # the RGBA image is its own mask (its alpha)
        return canvas
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB ``PIL.Image`` -> float32 tensor ``[3, H, W]`` in [0, 1]."""
    return TF.pil_to_tensor(image.convert("RGB")).float().div_(255.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Apply ImageNet mean/std to ``[..., 3, H, W]`` tensors in [0, 1] (what backbones expect)."""
    return TF.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))
