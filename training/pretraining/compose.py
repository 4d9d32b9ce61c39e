"""Copy-paste composition: the pretext-task images of InsLoc (insloc-method.md, section 1).

One training sample is built from one *foreground* image and two *background* images. Two
independent crops of the foreground are rescaled and pasted (hard rectangular overwrite) onto the
two backgrounds, each at a random location; the box of each paste is the target the network must
localise. Each composite then gets the MoCo v2 colour augmentation and a horizontal flip that moves
its box.

This module holds two implementations of the same specification:

* :func:`compose_pair` -- the **reference**, per sample, written with PIL like the official code
  (limbo0000/InstanceLoc @ a419bb6: ``mmdet/datasets/pipelines/copy_and_paste.py``,
  ``pixel_aug_pil.py``, ``transforms.py`` ``RandomFlip``, config ``configs/FPN/insloc_fpn_200ep.py``).
  It is the readable specification (``InsLocPretrainDataset(pipeline="reference")``).
* :func:`compose_batch` -- the **tensor** version, from decoded uint8 tensors: batched on the GPU,
  and one sample at a time in CPU DataLoader workers (the default CPU pipeline, about twice as fast
  per core as the official-style PIL pipeline; ``docs/benchmarks.md``).

Every random number of a sample comes from one function, :func:`sample_composition_params`, used by
both versions; so for the same :class:`CompositionParams` the two produce the **same boxes** and
**close pixels** (see :func:`compose_batch` for the documented differences and tolerances).

RNG. The official code draws from three global RNGs (python ``random`` for the crop and the blur
sigma, ``np.random`` for target size, location, flip and backgrounds, torch for the colour jitter).
Here all draws come from one explicit ``numpy.random.Generator``; each draw has the same distribution
as its official counterpart (noted next to each draw), only the streams differ. An explicit generator
is what makes a sample reproducible from ``(seed, epoch, index)`` alone (see ``pretrain_data.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.utils import draw_bounding_boxes, make_grid

from insloc_hub.configs import JsonConfig
from insloc_hub.errors import ConfigError
from insloc_hub.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CompositionConfig",
    "ViewParams",
    "CompositionParams",
    "random_resized_crop_params",
    "mmcv_rescale_size",
    "sample_composition_params",
    "compose_pair",
    "compose_pair_with_params",
    "render_view_pil",
    "stretch_background_pil",
    "foreground_reduction",
    "compose_batch",
    "stretch_to_canvas",
    "apply_color_ops",
    "gaussian_blur_batch",
    "make_composition_grid",
]

# IMAGENET_MEAN / IMAGENET_STD (insloc_hub.transforms) are the ImageNet RGB statistics in 0-1 units.
# The official config normalises 0-255 images with mean=[123.675, 116.28, 103.53],
# std=[58.395, 57.12, 57.375] (insloc_fpn_200ep.py L7-8): the same numbers times 255, so
# (x/255 - m/255) / (s/255) == (x - m) / s exactly.

# Colour-jitter operation ids, in torchvision ColorJitter's numbering (fn_idx = torch.randperm(4)).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Configuration and parameters
# --------------------------------------------------------------------------------------------------
@dataclass
class CompositionConfig(JsonConfig):
    """Every number of the copy-paste composition and per-view augmentation.

    Defaults are the official FPN recipe (``configs/FPN/insloc_fpn_200ep.py`` L5-24 and the
    defaults of ``CopyAndPaste`` / ``PixelAugPil``). A tiny preset for tests or smoke runs is a config
    change: ``CompositionConfig.for_canvas(64)`` gives canvas 64 with target bounds [32, 63).
    """

    config_kind = "composition config"

    canvas: int = 256
    """Side of the square canvas; backgrounds are stretched to canvas x canvas (``base_scale``)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Foreground crop area as a fraction of the image (``get_rescale_param`` default ``scale``)."""
    crop_ratio: tuple[float, float] = (0.5, 2.0)
    """Foreground crop aspect ratio w/h, sampled log-uniformly (config ``ratio=(0.5, 2.0)``)."""
    crop_attempts: int = 10
    """Tries before the centre-crop fallback (``get_rescale_param``, ``for _ in range(10)``)."""
    bound_range: tuple[int, int] = (128, 255)
    """Range of the random (w, h) bound of the rescaled crop, **exclusive top** (``np.random.randint``
    with ``w_range = h_range = fore_scale = (128, 255)``): each side bound lies in [128, 254]."""
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.1
    jitter_p: float = 0.8
    """``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)`` (pixel_aug_pil.py)."""
    grayscale_p: float = 0.2
    """``RandomGrayscale(p=0.2)``."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    """``RandomApply([GaussianBlur([.1, 2.])], p=0.5)``, PIL ``GaussianBlur(radius=sigma)``."""
    flip_p: float = 0.5
    """``RandomFlip(flip_ratio=0.5)``, horizontal, moves the box too."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Normalisation mean, RGB, 0-1 units."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalisation std, RGB, 0-1 units."""

    def __post_init__(self) -> None:
        # Accept lists (a config read back from JSON) and store tuples.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))

        def fail(msg: str) -> None:
            raise ConfigError(f"CompositionConfig: {msg}")

        if int(self.canvas) != self.canvas or self.canvas < 8:
            fail(f"canvas must be an integer >= 8, got {self.canvas!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            fail(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            fail(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if self.crop_attempts < 0:
            fail("crop_attempts must be >= 0")
        lo, hi = self.bound_range
        if not (1 <= lo < hi <= self.canvas):
            fail(
                f"bound_range {self.bound_range} must satisfy 1 <= lo < hi <= canvas ({self.canvas}); "
                "the top is exclusive, so the largest paste side is hi - 1 and always fits inside the canvas"
            )
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0")
        if not 0.0 <= self.jitter_hue <= 0.5:
            fail("jitter_hue must be in [0, 0.5]")
        for name in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"{name} must be a probability in [0, 1]")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            fail(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            fail("mean and std must have 3 entries and std must be positive")

    @classmethod
    def for_canvas(cls, canvas: int, **overrides: Any) -> CompositionConfig:
        """The official recipe scaled to another canvas: bounds [canvas/2, canvas-1).

        ``for_canvas(256)`` is the default config; ``for_canvas(64)`` is the tiny preset used by tests
        and smoke runs (bounds [32, 63)).
        """
        return cls(canvas=canvas, bound_range=(canvas // 2, canvas - 1), **overrides)

    # Ranges as torchvision's ColorJitter builds them from the scalar strengths.
    @property
    def brightness_range(self) -> tuple[float, float]:
        return (max(0.0, 1.0 - self.jitter_brightness), 1.0 + self.jitter_brightness)

    @property
    def contrast_range(self) -> tuple[float, float]:
        return (max(0.0, 1.0 - self.jitter_contrast), 1.0 + self.jitter_contrast)

    @property
    def saturation_range(self) -> tuple[float, float]:
        return (max(0.0, 1.0 - self.jitter_saturation), 1.0 + self.jitter_saturation)

    @property
    def hue_range(self) -> tuple[float, float]:
        return (-self.jitter_hue, self.jitter_hue)


@dataclass(frozen=True)
class ViewParams:
    """All random choices of one view (query or key). Pixel units, integer geometry."""

    crop_top: int
    crop_left: int
    crop_height: int
    crop_width: int
    bound_w: int
    bound_h: int
    paste_width: int
    paste_height: int
    paste_top: int
    paste_left: int
    jitter: bool
    jitter_order: tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur: bool
    blur_sigma: float
    flip: bool

    @property
    def paste_box(self) -> tuple[int, int, int, int]:
        """Box of the paste before the flip: [x1, y1, x2, y2], x2/y2 exclusive.

        ``bbox = [col, row, col + w_inst, row + h_inst]`` (copy_and_paste.py L193-197).
        """
        return (
            self.paste_left,
            self.paste_top,
            self.paste_left + self.paste_width,
            self.paste_top + self.paste_height,
        )

    def box(self, canvas: int) -> tuple[float, float, float, float]:
        """Final box after the optional horizontal flip (transforms.py ``RandomFlip.bbox_flip``)."""
        x1, y1, x2, y2 = self.paste_box
        if self.flip:
            x1, x2 = canvas - x2, canvas - x1
        return (float(x1), float(y1), float(x2), float(y2))


@dataclass(frozen=True)
class CompositionParams:
    """The random choices of one sample: the query view and the key view."""

    query: ViewParams
    key: ViewParams
    foreground_size: tuple[int, int] = (0, 0)
    """(width, height) of the foreground the crops were drawn for."""

# --------------------------------------------------------------------------------------------------
# Parameter sampling (shared by both implementations)
# --------------------------------------------------------------------------------------------------
def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Crop window ``(top, left, height, width)``: RandomResizedCrop geometry, no resize.

    Follows ``CopyAndPaste.get_rescale_param`` (copy_and_paste.py L37-69), itself torchvision's
    ``RandomResizedCrop.get_params``: area ~ U(scale) * image area, aspect w/h log-uniform in
    ``ratio``, sides ``int(round(sqrt(...)))``, accepted if it fits; offsets uniform **inclusive**
    (python ``random.randint``); after ``attempts`` failures a centre crop clamping the aspect ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(scale[0], scale[1]) * area  # official: random.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))  # random.uniform(*log_ratio)
        target_width = int(round(math.sqrt(target_area * aspect_ratio)))
        target_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < target_width <= width and 0 < target_height <= height:
            # official: xmin (row) = random.randint(0, H - h); ymin (col) = random.randint(0, W - w)
            top = int(rng.integers(0, height - target_height, endpoint=True))
            left = int(rng.integers(0, width - target_width, endpoint=True))
            return top, left, target_height, target_width
    # Fallback to central crop (copy_and_paste.py L57-69).
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        target_width = width
        target_height = int(round(target_width / min(ratio)))
    elif in_ratio > max(ratio):
        target_height = height
        target_width = int(round(target_height * max(ratio)))
    else:  # whole image
        target_width = width
        target_height = height
    target_width = max(1, min(target_width, width))
    target_height = max(1, min(target_height, height))
    return (height - target_height) // 2, (width - target_width) // 2, target_height, target_width


def mmcv_rescale_size(width: int, height: int, bound_w: int, bound_h: int) -> tuple[int, int]:
    """New ``(width, height)`` of ``mmcv.imrescale(img, (bound_w, bound_h))`` (mmcv 0.6.1 ``rescale_size``).

    The image becomes as large as possible with its long edge <= max(bound) and its short edge
    <= min(bound), aspect ratio kept: ``f = min(max(b)/long, min(b)/short)``, new side
    ``int(x * f + 0.5)`` (mmcv ``_scale_size``). Used at copy_and_paste.py L183-188.
    """
    long_bound, short_bound = max(bound_w, bound_h), min(bound_w, bound_h)
    factor = min(long_bound / max(width, height), short_bound / min(width, height))
    return max(1, int(width * float(factor) + 0.5)), max(1, int(height * float(factor) + 0.5))


def _sample_pixel_aug(cfg: CompositionConfig, rng: np.random.Generator) -> dict[str, Any]:
    # PixelAugPil (pixel_aug_pil.py L24-55) then RandomFlip, in the official order. The colour
    # parameters are always drawn (torchvision draws them only when RandomApply fires) so that every
    # sample uses the same number of draws; the distributions are unchanged.
    # Keyword arguments are evaluated in order, so the draws below happen top to bottom.
    return dict(
        jitter=bool(rng.random() < cfg.jitter_p),  # RandomApply: applied iff rand <= p
        jitter_order=tuple(int(i) for i in rng.permutation(4)),  # ColorJitter.get_params: torch.randperm(4)
        brightness=float(rng.uniform(*cfg.brightness_range)),
        contrast=float(rng.uniform(*cfg.contrast_range)),
        saturation=float(rng.uniform(*cfg.saturation_range)),
        hue=float(rng.uniform(*cfg.hue_range)),
        grayscale=bool(rng.random() < cfg.grayscale_p),  # RandomGrayscale: torch.rand(1) < p
        blur=bool(rng.random() < cfg.blur_p),  # RandomApply([GaussianBlur], p=0.5)
        blur_sigma=float(rng.uniform(*cfg.blur_sigma)),  # GaussianBlur: random.uniform(.1, 2.)
        flip=bool(rng.random() < cfg.flip_p),  # RandomFlip: np.random.rand() < flip_ratio
    )


def sample_composition_params(
    foreground_size: tuple[int, int],
    cfg: CompositionConfig | None = None,
    rng: np.random.Generator | int | None = None,
) -> CompositionParams:
    """Draw every random choice of one sample for a foreground of ``(width, height)``.

    Draw order follows the official code: crop 1, crop 2 (L175-176), bound 1, bound 2, location 1,
    location 2 (``CopyAndPaste.__call__``), then the query view's PixelAugPil + flip, then the key's
    (imagenet.py L85-90).
    """
    cfg = cfg or CompositionConfig()
    gen = np.random.default_rng(rng)  # a Generator is returned as it is
    width, height = int(foreground_size[0]), int(foreground_size[1])
    if width < 1 or height < 1:
        raise ValueError(f"foreground size must be positive, got {foreground_size}")
    crops = [random_resized_crop_params(width, height, cfg.crop_scale, cfg.crop_ratio, gen, cfg.crop_attempts)
             for _ in range(2)]
    # CopyAndPaste.get_scale (L154-161): w = np.random.randint(128, 255); h likewise (exclusive top).
    lo, hi = cfg.bound_range
    bounds = [(int(gen.integers(lo, hi)), int(gen.integers(lo, hi))) for _ in range(2)]
    sizes = [mmcv_rescale_size(c[3], c[2], b[0], b[1]) for c, b in zip(crops, bounds, strict=True)]
    # CopyAndPaste.get_position_param (L71-77): row ~ np.random.randint(0, 256 - rows) then
    # col ~ np.random.randint(0, 256 - cols), exclusive tops: the paste is always fully inside.
    positions = [(int(gen.integers(0, cfg.canvas - h)), int(gen.integers(0, cfg.canvas - w))) for w, h in sizes]
    augs = [_sample_pixel_aug(cfg, gen) for _ in range(2)]
    # crop (top, left, height, width), bound (w, h), paste (width, height), paste (top, left): the field order
    views = [ViewParams(*c, *b, *s, *p, **a) for c, b, s, p, a in zip(crops, bounds, sizes, positions, augs)]
    return CompositionParams(views[0], views[1], (width, height))


# --------------------------------------------------------------------------------------------------
# Reference implementation (PIL, per sample) -- the specification
# --------------------------------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def stretch_background_pil(img: Image.Image, canvas: int) -> Image.Image:
    """A new RGB image stretched to ``canvas`` squared, aspect ignored: the reference's background
    (copy_and_paste.py L107-110: ``mmcv.imresize(img, (256, 256))``)."""
    img = _to_rgb(img)
    if img.size == (canvas, canvas):
        return img.copy()
    return img.resize((canvas, canvas), Image.Resampling.BILINEAR)


_PIL_COLOR_OPS = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation,
                  HUE: TF.adjust_hue}


def render_view_pil(
    foreground: Image.Image, background: Image.Image, view: ViewParams, cfg: CompositionConfig
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Reference composition of one view, before ``ToTensor``/normalisation.

    ``background`` is stretched to the canvas if it is not already canvas-sized. Returns the RGB
    PIL canvas after paste, colour augmentation and flip, and the final box.
    """
    canvas = stretch_background_pil(background, cfg.canvas)
    fg = _to_rgb(foreground)
    # get_crop (L163-170): mmcv.imcrop of rows [top, top+h), cols [left, left+w).
    crop = fg.crop((view.crop_left, view.crop_top, view.crop_left + view.crop_width, view.crop_top + view.crop_height))
    # mmcv.imrescale(crop, (w, h)) (L183-188): aspect-preserving resize to the precomputed size.
    size = (view.paste_width, view.paste_height)
    if crop.size != size:
        crop = crop.resize(size, Image.Resampling.BILINEAR)
    # Hard rectangular paste (L198-199, L208-209): no mask, no blending.
    canvas.paste(crop, (view.paste_left, view.paste_top))
    # PixelAugPil: RandomApply(ColorJitter) -> RandomGrayscale -> RandomApply(GaussianBlur), with
    # torchvision's functional ops on PIL exactly as ColorJitter.forward calls them.
    if view.jitter:
        factors = (view.brightness, view.contrast, view.saturation, view.hue)
        for op in view.jitter_order:
            canvas = _PIL_COLOR_OPS[op](canvas, factors[op])
    if view.grayscale:
        canvas = TF.rgb_to_grayscale(canvas, num_output_channels=3)
    if view.blur:
        # MoCo v2's GaussianBlur (pixel_aug_pil.py L12-20): PIL's box-filter approximation.
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=view.blur_sigma))
    # RandomFlip(flip_ratio=0.5): image and box (transforms.py RandomFlip.bbox_flip).
    if view.flip:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return canvas, view.box(cfg.canvas)


def compose_pair_with_params(
    foreground: Image.Image,
    background_q: Image.Image,
    background_k: Image.Image,
    params: CompositionParams,
    cfg: CompositionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference composition with given parameters: ``(q_img, q_box, k_img, k_box)``.

    Images are normalised float tensors ``[3, canvas, canvas]``; boxes float32 tensors ``[4]``
    ``[x1, y1, x2, y2]`` in canvas pixels, x2/y2 exclusive.
    """
    cfg = cfg or CompositionConfig()
    q_img, q_box = render_view_pil(foreground, background_q, params.query, cfg)
    k_img, k_box = render_view_pil(foreground, background_k, params.key, cfg)
    return (
        TF.normalize(TF.to_tensor(q_img), cfg.mean, cfg.std, inplace=True),
        torch.tensor(q_box, dtype=torch.float32),
        TF.normalize(TF.to_tensor(k_img), cfg.mean, cfg.std, inplace=True),
        torch.tensor(k_box, dtype=torch.float32),
    )


def compose_pair(
    foreground: Image.Image,
    background_q: Image.Image,
    background_k: Image.Image,
    cfg: CompositionConfig | None = None,
    rng: np.random.Generator | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official InsLoc sample, per sample with PIL: ``(q_img, q_box, k_img, k_box)``.

    ``foreground`` is cropped twice (independently) and pasted onto ``background_q`` (query view)
    and ``background_k`` (key view), which are first stretched to ``cfg.canvas`` squared. ``rng`` is a
    ``numpy.random.Generator`` (or a seed); every draw goes through :func:`sample_composition_params`.
    """
    cfg = cfg or CompositionConfig()
    params = sample_composition_params(foreground.size, cfg, rng)
    return compose_pair_with_params(foreground, background_q, background_k, params, cfg)


# --------------------------------------------------------------------------------------------------
# Tensor implementation: batched on the device, or one sample in a CPU data loader worker
# --------------------------------------------------------------------------------------------------
def foreground_reduction(params: CompositionParams) -> float:
    """How much the foreground may be shrunk before cropping with both pastes still downscales.

    ``min(crop side / paste side)`` over the two views and both axes. A JPEG decoded at a reduced
    scale (PIL ``draft``) no smaller than ``foreground_size / foreground_reduction(params)`` gives
    the same boxes and a paste resampled from at least as many source pixels as it has.
    """
    return min(
        min(v.crop_width / v.paste_width, v.crop_height / v.paste_height) for v in (params.query, params.key)
    )


def _host_constant(values: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # torch.tensor(..., device=cuda) copies synchronously (the host waits for the stream); built on the
    # host and sent with non_blocking=True, a small constant costs no synchronisation. A tuple is a
    # constant, built once (never modified in place).
    made = _cpu_constant(values, dtype) if isinstance(values, tuple) else torch.tensor(values, dtype=dtype)
    return made.to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _cpu_constant(values: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


class _Workspace(threading.local):
    """Temporaries of the colour operations, kept between calls on the CPU (one set per thread).

    On the CPU a fresh image-sized tensor costs page faults that take longer than the arithmetic done
    in it; elsewhere (CUDA has a caching allocator) a new tensor is returned each time. Views of the
    buffers are kept too: a sample makes a few hundred tensor calls, and each costs microseconds.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[tuple[Any, ...], Any] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        view = self.views.get((name, shape, like.dtype))
        if view is None:
            numel = math.prod(shape)
            buf = self.buffers.get(name)
            if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
                buf = self.buffers[name] = torch.empty(numel, dtype=like.dtype)
                self.views.clear()  # some may be views of the buffer just replaced
            view = self.views[(name, shape, like.dtype)] = buf[:numel].view(shape)
        return view


_WORK = _Workspace()
_LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's tensor rgb_to_grayscale


def _row_factor(values: Sequence[float], x: torch.Tensor) -> float | torch.Tensor:
    """Per-row factors for ``x``: a number for one row, else a tensor broadcasting over each row."""
    if len(values) == 1:
        return float(values[0])
    return _host_constant(values, x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]`` luma with torchvision's tensor weights (a workspace buffer)."""
    r, g, b = x.unbind(dim=-3)
    out = _WORK.get("luma", (x.shape[0], 1, *x.shape[-2:]), x)
    torch.mul(r, _LUMA_WEIGHTS[0], out=out[:, 0]).add_(g, alpha=_LUMA_WEIGHTS[1]).add_(b, alpha=_LUMA_WEIGHTS[2])
    return out


# The colour operations work in place on float images in [0, peak] (peak 1, or 255 for grey levels: every
# operation is scale invariant), with one factor per row (host numbers). Each equals torchvision's tensor
# functional (torchvision.transforms.v2.functional.adjust_* / rgb_to_grayscale) with the same factor, up
# to float rounding: torchvision blends ``ratio * img + (1 - ratio) * other`` clamped to [0, 1]. With
# every ratio in [0, 1] the blend stays between two values of the range, and the clamp is skipped.
def _clamp_(x: torch.Tensor, values: Sequence[float], peak: float) -> torch.Tensor:
    return x.clamp_(0.0, peak) if max(values) > 1.0 else x


def _brightness_(x: torch.Tensor, values: Sequence[float], peak: float) -> torch.Tensor:
    return _clamp_(x.mul_(_row_factor(values, x)), values, peak)


def _contrast_(x: torch.Tensor, values: Sequence[float], peak: float) -> torch.Tensor:
    # blend with the mean of the luma, i.e. the luma of the channel means
    mean = torch.mv(x.mean(dim=(-2, -1)), _host_constant(_LUMA_WEIGHTS, x.device, x.dtype)).view(-1, 1, 1, 1)
    ratio = _row_factor(values, x)
    return _clamp_(x.mul_(ratio).add_(mean * (1.0 - ratio)), values, peak)


def _saturation_(x: torch.Tensor, values: Sequence[float], peak: float) -> torch.Tensor:
    return _clamp_(x.lerp_(_luma(x).expand_as(x), 1.0 - _row_factor(values, x)), values, peak)


def _hue_(x: torch.Tensor, values: Sequence[float], peak: float) -> torch.Tensor:
    # torchvision's RGB -> HSV -> shift -> RGB round trip in closed form. A hue rotation keeps each
    # pixel's largest and smallest channel (high, low; spread = high - low); with h the new hue in sixths
    # of a turn, the channel whose primary hue is c (r 0, g 2, b 4) becomes
    # low + spread * clamp(||h - c| - 3| - 1, 0, 1): the triangle-wave form of HSV -> RGB, where
    # 3 - ||d| - 3| is the distance on the hue circle while |d| <= 6. Computed from spread * h, without a
    # division, as clamp(||spread (h - c)| - 3 spread| + low - spread, low, high). Branches are blended
    # arithmetically: torch.where and remainder are several times slower on the CPU than these passes.
    n, _, height, width = x.shape
    r, g, b = x.split(1, dim=1)  # [N, 1, H, W] like the planes below, which broadcast over the channels
    high, low, spread, hue, mask, tmp = _WORK.get("hue", (6, n, 1, height, width), x).unbind(0)
    torch.maximum(g, b, out=high)
    torch.ge(g, b, out=mask)  # green or red largest
    torch.maximum(high, r, out=high)
    torch.minimum(g, b, out=low)
    torch.minimum(low, r, out=low)
    torch.sub(high, low, out=spread)
    # spread * hue before the shift, hue in [-1, 5): r - g + 4 (blue largest), b - r + 2 (green), g - b (red)
    torch.sub(r, g, out=hue).add_(spread, alpha=4.0)
    hue.lerp_(torch.sub(b, r, out=tmp).add_(spread, alpha=2.0), mask)
    hue.lerp_(torch.sub(g, b, out=tmp), torch.eq(r, high, out=mask))  # torchvision's branch; ties give one hue
    shifts = [6.0 * v for v in values]
    if max(abs(s) for s in shifts) > 1.0:  # else |h - c| < 6 below: no wrap needed
        hue.div_(torch.clamp(spread, min=1e-12, out=tmp)).add_(_row_factor(shifts, hue))  # grey: any hue
        hue.sub_(torch.mul(hue, 1.0 / 6.0, out=tmp).floor_(), alpha=6.0).mul_(spread)  # mod 6
        shifts = [0.0] * n
    shift_minus_c = _row_factor(shifts, x) - _host_constant((0.0, 2.0, 4.0), x.device, x.dtype).view(1, 3, 1, 1)
    torch.addcmul(hue, spread, shift_minus_c, out=x).abs_()  # r, g, b are no longer needed
    x.sub_(spread, alpha=3.0).abs_().add_(torch.sub(low, spread, out=tmp))
    return x.clamp_(low, high)


def _grayscale_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(_luma(x).expand_as(x))


_COLOR_OPS = {BRIGHTNESS: (_brightness_, "brightness"), CONTRAST: (_contrast_, "contrast"),
              SATURATION: (_saturation_, "saturation"), HUE: (_hue_, "hue")}  # the op and its ViewParams field


def _gaussian_weights(sigma: float, radius: int) -> list[float]:
    """The normalised sampled Gaussian of ``sigma`` at taps ``-radius .. radius``."""
    taps = [math.exp(-(i * i) / (2.0 * sigma * sigma)) for i in range(-radius, radius + 1)]
    total = math.fsum(taps)
    return [t / total for t in taps]


def _padded(img: torch.Tensor, axis: int, radius: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Views of a workspace buffer of ``img``'s shape padded by ``radius`` pixels on both sides of ``axis``:
    the ``2 radius + 1`` shifted windows (the middle one is the interior) and the two borders."""
    key = ("padded", axis, radius, tuple(img.shape))
    views = _WORK.views.get(key)
    if views is None:
        size, shape = img.shape[axis], list(img.shape)
        shape[axis] += 2 * radius
        buf = _WORK.get(f"blur{axis}", tuple(shape), img)
        windows = [buf.narrow(axis, i, size) for i in range(2 * radius + 1)]
        views = _WORK.views[key] = (windows, buf.narrow(axis, 0, radius), buf.narrow(axis, radius + size, radius))
    return views


def _blur_axis(padded: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor], axis: int,
               weights: Sequence[float], out: torch.Tensor) -> None:
    """``out`` = the interior of ``padded`` (see :func:`_padded`), border pixels replicated, convolved
    with ``weights`` along ``axis``."""
    windows, left, right = padded
    middle = windows[len(windows) // 2]
    left.copy_(middle.narrow(axis, 0, 1).expand_as(left))
    right.copy_(middle.narrow(axis, middle.shape[axis] - 1, 1).expand_as(right))
    torch.mul(windows[0], weights[0], out=out)
    for window, weight in zip(windows[1:], weights[1:], strict=True):
        out.add_(window, alpha=weight)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with a per-sample ``sigma`` (replicate borders), in place.

    The kernel is a sampled Gaussian of radius ``ceil(3 * sigma)`` (13 taps for sigma 2). PIL's
    ``GaussianBlur(radius=sigma)`` used by the reference is three passes of an extended box filter
    with the same variance, and replicates edge pixels too: the two agree to about one grey level.
    ``x`` is overwritten with the result and returned. On the CPU each image's taps are summed over
    shifted slices, its own kernel size (a grouped convolution is several times slower there); on
    other devices one grouped convolution per axis does the batch, the kernel size of its largest
    sigma. ``sigma`` is read on the host (as apply_color_ops passes it: no device wait).
    """
    n, c, h, w = x.shape
    sigmas = sigma.tolist()
    if x.device.type == "cpu" or n == 0:
        for img, s in zip(x, sigmas, strict=True):
            radius = math.ceil(3.0 * s)
            weights = _gaussian_weights(s, radius)
            rows, cols = _padded(img, 2, radius), _padded(img, 1, radius)
            rows[0][radius].copy_(img)
            _blur_axis(rows, 2, weights, out=cols[0][radius])  # horizontally, into the vertical pass's input
            _blur_axis(cols, 1, weights, out=img)
        return x
    radius = math.ceil(3.0 * max(sigmas))
    k, groups = 2 * radius + 1, n * c
    kernel = _host_constant([_gaussian_weights(s, radius) for s in sigmas], x.device, x.dtype).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, groups, h, w), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, kernel.view(groups, 1, 1, k), groups=groups)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(groups, 1, k, 1), groups=groups)
    return x.copy_(y.view(n, c, h, w))


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.long).to(device, non_blocking=True)


def _on_rows(x: torch.Tensor, rows: list[int], op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``x[rows] = op(x[rows])`` for an in-place ``op``: on a view of ``x`` when the rows are consecutive
    (always so for one sample's two views), else gathered and scattered."""
    if not rows:
        return
    if rows[-1] - rows[0] + 1 == len(rows):
        op(x[rows[0] : rows[-1] + 1])
        return
    idx = _index(rows, x.device)
    x[idx] = op(x[idx])


def apply_color_ops(x: torch.Tensor, views: Sequence[ViewParams], peak: float = 1.0) -> torch.Tensor:
    """PixelAugPil on a batch: per-sample ColorJitter (random order) -> grayscale -> blur.

    ``x`` is ``[N, 3, H, W]`` float in [0, ``peak``] (modified in place and returned; ``peak=255.0`` for
    grey levels); ``views[i]`` holds the parameters of row ``i``. Each jitter op equals torchvision's
    tensor functional (``torchvision.transforms.v2.functional.adjust_*``) called with the same factor up
    to float rounding, applied in the sample's ``jitter_order``. Row selections and factors are taken on
    the host from the parameters, so no device synchronisation is needed.
    """
    if x.shape[0] != len(views):
        raise ValueError(f"{x.shape[0]} images but {len(views)} parameter sets")
    jittered = [i for i, v in enumerate(views) if v.jitter]
    for position in range(4):
        by_op: dict[int, list[int]] = {}
        for i in jittered:
            by_op.setdefault(views[i].jitter_order[position], []).append(i)
        for op, rows in by_op.items():
            fn, field = _COLOR_OPS[op]
            values = [getattr(views[i], field) for i in rows]
            _on_rows(x, rows, lambda part, fn=fn, values=values: fn(part, values, peak))
    _on_rows(x, [i for i, v in enumerate(views) if v.grayscale], _grayscale_)
    blurred = [i for i, v in enumerate(views) if v.blur]
    sigmas = torch.tensor([views[i].blur_sigma for i in blurred], dtype=torch.float32)
    _on_rows(x, blurred, lambda part: gaussian_blur_batch(part, sigmas))
    return x


def _planar_float(canvas: torch.Tensor, flips: Sequence[bool]) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` (any memory layout) -> contiguous float32 grey levels, rows with ``flips[i]``
    mirrored left-right."""
    if canvas.device.type == "cpu":  # numpy transposes (and mirrors, by a negative stride) about 2x faster
        planar = torch.empty(canvas.shape, dtype=torch.uint8)
        src, dst = canvas.permute(0, 2, 3, 1).numpy(), planar.numpy()
        for i, flip in enumerate(flips):
            np.copyto(dst[i], (src[i, :, ::-1] if flip else src[i]).transpose(2, 0, 1))
        return planar.float()
    _on_rows(canvas, [i for i, flip in enumerate(flips) if flip], lambda part: part.copy_(part.flip(-1)))
    return torch.empty(canvas.shape, device=canvas.device).copy_(canvas)


def _check_uint8_image(img: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
        raise TypeError(f"{what} must be a uint8 tensor [C, H, W], got {getattr(img, 'dtype', type(img))}")
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"{what} must have shape [3, H, W] (or [1, H, W]), got {tuple(img.shape)}")
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, h, w]``, bilinear with antialias (PIL's BILINEAR filter).

    Rounded to grey levels like PIL's result. On the CPU torch's vectorised uint8 channels-last
    kernel (several times faster than PIL), returning channels-last; on other devices in float, then rounded.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.device.type == "cpu":
        # Channels-last strides, the batch stride included (an unsqueezed [C, H, W] view lacks it): torch
        # checks them all, and for any other layout resizes a transposed copy and transposes the result.
        x = x.permute(0, 2, 3, 1).contiguous()
        x = (x[0].unsqueeze(0) if len(x) == 1 else x).permute(0, 3, 1, 2)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8)


def _stretch_into(out: torch.Tensor, images: Sequence[torch.Tensor], canvas: int) -> None:
    """``out[i]`` = ``images[i]`` stretched to ``canvas`` squared (uint8).

    One resize per distinct input size (a batch of photographs shares a few common sizes), so the
    number of device kernels grows with the number of sizes rather than of images; each image's
    result is the same as resizing it alone.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for rows in groups.values():
        if out.device.type == "cpu":  # stacked channels-last, the layout of the fast uint8 resize
            x = torch.stack([images[i].permute(1, 2, 0) for i in rows]).permute(0, 3, 1, 2) if len(rows) > 1 else (
                images[rows[0]].unsqueeze(0))
            x = x.to(out.device)
        else:
            x = torch.stack([images[i] for i in rows]).to(out.device, non_blocking=True)
        x = _resize(x, (canvas, canvas))
        if len(rows) == out.shape[0]:
            out.copy_(x)
        else:
            out.index_copy_(0, _index(rows, out.device), x)


def _fill_backgrounds(
    backgrounds: torch.Tensor | Sequence[torch.Tensor], out: torch.Tensor, canvas: int, batch: int
) -> None:
    if len(backgrounds) != batch:
        raise ValueError(f"{batch} foregrounds but {len(backgrounds)} backgrounds")
    if isinstance(backgrounds, torch.Tensor) and backgrounds.dim() == 4:
        if backgrounds.dtype != torch.uint8 or tuple(backgrounds.shape[1:]) != (3, canvas, canvas):
            raise ValueError(
                f"a background tensor must be uint8 [B, 3, {canvas}, {canvas}], got "
                f"{backgrounds.dtype} {tuple(backgrounds.shape)}"
            )
        out.copy_(backgrounds.to(out.device, non_blocking=True))
        return
    # mmcv.imresize(img, (256, 256)): a plain stretch (copy_and_paste.py L107-110).
    _stretch_into(out, [_check_uint8_image(bg, "background") for bg in backgrounds], canvas)


def stretch_to_canvas(images: Sequence[torch.Tensor], canvas: int) -> torch.Tensor:
    """uint8 ``[3, H_i, W_i]`` images -> uint8 ``[B, 3, canvas, canvas]``, each stretched like a background.

    Bilinear with antialias (PIL's BILINEAR filter), rounded to grey levels like PIL's uint8 result;
    on the first image's device.
    """
    if not images:
        raise ValueError("stretch_to_canvas needs at least one image")
    out = torch.empty((len(images), 3, canvas, canvas), dtype=torch.uint8, device=images[0].device)
    _stretch_into(out, [_check_uint8_image(img, "image") for img in images], canvas)
    return out


def compose_batch(
    foregrounds: Sequence[torch.Tensor],
    backgrounds_q: torch.Tensor | Sequence[torch.Tensor],
    backgrounds_k: torch.Tensor | Sequence[torch.Tensor],
    cfg: CompositionConfig | None = None,
    *,
    params: Sequence[CompositionParams] | None = None,
    rng: np.random.Generator | int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched copy-paste composition with tensor ops: ``(q_imgs, q_boxes, k_imgs, k_boxes)``.

    Args:
        foregrounds: ``B`` decoded uint8 ``[3, H_i, W_i]`` tensors of any sizes, on any device.
        backgrounds_q, backgrounds_k: ``B`` uint8 ``[3, h, w]`` tensors of any sizes (stretched to the
            canvas here), or uint8 tensors ``[B, 3, canvas, canvas]`` already stretched.
        cfg: the composition config.
        params: one :class:`CompositionParams` per sample (e.g. drawn in the data loader workers);
            when omitted they are drawn here with ``rng`` from each foreground's size.
        rng: numpy Generator or seed used when ``params`` is omitted.
        device: where to compose (default: the first foreground's device).

    Returns:
        ``q_imgs``/``k_imgs`` normalised float32 ``[B, 3, S, S]`` and ``q_boxes``/``k_boxes`` float32
        ``[B, 4]`` on ``device``.

    A foreground smaller than the ``foreground_size`` its parameters were drawn for is taken as a
    reduced decode of it (JPEG ``draft``): its crop windows are scaled to it, rounded to its pixels.

    Agreement with the reference :func:`compose_pair_with_params` for the same parameters (each held
    by a test in ``tests/training/test_compose.py``):

    * boxes: identical (same integer geometry from the same parameters);
    * before colour ops: crops and backgrounds are resized with ``F.interpolate(bilinear,
      antialias=True)`` (uint8 on the CPU, float then rounded elsewhere), the tensor counterpart of
      PIL's BILINEAR filter, into a uint8 composite like the reference's; mean abs difference about
      0.2 grey levels, a few pixels off by a couple of levels;
    * colour ops run in float (grey levels) without the reference's uint8 truncation after each op, and
      equal torchvision's tensor functional (``adjust_brightness/contrast/saturation/hue``,
      ``rgb_to_grayscale``) for the same factors; PIL's versions differ slightly (truncation: about
      one grey level darker on average; integer luma; hue quantised to 1/255 turn, HSV to 8 bits);
    * blur is a sampled Gaussian instead of PIL's 3-pass box approximation (same sigma);
    * the flip is applied to the uint8 composite before the colour ops (they commute with it);
      flip and normalisation are otherwise exact.
    """
    cfg = cfg or CompositionConfig()
    batch = len(foregrounds)
    if batch == 0:
        raise ValueError("compose_batch needs at least one foreground")
    dev = torch.device(device) if device is not None else foregrounds[0].device
    fgs = [_check_uint8_image(f, "foreground") for f in foregrounds]
    if params is None:
        gen = np.random.default_rng(rng)  # a Generator is returned as it is
        params = [sample_composition_params((int(f.shape[-1]), int(f.shape[-2])), cfg, gen) for f in fgs]
    if len(params) != batch:
        raise ValueError(f"{batch} foregrounds but {len(params)} parameter sets")
    size = cfg.canvas
    views = [p.query for p in params] + [p.key for p in params]

    # 1. Backgrounds, stretched to the canvas: rows [0, B) are query views, [B, 2B) key views. The
    # composite is a uint8 image, like the reference's, channels-last in memory like the decoded images
    # and the resizes (so that backgrounds and pastes are copied row by row).
    canvas = torch.empty((2 * batch, 3, size, size), dtype=torch.uint8, device=dev, memory_format=torch.channels_last)
    _fill_backgrounds(backgrounds_q, canvas[:batch], size, batch)
    _fill_backgrounds(backgrounds_k, canvas[batch:], size, batch)

    # 2. Crop, aspect-preserving rescale, hard paste (per sample: the sizes differ); crop windows of a
    # reduced decode scaled to it (see above).
    for i, fg in enumerate(fgs):
        fg = fg.to(dev, non_blocking=True)
        height, width = fg.shape[1:]
        drawn_w, drawn_h = params[i].foreground_size if min(params[i].foreground_size) > 0 else (width, height)
        if width > drawn_w or height > drawn_h or abs(width * drawn_h - height * drawn_w) >= max(drawn_w, drawn_h):
            raise ValueError(f"parameters of sample {i} were drawn for a {drawn_w}x{drawn_h} foreground, "
                             f"not for one of {width}x{height} (nor a reduced decode of it)")
        sx, sy = width / drawn_w, height / drawn_h
        for row, v in ((i, params[i].query), (batch + i, params[i].key)):
            if v.crop_top + v.crop_height > drawn_h or v.crop_left + v.crop_width > drawn_w:
                raise ValueError(f"parameters of sample {i} were drawn for a larger foreground than {tuple(fg.shape)}")
            top, left = round(v.crop_top * sy), round(v.crop_left * sx)
            bottom = max(top + 1, round((v.crop_top + v.crop_height) * sy))
            right = max(left + 1, round((v.crop_left + v.crop_width) * sx))
            x1, y1, x2, y2 = v.paste_box
            canvas[row, :, y1:y2, x1:x2] = _resize(fg[:, top:bottom, left:right].unsqueeze(0), (y2 - y1, x2 - x1))[0]

    # 3. RandomFlip of image and box. The official code flips last; the colour operations commute
    # with a horizontal flip (pointwise, a global mean, a symmetric blur), so it is done here, on the
    # uint8 composite, while it becomes float planes.
    x = _planar_float(canvas, [v.flip for v in views])
    boxes = torch.tensor([v.box(size) for v in views], dtype=torch.float32).to(dev, non_blocking=True)

    # 4. PixelAugPil (colour jitter -> grayscale -> blur), per view, in float grey levels [0, 255].
    apply_color_ops(x, views, peak=255.0)

    # 5. Normalise (ImageNet mean/std, 0-1 units): x / (255 std) - mean / std (addcmul with per-channel
    # constants is three times slower on the CPU than these two passes).
    std = _host_constant(cfg.std, dev).view(1, 3, 1, 1)
    x.mul_(1.0 / (255.0 * std)).sub_(_host_constant(cfg.mean, dev).view(1, 3, 1, 1) / std)
    return x[:batch], boxes[:batch], x[batch:], boxes[batch:]


# --------------------------------------------------------------------------------------------------
# Visual check
# --------------------------------------------------------------------------------------------------
def make_composition_grid(
    q_imgs: torch.Tensor,
    q_boxes: torch.Tensor,
    k_imgs: torch.Tensor,
    k_boxes: torch.Tensor,
    jittered_boxes: torch.Tensor | None = None,
    path: str | Path | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_items: int = 8,
    padding: int = 4,
) -> Path:
    """Write a PNG grid of composites with their boxes: query row on top, key row below.

    Images are un-normalised with ``mean``/``std`` first. Ground-truth boxes are drawn in green, the
    query's jittered box (``jittered_boxes``, optional, ``[B, 4]``) in red. Returns the path written.
    """
    if path is None:
        raise ValueError("make_composition_grid: a destination path is required")
    n = min(int(q_imgs.shape[0]), max_items)
    if n == 0:
        raise ValueError("make_composition_grid: empty batch")
    green, red = (0, 230, 0), (255, 40, 40)
    last_pixel = torch.tensor([0.0, 0.0, 1.0, 1.0])  # boxes are pixel-exclusive at x2/y2; drawn up to x2 - 1

    def drawn(imgs: torch.Tensor, *box_sets: torch.Tensor) -> list[torch.Tensor]:
        x = imgs[:n].detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        x = (x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
        return [draw_bounding_boxes(x[i], torch.stack([b[i].detach().float().cpu() for b in box_sets]) - last_pixel,
                                    colors=[green, red][:len(box_sets)], width=2) for i in range(n)]

    q_sets = (q_boxes,) if jittered_boxes is None else (q_boxes, jittered_boxes)
    grid = make_grid(drawn(q_imgs, *q_sets) + drawn(k_imgs, k_boxes), nrow=n, padding=padding, pad_value=255)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out
