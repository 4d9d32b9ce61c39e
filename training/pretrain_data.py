"""Unlabelled images and the InsLoc pretraining datasets (insloc-method.md, section 1.1).

* :class:`UnlabelledImages` -- a folder of images (ImageNet layout or any tree; class folders are
  ignored) or the official text list of relative paths (``docs/DATA.md``). Unreadable files are
  skipped, counted and reported once per epoch, never fatal.
* :class:`InsLocPretrainDataset` -- the official sample (``ImageNetDataset.prepare_train_img``,
  ``mmdet/datasets/imagenet.py`` L66-91 at limbo0000/InstanceLoc @ a419bb6): foreground = image
  ``idx``, two backgrounds drawn uniformly with replacement from the whole set, composed with the
  reference pipeline :func:`insloc_hub.training.compose.compose_pair`.
* :class:`InsLocDecodeDataset` -- the same draws, but it only decodes: foreground + two backgrounds
  as uint8 tensors plus the sample's :class:`~insloc_hub.training.compose.CompositionParams`, for
  :func:`insloc_hub.training.compose.compose_batch` on the device. Use :func:`collate_decoded`.

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

import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from insloc_hub.errors import DatasetError, InvalidImageError
from insloc_hub.transforms import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image

from .compose import CompositionConfig, compose_pair, sample_composition_params

__all__ = [
    "IMAGE_EXTENSIONS",
    "UnlabelledImages",
    "UnreadableReport",
    "InsLocPretrainDataset",
    "InsLocDecodeDataset",
    "collate_decoded",
    "sample_rng",
    "worker_init_fn",
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
                f"list are relative to {str(base)!r}: pass root= the folder they are relative to"
            )
        return paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB (EXIF orientation applied, ``max_pixels`` enforced).

        Raises :class:`InvalidImageError` if it cannot be read (missing, corrupt, too large).
        """
        return decode_image(self.paths[index], max_pixels=self.max_pixels)

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


def worker_init_fn(worker_id: int) -> None:
    """Seed python ``random`` and numpy's global RNG from torch's per-worker seed.

    Like the official ``worker_init_fn`` (``mmdet/datasets/builder.py`` L88-93); the datasets here
    reseed per sample anyway, this only covers code that draws outside ``__getitem__``.
    """
    info = get_worker_info()
    base = info.seed if info is not None else torch.initial_seed()
    random.seed(base)
    np.random.seed(base % 2**32)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
class _InsLocSampleBase(Dataset):
    """Shared logic: epoch, per-sample RNG, foreground/background draws with replacement of bad files."""

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


class InsLocPretrainDataset(_InsLocSampleBase):
    """The official InsLoc pretraining sample, composed on the CPU with the reference pipeline.

    ``dataset[idx]`` (or ``dataset[(epoch, idx)]``) returns ``dict(q_img, q_box, k_img, k_box, index)``:
    normalised float images ``[3, S, S]``, float32 boxes ``[4]`` (x1, y1, x2, y2; x2/y2 exclusive) and
    the index. A corrupt foreground or background is replaced by another random image (counted in
    ``images``' report).
    """

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        fg, bg_q, bg_k = self._draw(index, rng, self.images.load, self.images.load)
        q_img, q_box, k_img, k_box = compose_pair(fg, bg_q, bg_k, self.cfg, rng)
        return {"q_img": q_img, "q_box": q_box, "k_img": k_img, "k_box": k_box, "index": index}


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class InsLocDecodeDataset(_InsLocSampleBase):
    """Decode-only twin of :class:`InsLocPretrainDataset` for composing on the device.

    ``dataset[idx]`` returns ``dict(fg, bg_q, bg_k, params, index)``:

    * ``fg`` -- the foreground, uint8 ``[3, h, w]``, downscaled (bilinear, aspect kept) so that its
      long side is at most ``max_side`` (bounds the memory of a batch of variable-size images);
    * ``bg_q``, ``bg_k`` -- the backgrounds stretched to the canvas exactly as the reference does
      (PIL bilinear), uint8 ``[3, S, S]``;
    * ``params`` -- the sample's :class:`CompositionParams`, drawn for ``fg``'s size.

    Batch with :func:`collate_decoded` and compose with ``compose_batch(fg, bg_q, bg_k, cfg,
    params=params, device=...)``. Draws are the same as :class:`InsLocPretrainDataset`'s for the same
    ``(seed, epoch, idx)``, so for foregrounds not larger than ``max_side`` the boxes are identical
    to the CPU path. For larger ones the crops are taken from the downscaled image (one extra
    resampling; no visible loss while ``max_side`` stays above about 1.6 x the largest paste side).
    """

    def __init__(
        self,
        images: UnlabelledImages,
        cfg: CompositionConfig | None = None,
        seed: int = 0,
        *,
        max_side: int = 512,
    ) -> None:
        super().__init__(images, cfg, seed)
        if max_side < 1:
            raise ValueError("max_side must be positive")
        self.max_side = int(max_side)

    def _load_foreground(self, index: int) -> Image.Image:
        img = self.images.load(index)
        width, height = img.size
        if max(width, height) > self.max_side:
            f = self.max_side / max(width, height)
            size = (max(1, int(width * f + 0.5)), max(1, int(height * f + 0.5)))
            img = img.resize(size, Image.Resampling.BILINEAR)
        return img

    def _load_background(self, index: int) -> Image.Image:
        # copy_and_paste.py L107-110: stretched to canvas x canvas (here on the CPU, as the reference).
        size = (self.cfg.canvas, self.cfg.canvas)
        img = self.images.load(index)
        return img if img.size == size else img.resize(size, Image.Resampling.BILINEAR)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        fg, bg_q, bg_k = self._draw(index, rng, self._load_foreground, self._load_background)
        params = sample_composition_params(fg.size, self.cfg, rng)
        return {
            "fg": _pil_to_uint8(fg),
            "bg_q": _pil_to_uint8(bg_q),
            "bg_k": _pil_to_uint8(bg_k),
            "params": params,
            "index": index,
        }


def collate_decoded(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`InsLocDecodeDataset` samples: ``fg`` and ``params`` stay lists, backgrounds stack."""
    return {
        "fg": [b["fg"] for b in batch],
        "bg_q": torch.stack([b["bg_q"] for b in batch]),
        "bg_k": torch.stack([b["bg_k"] for b in batch]),
        "params": [b["params"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }
