"""Unlabelled images and the InsLoc pretraining datasets (insloc-method.md, section 1.1).

:class:`UnlabelledImages` holds the files: a folder (any tree, class folders ignored) or the official
list of relative paths (``docs/DATA.md``); unreadable files are skipped, counted and reported once per
epoch, never fatal. Every dataset draws the official sample (``ImageNetDataset.prepare_train_img``,
``mmdet/datasets/imagenet.py`` L66-91 at limbo0000/InstanceLoc @ a419bb6: foreground = image ``idx``,
two backgrounds drawn uniformly with replacement from the whole set); they differ only in where the
images are decoded and composed: :class:`InsLocPretrainDataset` in the CPU workers (fast tensor
pipeline, or the PIL reference) and :class:`InsLocBytesDataset` (bytes only; decoded and composed on the
device, nvJPEG on CUDA).

Reproducibility. Sample ``idx`` of epoch ``e`` is a pure function of ``(seed, e, idx)`` and the
files: every draw comes from ``numpy.random.default_rng(SeedSequence([seed, e, idx]))``, whatever the
number of workers or the order in which they run; a resumed run sees the same samples. The epoch is
held in shared memory, so ``set_epoch`` reaches persistent workers too (call it before iterating the
loader); a sampler may also pass ``(epoch, idx)`` tuples as keys. Inside DataLoader workers the
global python ``random``, ``numpy`` and ``torch`` RNGs are also seeded per sample from the same key
(the official code relies on those globals, see ``worker_init_fn`` in ``mmdet/datasets/builder.py``
L88-93); in the main process they are left alone so the trainer's RNG state is not disturbed.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor  # [3, H, W] over the H x W x 3 array (channels-last)

from insloc_hub.errors import ConfigError, DatasetError, InvalidImageError
from insloc_hub.training.pretraining.compose import (
    CompositionConfig,
    compose_batch,
    compose_pair,
    foreground_reduction,
    sample_composition_params,
    stretch_to_canvas,
)
from insloc_hub.transforms import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "UnlabelledImages",
    "UnreadableReport",
    "InsLocPretrainDataset",
    "InsLocBytesDataset",
    "EncodedImage",
    "collate_decoded",
    "collate_encoded",
    "decode_batch",
    "compose_encoded_batch",
    "DevicePrefetcher",
    "apply_exif_orientation",
    "in_batch_background_indices",
    "sample_rng",
]

logger = logging.getLogger(__name__)

# Consecutive unreadable draws after which a sample gives up (the data set is essentially broken).
_MAX_REPLACEMENTS = 100
# Event-counter slots: 0 = main process, 1 + worker_id for DataLoader workers (race-free counting).
_EVENT_SLOTS = 512


@dataclass(frozen=True)
class UnreadableReport:
    """Unreadable images met since the last report."""

    events: int
    """How many times a draw hit an unreadable file and was replaced."""
    files: tuple[str, ...]
    """The distinct unreadable files."""

    def __bool__(self) -> bool:
        return self.events > 0


class UnlabelledImages:
    """A list of image files without labels.

    Args:
        root_or_list: a directory (scanned recursively; class sub-folders are simply walked), a
            text file listing images (official format: one relative path per line, first
            whitespace-separated token; blank lines and ``#`` comments ignored), or a sequence of paths.
        root: folder the list's relative paths are relative to (default: the list file's folder;
            the official ``img_prefix``).
        max_pixels: refuse images with more pixels than this (counted as unreadable).
        extensions: accepted file extensions when scanning a folder (case-insensitive).

    Raises:
        DatasetError: the path does not exist, or it holds no image.
    """

    def __init__(
        self,
        root_or_list: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        root: str | os.PathLike[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.max_pixels = int(max_pixels)
        self.extensions = tuple("." + e.lower().lstrip(".") for e in extensions)
        if isinstance(root_or_list, (str, os.PathLike)):
            source = Path(root_or_list).expanduser()
            if not source.exists():
                raise DatasetError(
                    f"data path {str(source)!r} does not exist; pass a folder of images or a text file listing them"
                )
            if source.is_dir():
                self.paths = self._scan(source)
                where = f"folder {str(source)!r} (extensions {', '.join(self.extensions)})"
            else:
                self.paths = self._read_list(source, root)
                where = f"list file {str(source)!r}"
        else:
            base = Path(root).expanduser() if root is not None else None
            self.paths = [str(base / p) if base is not None else str(p) for p in root_or_list]
            where = "the given list of paths"
        if not self.paths:
            raise DatasetError(f"no images found in {where}")
        n = len(self.paths)
        # Shared memory, so DataLoader workers (fork or spawn) and the main process see the same
        # counters. known_bad persists (a bad file is not decoded again), the others reset per report.
        self._known_bad = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self._epoch_bad = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self._events = torch.zeros(_EVENT_SLOTS, dtype=torch.int64).share_memory_()

    def _scan(self, folder: Path) -> list[str]:
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith(".") and name.lower().endswith(self.extensions):
                    found.append(os.path.join(dirpath, name))
        return found

    @staticmethod
    def _read_list(list_file: Path, root: str | os.PathLike[str] | None) -> list[str]:
        base = Path(root).expanduser() if root is not None else list_file.parent
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"cannot read image list {str(list_file)!r}: {err}") from err
        paths = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # imagenet.py load_annotations: op.join(img_prefix, each.strip().split()[0])
            paths.append(str(base / line.split()[0]))
        if paths and not any(os.path.exists(p) for p in paths[:8]):
            raise DatasetError(
                f"the first entries of {str(list_file)!r} do not exist (e.g. {paths[0]!r}); paths in the "
                f"list are relative to {str(base)!r}: pass the folder they are relative to as --data-root (root= "
                "in Python)"
            )
        return paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB (EXIF orientation applied, ``max_pixels`` enforced).

        Raises :class:`InvalidImageError` if it cannot be read (missing, corrupt, too large).
        """
        return decode_image(self.paths[index], max_pixels=self.max_pixels)

    def open_encoded(self, index: int) -> EncodedImage:
        """Read image ``index``'s bytes and header only (size, EXIF orientation); nothing is decoded.

        Raises :class:`InvalidImageError` for a missing, empty, over-limit or unrecognised file.
        """
        enc = EncodedImage.open(self.paths[index], max_pixels=self.max_pixels)
        enc.index = index
        return enc

    # -- unreadable-file bookkeeping ---------------------------------------------------------------
    def is_known_unreadable(self, index: int) -> bool:
        """Whether ``index`` already failed to decode (in any process)."""
        return bool(self._known_bad[index])

    def record_unreadable(self, index: int, error: Exception | None = None) -> None:
        """Count one replaced draw of unreadable image ``index``."""
        if not self._known_bad[index] and error is not None:
            logger.debug("unreadable image skipped: %s", error)
        self._known_bad[index] = 1
        self._epoch_bad[index] = 1
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_EVENT_SLOTS - 1)
        self._events[slot] += 1

    @property
    def unreadable_count(self) -> int:
        """Replaced draws since the last :meth:`pop_epoch_report` (all processes)."""
        return int(self._events.sum())

    def pop_epoch_report(self, *, log: bool = True) -> UnreadableReport:
        """Return and reset the unreadable-image counters; log one warning if any were met.

        Call once per epoch from the main process (the trainer does it at the end of each epoch).
        """
        events = int(self._events.sum())
        bad = torch.nonzero(self._epoch_bad).flatten().tolist()
        self._events.zero_()
        self._epoch_bad.zero_()
        report = UnreadableReport(events, tuple(self.paths[i] for i in bad))
        if report and log:
            shown = ", ".join(report.files[:5]) + (" ..." if len(report.files) > 5 else "")
            logger.warning(
                "skipped %d draws of %d unreadable image file(s), replaced by random images: %s",
                report.events,
                len(report.files),
                shown,
            )
        return report


# --------------------------------------------------------------------------------------------------
# Trusted local training files: header first, decode at the scale the sample needs
# --------------------------------------------------------------------------------------------------
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_EXIF_ORIENTATION = 0x0112


@dataclass
class EncodedImage:
    """An image file read into memory, its header parsed, its pixels not yet decoded.

    The fast decode path for **local training files** (:meth:`decode`): it applies the policy of
    :func:`insloc_hub.transforms.decode_image` -- byte and pixel limits checked before decoding, EXIF
    orientation applied, RGB output, every failure an :class:`InvalidImageError` -- and adds what
    ``decode_image`` cannot know: the size the sample needs, so a JPEG is decoded at a reduced DCT
    scale (PIL ``draft``: 1/2, 1/4 or 1/8) whenever that is still at least that size. Other formats
    (PNG, WebP, BMP...) go through ``decode_image`` itself.
    """

    name: str
    data: bytes
    size: tuple[int, int]
    """(width, height) after the EXIF orientation is applied."""
    orientation: int
    """EXIF orientation tag (1 = none; 2-8 = flips/rotations, applied by :meth:`decode`)."""
    is_jpeg: bool
    decoded: Image.Image | None = None
    """Formats other than JPEG are decoded once, by ``decode_image``, when opened."""
    index: int = -1
    """Position in the :class:`UnlabelledImages` it came from (-1: opened directly)."""
    header: Image.Image | None = field(default=None, repr=False, compare=False)
    """The PIL image opened on ``data``, header parsed, pixels not loaded (reused by one decode)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
             max_bytes: int = DEFAULT_MAX_BYTES) -> EncodedImage:
        """Read ``path`` and parse its header. Raises :class:`InvalidImageError` like ``decode_image``."""
        name = f"image file {str(path)!r}"
        try:
            size = os.path.getsize(path)
            if size > max_bytes:
                raise InvalidImageError(f"{name} is {size:,} bytes, over the limit of {max_bytes:,}")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise InvalidImageError(f"{name} cannot be read: {err}") from err
        if not data:
            raise InvalidImageError(f"{name} is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                width, height = img.size
                orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1)) if img.format in _JPEG_FORMATS else 1
                is_jpeg = img.format in _JPEG_FORMATS
        except Exception as err:  # PIL raises many types for unreadable headers
            raise InvalidImageError(f"{name} is not a readable image: {err}") from err
        if width <= 0 or height <= 0 or width * height > max_pixels:
            raise InvalidImageError(f"{name} is {width}x{height} pixels, outside (0, {max_pixels:,}]")
        if orientation not in range(1, 9):
            orientation = 1
        if orientation >= 5:  # 5-8 swap the axes
            width, height = height, width
        if not is_jpeg:  # the full policy of decode_image (alpha on white, 16-bit, EXIF...)
            decoded = decode_image(data, max_pixels=max_pixels)
            return cls(name, data, decoded.size, 1, False, decoded)
        return cls(name, data, (width, height), orientation, True, header=img)

    def decode(self, min_size: tuple[float, float] | None = None) -> Image.Image:
        """Decode to RGB, at a reduced JPEG scale whose (oriented) size stays >= ``min_size``.

        ``min_size=None`` decodes at full size. The result may be larger than ``min_size`` (only
        DCT scales 1/1, 1/2, 1/4, 1/8 exist) and is never smaller.
        """
        if self.decoded is not None:
            return self.decoded
        try:
            img, self.header = self.header or Image.open(io.BytesIO(self.data)), None  # draft only before a load
            if min_size is not None:
                want_w, want_h = (math.ceil(min_size[0]), math.ceil(min_size[1]))
                if self.orientation >= 5:
                    want_w, want_h = want_h, want_w
                if want_w < img.size[0] and want_h < img.size[1]:
                    img.draft(None, (max(1, want_w), max(1, want_h)))
            img.load()
        except Exception as err:
            raise InvalidImageError(f"{self.name} could not be decoded (truncated or corrupt): {err}") from err
        if self.orientation != 1:
            img = ImageOps.exif_transpose(img)
        return img if img.mode == "RGB" else img.convert("RGB")

    def decode_uint8(self, min_size: tuple[float, float] | None = None) -> torch.Tensor:
        """:meth:`decode` as a uint8 ``[3, H, W]`` tensor (laid out channels-last in memory).

        A JPEG read at full scale goes to ``torchvision.io.decode_jpeg`` (libjpeg-turbo without PIL's
        image conversions, about a third faster here), a reduced one to PIL's ``draft``; if
        torchvision refuses a file, PIL decodes it (or raises :class:`InvalidImageError`).
        """
        reduced = min_size is not None and all(s // max(1, math.ceil(m)) >= 2 for s, m in zip(self.size, min_size))
        if self.is_jpeg and not reduced:
            try:
                return apply_exif_orientation(_decode_jpeg(self.as_tensor(), torch.device("cpu")), self.orientation)
            except RuntimeError:
                pass
        return pil_to_tensor(self.decode(min_size))

    def as_tensor(self) -> torch.Tensor:
        """The encoded bytes as a 1-D uint8 tensor (what ``torchvision.io.decode_jpeg`` takes)."""
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------
# Per-sample seeding
# --------------------------------------------------------------------------------------------------
def sample_rng(seed: int, epoch: int, index: int, *, seed_globals: bool | None = None) -> np.random.Generator:
    """The generator of sample ``index`` at ``epoch``: ``default_rng(SeedSequence([seed, epoch, index]))``.

    With ``seed_globals`` (default: only inside a DataLoader worker) python ``random``, ``numpy``'s
    global RNG and torch's default generator are seeded from the same key too.
    """
    seq = np.random.SeedSequence([seed % 2**64, epoch, index])
    if seed_globals is None:
        seed_globals = get_worker_info() is not None
    if seed_globals:
        state = seq.spawn(1)[0].generate_state(2, dtype=np.uint32)
        global_seed = int(state[0]) << 32 | int(state[1])
        random.seed(global_seed)
        np.random.seed(int(state[0]))
        torch.manual_seed(global_seed)
    return np.random.default_rng(seq)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
class PretrainSampleDataset(Dataset):
    """Shared by the InsLoc and MoCo datasets: epoch, per-sample RNG, draws with replacement of bad files."""

    def __init__(self, images: UnlabelledImages, cfg: CompositionConfig | None = None, seed: int = 0) -> None:
        if len(images) == 0:
            raise DatasetError("InsLoc pretraining needs at least one image")
        self.images = images
        self.cfg = cfg or CompositionConfig()
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` returns (shared with running workers).

        Moving to another epoch also reports (logs once) the unreadable images of the previous one,
        unless the trainer already popped that report with ``images.pop_epoch_report()``.
        """
        if int(epoch) != self.epoch:
            self.images.pop_epoch_report()
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(key, tuple):
            epoch, index = int(key[0]), int(key[1])
        else:
            epoch, index = self.epoch, int(key)
        n = len(self.images)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {key} out of range for {n} images")
        return epoch, index

    def _load(self, index: int, rng: np.random.Generator, loader: Callable[[int], Any]) -> tuple[int, Any]:
        """Load ``index``; if unreadable, draw another image uniformly (counted), up to a limit."""
        n = len(self.images)
        for _ in range(_MAX_REPLACEMENTS):
            if not self.images.is_known_unreadable(index):
                try:
                    return index, loader(index)
                except InvalidImageError as err:
                    self.images.record_unreadable(index, err)
            else:
                self.images.record_unreadable(index)
            index = int(rng.integers(0, n))
        raise DatasetError(
            f"{_MAX_REPLACEMENTS} image draws in a row were unreadable; check the data "
            f"(e.g. {self.images.paths[index]!r})"
        )

    def _draw(
        self,
        index: int,
        rng: np.random.Generator,
        fg_loader: Callable[[int], Any],
        bg_loader: Callable[[int], Any],
    ) -> tuple[Any, Any, Any]:
        n = len(self.images)
        # imagenet.py L68-73: two backgrounds, np.random.randint(0, len), with replacement; either
        # may be the foreground itself.
        bg_q_index = int(rng.integers(0, n))
        bg_k_index = int(rng.integers(0, n))
        _, fg = self._load(index, rng, fg_loader)
        _, bg_q = self._load(bg_q_index, rng, bg_loader)
        _, bg_k = self._load(bg_k_index, rng, bg_loader)
        return fg, bg_q, bg_k


PIPELINES = ("fast", "reference")


class InsLocPretrainDataset(PretrainSampleDataset):
    """The official InsLoc pretraining sample, composed per sample on the CPU.

    ``dataset[idx]`` (or ``dataset[(epoch, idx)]``) returns ``dict(q_img, q_box, k_img, k_box, index)``:
    normalised float images ``[3, S, S]``, float32 boxes ``[4]`` (x1, y1, x2, y2; x2/y2 exclusive)
    and the index. A corrupt foreground or background is replaced by another random image (counted
    in ``images``' report).

    ``pipeline``:

    * ``"fast"`` (default) -- :meth:`EncodedImage.decode_uint8` decodes (``torchvision.io.decode_jpeg``,
      or PIL ``draft`` at the smallest DCT scale that is still at least the size its use needs: a
      background the canvas, the foreground the size at which both crops still shrink to their
      pastes), then :func:`~insloc_hub.training.pretraining.compose.compose_batch` on this one sample (uint8
      resizes and composite, in-place float colour ops). Same draws, same boxes; pixels within about
      a grey level of the reference on average (see ``compose_batch`` for each difference).
    * ``"reference"`` -- :func:`~insloc_hub.training.pretraining.compose.compose_pair` on full decodes through
      :func:`insloc_hub.transforms.decode_image` (the specification).
    """

    def __init__(self, images: UnlabelledImages, cfg: CompositionConfig | None = None, seed: int = 0, *,
                 pipeline: str = "fast") -> None:
        super().__init__(images, cfg, seed)
        if pipeline not in PIPELINES:
            raise ConfigError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        self.pipeline = pipeline

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        if self.pipeline == "reference":
            fg, bg_q, bg_k = self._draw(index, rng, self.images.load, self.images.load)
            q_img, q_box, k_img, k_box = compose_pair(fg, bg_q, bg_k, self.cfg, rng)
        else:
            opener = self.images.open_encoded
            fg, bg_q, bg_k = self._draw(index, rng, opener, opener)
            size = (self.cfg.canvas, self.cfg.canvas)
            bgs = [self._decode_or_replace(bg, rng, size) for bg in (bg_q, bg_k)]
            while True:
                params = sample_composition_params(fg.size, self.cfg, rng)
                reduce = foreground_reduction(params)
                try:
                    image = fg.decode_uint8((fg.size[0] / reduce, fg.size[1] / reduce))
                    break
                except InvalidImageError as err:
                    fg = self._replace(fg, err, rng)
            q, qb, k, kb = compose_batch([image], bgs[:1], bgs[1:], self.cfg, params=[params])
            q_img, q_box, k_img, k_box = q[0], qb[0], k[0], kb[0]
        return {"q_img": q_img, "q_box": q_box, "k_img": k_img, "k_box": k_box, "index": index}

    def _replace(self, enc: EncodedImage, err: InvalidImageError, rng: np.random.Generator) -> EncodedImage:
        """``enc`` failed to decode after its header was fine: count it, draw another image."""
        self.images.record_unreadable(enc.index, err)
        _, other = self._load(int(rng.integers(0, len(self.images))), rng, self.images.open_encoded)
        return other

    def _decode_or_replace(self, enc: EncodedImage, rng: np.random.Generator,
                           min_size: tuple[float, float]) -> torch.Tensor:
        while True:
            try:
                return enc.decode_uint8(min_size)
            except InvalidImageError as err:
                enc = self._replace(enc, err, rng)


def collate_decoded(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate decoded samples (``MocoDecodeDataset``): ``fg`` and ``params`` stay lists, backgrounds stack.

    Samples of :class:`InsLocBytesDataset` are passed on to :func:`collate_encoded`, so one collate
    function serves every device-composition dataset.
    """
    if batch and "bg_draw" in batch[0]:
        return collate_encoded(batch)
    return {
        "fg": [b["fg"] for b in batch],
        "bg_q": torch.stack([b["bg_q"] for b in batch]),
        "bg_k": torch.stack([b["bg_k"] for b in batch]),
        "params": [b["params"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------------
# Bytes in the workers, decode + composition on the device
# --------------------------------------------------------------------------------------------------
JPEG, PIXELS = "jpeg", "pixels"


def _payload(enc: EncodedImage) -> tuple[str, torch.Tensor, int]:
    """What a worker sends for one image: JPEG bytes (+ EXIF orientation), or decoded pixels for
    other formats (their CPU fallback, decoded once in the worker by ``decode_image``)."""
    if enc.is_jpeg:
        return (JPEG, enc.as_tensor(), enc.orientation)
    return (PIXELS, pil_to_tensor(enc.decode()), 1)


class InsLocBytesDataset(PretrainSampleDataset):
    """Workers only read bytes: the official draws, the files' bytes, nothing decoded.

    ``dataset[idx]`` returns ``dict(fg, bg_q, bg_k, params, index, bg_draw)`` where ``fg``/``bg_q``/
    ``bg_k`` are payloads ``(kind, tensor, orientation)``: ``("jpeg", 1-D uint8 bytes, EXIF
    orientation)`` for JPEG files, ``("pixels", uint8 [3, H, W], 1)`` for other formats (decoded in
    the worker by ``decode_image``, the CPU fallback). ``params`` are the sample's
    :class:`CompositionParams`, drawn for the foreground's oriented size read from its header. Batch
    with :func:`collate_encoded`, then :func:`compose_encoded_batch` decodes the JPEGs with
    ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA, batched) and composes them with
    :func:`~insloc_hub.training.pretraining.compose.compose_batch`. Same draws as :class:`InsLocPretrainDataset`,
    hence the same boxes.

    ``batch_backgrounds=True`` (off by default; not the official recipe): no background is read;
    each sample's two backgrounds are other foregrounds of the same batch (one decode per sample
    instead of three), chosen uniformly from ``bg_draw`` (two uniform numbers per sample).
    """

    def __init__(self, images: UnlabelledImages, cfg: CompositionConfig | None = None, seed: int = 0, *,
                 batch_backgrounds: bool = False) -> None:
        super().__init__(images, cfg, seed)
        self.batch_backgrounds = bool(batch_backgrounds)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        opener = self.images.open_encoded
        if self.batch_backgrounds:
            _, fg = self._load(index, rng, opener)
            bg_q = bg_k = None
            bg_draw = torch.tensor(rng.random(2), dtype=torch.float64)
        else:
            fg, bg_q, bg_k = self._draw(index, rng, opener, opener)
            bg_draw = None
        params = sample_composition_params(fg.size, self.cfg, rng)
        return {
            "fg": _payload(fg),
            "bg_q": _payload(bg_q) if bg_q is not None else None,
            "bg_k": _payload(bg_k) if bg_k is not None else None,
            "params": params,
            "index": index,
            "bg_draw": bg_draw,
        }


def collate_encoded(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`InsLocBytesDataset` samples: payloads and params stay lists."""
    in_batch = batch[0]["bg_draw"] is not None
    return {
        "fg": [b["fg"] for b in batch],
        "bg_q": None if in_batch else [b["bg_q"] for b in batch],
        "bg_k": None if in_batch else [b["bg_k"] for b in batch],
        "params": [b["params"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "bg_draw": torch.stack([b["bg_draw"] for b in batch]) if in_batch else None,
    }


def apply_exif_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, H, W]`` as PIL's ``ImageOps.exif_transpose`` would turn it for EXIF ``orientation`` 1-8."""
    transform = _EXIF_TRANSFORMS.get(orientation)
    return img if transform is None else transform(img)


_EXIF_TRANSFORMS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda img: img.flip(-1),
    3: lambda img: img.flip((-2, -1)),
    4: lambda img: img.flip(-2),
    5: lambda img: img.transpose(-2, -1),
    6: lambda img: torch.rot90(img, -1, (-2, -1)),
    7: lambda img: img.transpose(-2, -1).flip((-2, -1)),
    8: lambda img: torch.rot90(img, 1, (-2, -1)),
}


def _decode_jpeg(data: Any, device: torch.device) -> Any:
    # torchvision >= 0.29 marks its image codecs deprecated in favour of torchcodec; they still
    # work and are what torch 2.11 / torchvision 0.26 GPU machines have, so the warning is muted.
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(payload: tuple[str, torch.Tensor, int], device: torch.device) -> torch.Tensor:
    kind, data, orientation = payload
    try:
        img = _decode_jpeg(data, device)
    except RuntimeError:  # e.g. a JPEG variant the device decoder refuses: PIL on the CPU
        try:  # decode_image has already applied the EXIF orientation
            return pil_to_tensor(decode_image(data.numpy().tobytes())).to(device)
        except InvalidImageError as err:
            logger.warning("undecodable image replaced by grey in this batch: %s", err)
            return torch.full((3, 64, 64), 128, dtype=torch.uint8, device=device)
    return apply_exif_orientation(img, orientation)


def decode_batch(payloads: Sequence[tuple[str, torch.Tensor, int]], device: torch.device | str) -> list[torch.Tensor]:
    """Decode worker payloads to RGB uint8 ``[3, H, W]`` tensors on ``device``.

    All JPEGs go to one ``torchvision.io.decode_jpeg`` call (batched nvJPEG on CUDA, libjpeg-turbo on
    the CPU); EXIF orientation is applied on the device; pixels already decoded in a worker are only
    copied. If the batched call fails, each JPEG is decoded alone, and one the device decoder
    refuses is decoded by PIL on the CPU (an undecodable one becomes a grey image, logged).
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [i for i, p in enumerate(payloads) if p[0] == JPEG]
    if jpegs:
        try:
            decoded = _decode_jpeg([payloads[i][1] for i in jpegs], device)
            for i, img in zip(jpegs, decoded, strict=True):
                out[i] = apply_exif_orientation(img, payloads[i][2])
        except RuntimeError:
            for i in jpegs:
                out[i] = _decode_one(payloads[i], device)
    for i, (kind, data, _) in enumerate(payloads):
        if kind != JPEG:
            out[i] = data.to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def in_batch_background_indices(bg_draw: torch.Tensor) -> tuple[list[int], list[int]]:
    """For ``batch_backgrounds``: the batch positions of each sample's two backgrounds.

    ``bg_draw`` is ``[B, 2]`` uniform numbers in [0, 1) (from the workers); each background is
    another sample of the batch, uniformly (itself only when ``B == 1``).
    """
    n = int(bg_draw.shape[0])
    if n == 1:
        return [0], [0]
    offsets = (1 + (bg_draw.double() * (n - 1)).long().clamp_(max=n - 2)).tolist()
    return [(i + o[0]) % n for i, o in enumerate(offsets)], [(i + o[1]) % n for i, o in enumerate(offsets)]


def compose_encoded_batch(batch: dict[str, Any], cfg: CompositionConfig, device: torch.device | str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode a :func:`collate_encoded` batch on ``device`` and compose it: ``(q, q_box, k, k_box)``.

    The images come back normalised, float32 ``[B, 3, S, S]``, boxes ``[B, 4]``, on ``device``.
    Nothing here waits for the device: parameters and index lists live on the host.
    """
    device = torch.device(device)
    n = len(batch["fg"])
    if batch["bg_draw"] is None:
        images = decode_batch(list(batch["fg"]) + list(batch["bg_q"]) + list(batch["bg_k"]), device)
        fgs, bg_q, bg_k = images[:n], images[n:2 * n], images[2 * n:]
    else:
        fgs = decode_batch(batch["fg"], device)
        canvases = stretch_to_canvas(fgs, cfg.canvas)
        jq, jk = (torch.tensor(j).to(device, non_blocking=True) for j in in_batch_background_indices(batch["bg_draw"]))
        bg_q, bg_k = canvases.index_select(0, jq), canvases.index_select(0, jk)  # index sent without a sync
    return compose_batch(fgs, bg_q, bg_k, cfg, params=batch["params"], device=device)


class DevicePrefetcher:
    """Prepare the next batch on a side CUDA stream while the current step runs.

    Iterating yields ``prepare(batch)`` for each batch of ``batches`` (e.g. ``lambda b:
    compose_encoded_batch(b, cfg, device)``); on CUDA the next batch's decode and composition are
    queued on their own stream as soon as the current one is handed out, so they overlap the model
    step instead of running before it; the step's stream waits for them only when it takes them. On
    the CPU it simply calls ``prepare`` in turn (same results).
    """

    def __init__(self, batches: Iterable[Any], prepare: Callable[[Any], tuple[torch.Tensor, ...]],
                 device: torch.device | str) -> None:
        self.batches = iter(batches)
        self.prepare = prepare
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: tuple[torch.Tensor, ...] | None = None
        self._queue()

    def _queue(self) -> None:
        batch = next(self.batches, None)
        if batch is None:
            self.pending = None
        elif self.stream is None:
            self.pending = self.prepare(batch)
        else:
            with torch.cuda.stream(self.stream):
                self.pending = self.prepare(batch)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.pending is None:
            raise StopIteration
        ready = self.pending
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in ready:  # allocated on the side stream, used on the step's stream (host tensors: not)
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(current)
        self._queue()
        return ready
