"""Copy-paste composition: the reference pipeline follows the official recipe, the batched one follows it."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from PIL import Image, ImageFilter

from insloc_hub.errors import ConfigError
from insloc_hub.training.pretraining.compose import (
    CompositionConfig,
    CompositionParams,
    apply_color_ops,
    compose_batch,
    compose_pair,
    compose_pair_with_params,
    foreground_reduction,
    gaussian_blur_batch,
    make_composition_grid,
    mmcv_rescale_size,
    random_resized_crop_params,
    render_view_pil,
    sample_composition_params,
    stretch_to_canvas,
)

CFG = CompositionConfig()
STD = torch.tensor(CFG.std).view(3, 1, 1)
MEAN = torch.tensor(CFG.mean).view(3, 1, 1)


def _without_color(params: CompositionParams) -> CompositionParams:
    """Same geometry and flips, no jitter, grayscale or blur (to compare pixels)."""
    plain = [dataclasses.replace(v, jitter=False, grayscale=False, blur=False) for v in (params.query, params.key)]
    return CompositionParams(*plain, params.foreground_size)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    gradient = np.zeros((97, 301, 3), dtype=np.uint8)  # a very wide image: exercises the crop fallback
    gradient[..., 0] = np.linspace(0, 255, 301, dtype=np.uint8)[None, :]
    gradient[..., 1] = np.linspace(0, 255, 97, dtype=np.uint8)[:, None]
    gradient[..., 2] = 128
    arrays = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), gradient]
    return [Image.fromarray(a) for a in arrays]


def _u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def _grey_levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised image -> 0-255 float (for comparisons in grey levels)."""
    return (x * STD.to(x) + MEAN.to(x)) * 255.0


# -- config --------------------------------------------------------------------------------------
def test_defaults_are_the_official_numbers() -> None:
    c = CompositionConfig()
    assert c.canvas == 256 and c.bound_range == (128, 255)
    assert c.crop_scale == (0.2, 1.0) and c.crop_ratio == (0.5, 2.0) and c.crop_attempts == 10
    assert (c.jitter_brightness, c.jitter_contrast, c.jitter_saturation, c.jitter_hue) == (0.4, 0.4, 0.4, 0.1)
    assert (c.jitter_p, c.grayscale_p, c.blur_p, c.flip_p) == (0.8, 0.2, 0.5, 0.5)
    assert c.blur_sigma == (0.1, 2.0)
    # mmdet's 0-255 normalisation is the same map as ours in 0-1 units.
    assert np.allclose(np.array(c.mean) * 255, [123.675, 116.28, 103.53])
    assert np.allclose(np.array(c.std) * 255, [58.395, 57.12, 57.375])
    assert c.brightness_range == (0.6, 1.4) and c.hue_range == (-0.1, 0.1)


def test_tiny_preset_and_json_roundtrip() -> None:
    tiny = CompositionConfig.for_canvas(64)
    assert tiny.canvas == 64 and tiny.bound_range == (32, 63)
    assert CompositionConfig.for_canvas(256) == CompositionConfig()
    back = CompositionConfig.from_dict(json.loads(json.dumps(tiny.to_dict())))
    assert back == tiny
    with pytest.raises(ConfigError):
        CompositionConfig(canvas=64)  # bounds (128, 255) do not fit a 64 canvas
    with pytest.raises(ConfigError):
        CompositionConfig(jitter_p=1.5)
    with pytest.raises(ConfigError):
        CompositionConfig.from_dict({"canvas": 256, "typo": 1})


# -- parameter sampling --------------------------------------------------------------------------
def test_mmcv_rescale_rule() -> None:
    # factor = min(max(b)/long, min(b)/short); new = int(x * f + 0.5)
    assert mmcv_rescale_size(500, 375, 200, 150) == (200, 150)
    assert mmcv_rescale_size(100, 100, 254, 128) == (128, 128)  # short bound wins
    assert mmcv_rescale_size(300, 100, 200, 250) == (250, 83)  # long bound wins: f = 250/300
    assert mmcv_rescale_size(100, 300, 200, 250) == (83, 250)
    assert mmcv_rescale_size(3, 1, 128, 128) == (128, 43)


def test_crop_area_and_aspect_within_bounds() -> None:
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (512, 512), (451, 300), (97, 301)]:
        for _ in range(300):
            top, left, h, w = random_resized_crop_params(width, height, (0.2, 1.0), (0.5, 2.0), rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
            area = w * h / (width * height)
            assert 0.2 - 0.02 <= area <= 1.0
            # int(round()) of each side moves the ratio slightly; fallback crops also stay in range
            assert 0.5 * 0.95 <= w / h <= 2.0 * 1.05


def test_crop_fallback_is_centred_and_clamps_ratio() -> None:
    rng = np.random.default_rng(0)
    assert random_resized_crop_params(1000, 50, (0.2, 1.0), (0.5, 2.0), rng, attempts=0) == (0, 450, 50, 100)
    assert random_resized_crop_params(50, 1000, (0.2, 1.0), (0.5, 2.0), rng, attempts=0) == (450, 0, 100, 50)
    assert random_resized_crop_params(300, 200, (0.2, 1.0), (0.5, 2.0), rng, attempts=0) == (0, 0, 200, 300)


def test_geometry_statistics_at_canvas_256() -> None:
    rng = np.random.default_rng(123)
    sizes = [(500, 375), (512, 512), (600, 400), (451, 300), (301, 97), (64, 48)]
    n, differ = 0, 0
    flags = {"jitter": 0, "grayscale": 0, "blur": 0, "flip": 0}
    for i in range(400):
        p = sample_composition_params(sizes[i % len(sizes)], CFG, rng)
        differ += p.query.box(256) != p.key.box(256)
        for v in (p.query, p.key):
            n += 1
            assert 128 <= v.bound_w <= 254 and 128 <= v.bound_h <= 254
            w, h = v.paste_width, v.paste_height
            assert (w, h) == mmcv_rescale_size(v.crop_width, v.crop_height, v.bound_w, v.bound_h)
            assert max(w, h) <= max(v.bound_w, v.bound_h) and min(w, h) <= min(v.bound_w, v.bound_h)
            assert min(w, h) >= 60 and max(w, h) <= 254  # "roughly 64-254 px"
            x1, y1, x2, y2 = v.paste_box
            assert x1 >= 0 and y1 >= 0 and x2 <= 255 and y2 <= 255  # randint tops are exclusive
            box = v.box(256)
            expected = (256 - x2, y1, 256 - x1, y2) if v.flip else (x1, y1, x2, y2)
            assert box == tuple(float(c) for c in expected)
            assert 0 <= box[0] < box[2] <= 256 and 0 <= box[1] < box[3] <= 256
            assert sorted(v.jitter_order) == [0, 1, 2, 3]
            assert 0.6 <= v.brightness <= 1.4 and -0.1 <= v.hue <= 0.1 and 0.1 <= v.blur_sigma <= 2.0
            for key in flags:
                flags[key] += getattr(v, key)
    assert differ / 400 > 0.95
    for key, p in {"jitter": 0.8, "grayscale": 0.2, "blur": 0.5, "flip": 0.5}.items():
        assert abs(flags[key] / n - p) < 0.07, key


def test_params_are_deterministic_given_the_generator() -> None:
    a = sample_composition_params((500, 375), CFG, np.random.default_rng(7))
    b = sample_composition_params((500, 375), CFG, np.random.default_rng(7))
    c = sample_composition_params((500, 375), CFG, np.random.default_rng(8))
    assert a == b and a != c


# -- reference pipeline --------------------------------------------------------------------------
def test_reference_is_a_hard_paste_on_the_stretched_background(photos: list[Image.Image]) -> None:
    fg, bg = photos[0], photos[1]
    params = _without_color(sample_composition_params(fg.size, CFG, np.random.default_rng(3)))
    view = dataclasses.replace(params.query, flip=False)
    out, box = render_view_pil(fg, bg, view, CFG)
    canvas = np.array(bg.resize((256, 256), Image.Resampling.BILINEAR))
    crop = fg.crop((view.crop_left, view.crop_top, view.crop_left + view.crop_width, view.crop_top + view.crop_height))
    patch = np.array(crop.resize((view.paste_width, view.paste_height), Image.Resampling.BILINEAR))
    x1, y1, x2, y2 = (int(c) for c in box)
    canvas[y1:y2, x1:x2] = patch
    assert np.array_equal(np.array(out), canvas)
    flipped, fbox = render_view_pil(fg, bg, dataclasses.replace(view, flip=True), CFG)
    assert np.array_equal(np.array(flipped), canvas[:, ::-1])
    assert fbox == (256 - box[2], box[1], 256 - box[0], box[3])


def test_compose_pair_outputs(photos: list[Image.Image]) -> None:
    q, qb, k, kb = compose_pair(photos[0], photos[1], photos[2], CFG, np.random.default_rng(0))
    assert q.shape == k.shape == (3, 256, 256) and q.dtype == torch.float32
    assert qb.shape == kb.shape == (4,) and qb.dtype == torch.float32
    assert not torch.equal(qb, kb)
    again = compose_pair(photos[0], photos[1], photos[2], CFG, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip((q, qb, k, kb), again, strict=True))
    tiny = CompositionConfig.for_canvas(64)
    q, qb, _, _ = compose_pair(photos[3], photos[0], photos[1], tiny, 1)
    assert q.shape == (3, 64, 64) and 0 <= qb[0] < qb[2] <= 64


# -- batched version held to the reference ----------------------------------------------------
def test_batched_matches_reference(photos: list[Image.Image]) -> None:
    rng = np.random.default_rng(11)
    fgs, bqs, bks, params = [], [], [], []
    for i in range(8):
        fg, bq, bk = photos[i % 4], photos[(i + 1) % 4], photos[(i + 2) % 4]
        fgs.append(fg), bqs.append(bq), bks.append(bk)
        params.append(sample_composition_params(fg.size, CFG, rng))
    for with_color in (False, True):
        ps = params if with_color else [_without_color(p) for p in params]
        fg_t, bq_t, bk_t = [_u8(f) for f in fgs], [_u8(b) for b in bqs], [_u8(b) for b in bks]
        q, qb, k, kb = compose_batch(fg_t, bq_t, bk_t, CFG, params=ps)
        assert q.shape == (8, 3, 256, 256) and qb.shape == (8, 4)
        for i in range(8):
            rq, rqb, rk, rkb = compose_pair_with_params(fgs[i], bqs[i], bks[i], ps[i], CFG)
            assert torch.equal(qb[i], rqb) and torch.equal(kb[i], rkb)  # geometry: identical
            for ours, ref in ((q[i], rq), (k[i], rk)):
                diff = (_grey_levels(ours) - _grey_levels(ref)).abs()
                if with_color:
                    # float colour ops vs PIL's uint8 ones (see compose_batch's docstring)
                    assert diff.mean() < 4.0
                else:
                    # antialiased bilinear vs PIL BILINEAR, both rounded to grey levels
                    assert diff.mean() < 0.5 and diff.max() <= 2.01


def test_color_ops_equal_torchvision_functional() -> None:
    torch.manual_seed(0)
    x = torch.rand(12, 3, 24, 20)
    params = [sample_composition_params((50, 50), CFG, np.random.default_rng(s)) for s in range(12)]
    views = [
        dataclasses.replace(p.query, jitter=True, grayscale=(i % 3 == 0), blur=False) for i, p in enumerate(params)
    ]
    views[1] = dataclasses.replace(views[1], hue=0.45)  # beyond the official 0.1: the hue wraps around
    views[5] = dataclasses.replace(views[5], hue=-0.5)
    out = apply_color_ops(x.clone(), views)
    for i, v in enumerate(views):
        ref = x[i]
        factors = (v.brightness, v.contrast, v.saturation, v.hue)
        for op in v.jitter_order:
            fn = (F2.adjust_brightness, F2.adjust_contrast, F2.adjust_saturation, F2.adjust_hue)[op]
            ref = fn(ref, factors[op])
        if v.grayscale:
            ref = F2.rgb_to_grayscale(ref, num_output_channels=3)
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)


def test_blur_matches_torchvision_inside_and_pil_overall(photos: list[Image.Image]) -> None:
    img = _u8(photos[2].resize((96, 64))).float().unsqueeze(0) / 255.0
    for sigma in (0.3, 1.0, 2.0):
        ours = gaussian_blur_batch(img.clone(), torch.tensor([sigma]))[0]
        k = 2 * math.ceil(3 * sigma) + 1
        ref = F2.gaussian_blur(img[0], [k, k], [sigma, sigma])  # reflect borders; compare the interior
        r = k // 2
        torch.testing.assert_close(ours[:, r:-r, r:-r], ref[:, r:-r, r:-r], atol=1e-5, rtol=0)
        pil = np.array(photos[2].resize((96, 64)).filter(ImageFilter.GaussianBlur(radius=sigma)))
        diff = np.abs(ours.permute(1, 2, 0).numpy() * 255 - pil)
        assert diff.mean() < 1.0  # PIL's 3-pass box approximation of the same Gaussian


def test_compose_batch_draws_params_and_takes_stacked_backgrounds(photos: list[Image.Image]) -> None:
    fgs = [_u8(p) for p in photos]
    bgs = torch.stack([_u8(p.resize((256, 256), Image.Resampling.BILINEAR)) for p in photos])
    a = compose_batch(fgs, bgs, bgs.flip(0), CFG, rng=5)
    b = compose_batch(fgs, list(bgs), list(bgs.flip(0)), CFG, rng=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    q_boxes = a[1]
    assert q_boxes.shape == (4, 4) and bool((q_boxes[:, 2] > q_boxes[:, 0]).all())
    with pytest.raises(TypeError):
        compose_batch([fgs[0].float()], bgs[:1], bgs[:1], CFG, rng=0)


def test_composition_grid_png(tmp_path, photos: list[Image.Image]) -> None:
    q, qb, k, kb = compose_batch([_u8(p) for p in photos], [_u8(p) for p in photos], [_u8(p) for p in photos], rng=0)
    jittered = qb + torch.tensor([4.0, 4.0, -4.0, -4.0])
    out = make_composition_grid(q, qb, k, kb, jittered, tmp_path / "grid" / "compose.png")
    img = np.array(Image.open(out))
    assert img.shape == (2 * 256 + 3 * 4, 4 * 256 + 5 * 4, 3)
    green = (img[..., 1] >= 220) & (img[..., 0] <= 10) & (img[..., 2] <= 10)
    red = (img[..., 0] >= 250) & (img[..., 1] <= 50) & (img[..., 2] <= 50)
    assert green.sum() > 100 and red.sum() > 100


# -- the tensor ops held to the reference's PIL ops (the CPU loader's default runs them too) ------
_ONE_OP = {
    "brightness": (lambda im, f: TF.adjust_brightness(im, f), lambda f: dict(jitter_order=(0, 1, 2, 3), brightness=f)),
    "contrast": (lambda im, f: TF.adjust_contrast(im, f), lambda f: dict(jitter_order=(1, 0, 2, 3), contrast=f)),
    "saturation": (lambda im, f: TF.adjust_saturation(im, f), lambda f: dict(jitter_order=(2, 0, 1, 3), saturation=f)),
    "hue": (lambda im, f: TF.adjust_hue(im, f), lambda f: dict(jitter_order=(3, 0, 1, 2), hue=f)),
}


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue", "grayscale", "blur"])
def test_each_color_op_matches_the_reference_pil_op(photos: list[Image.Image], op: str) -> None:
    """The pixel semantics of the tensor colour ops, against the PIL ops of render_view_pil, op by op.

    PIL truncates to uint8 after each op (about half a grey level darker on average) and quantises
    the hue to 1/255 turn and HSV to 8 bits; the blur is a sampled Gaussian instead of PIL's 3-pass
    box approximation of the same sigma.
    """
    neutral = dict(jitter=op in _ONE_OP, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
    view = dataclasses.replace(_without_color(sample_composition_params((300, 300), CFG, 0)).query, **neutral)
    strengths = {"hue": (-0.1, -0.04, 0.03, 0.1), "blur": (0.1, 0.6, 1.2, 2.0)}.get(op, (0.6, 0.9, 1.2, 1.4))
    # (mean, largest) allowed difference in grey levels
    mean_tol, max_tol = {"hue": (1.5, 16.0), "blur": (1.0, 18.0)}.get(op, (0.8, 1.5))
    for img in (p.resize((128, 128), Image.Resampling.BILINEAR) for p in photos):
        for f in strengths if op != "grayscale" else (0.0,):
            if op in _ONE_OP:
                pil_op, fields = _ONE_OP[op]
                v, ref = dataclasses.replace(view, **fields(f)), pil_op(img, f)
            elif op == "grayscale":
                v, ref = dataclasses.replace(view, grayscale=True), TF.rgb_to_grayscale(img, num_output_channels=3)
            else:
                v, ref = dataclasses.replace(view, blur=True, blur_sigma=f), img.filter(ImageFilter.GaussianBlur(f))
            ours = apply_color_ops(_u8(img)[None].float() / 255.0, [v])[0] * 255.0
            diff = (ours - _u8(ref).float()).abs()
            assert diff.mean() < mean_tol and diff.max() < max_tol, (op, f, float(diff.mean()), float(diff.max()))


def test_composer_statistics_match_the_reference(photos: list[Image.Image]) -> None:
    """The composer statistics test: the default CPU path (``compose_batch``, one sample at a time, as
    ``InsLocPretrainDataset`` runs it) against the PIL reference, over many draws of the official
    distributions. Boxes are identical; each view's pixels, and the statistics of the augmented
    images over all draws (per-channel mean, spread and distance from grey), agree."""
    rng = np.random.default_rng(21)
    stats: dict[str, list[torch.Tensor]] = {"fast": [], "reference": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; many small ops, slower threaded on a busy machine
    try:
        for i in range(32):
            _compare_one_draw(photos, i, sample_composition_params(photos[i % 4].size, CFG, rng), stats)
    finally:
        torch.set_num_threads(threads)
    fast, ref = torch.stack(stats["fast"]), torch.stack(stats["reference"])  # [views, 3 stats, 3 channels]
    gap = (fast.mean(0) - ref.mean(0)).abs()
    assert gap[0].max() < 2.0  # channel means: PIL truncates after each op, the reference ~1 level darker
    assert gap[1:].max() < 0.5  # spread and colourfulness
    assert (fast.std(0) - ref.std(0)).abs().max() < 1.0  # and their spread over the draws


def _compare_one_draw(photos: list[Image.Image], i: int, params: CompositionParams,
                      stats: dict[str, list[torch.Tensor]]) -> None:
    fg, bq, bk = photos[i % 4], photos[(i + 1) % 4], photos[(i + 2) % 4]
    ref = compose_pair_with_params(fg, bq, bk, params, CFG)
    fast = compose_batch([_u8(fg)], [_u8(bq)], [_u8(bk)], CFG, params=[params])
    assert torch.equal(fast[1][0], ref[1]) and torch.equal(fast[3][0], ref[3])
    for ours, theirs in ((fast[0][0], ref[0]), (fast[2][0], ref[2])):
        a, b = _grey_levels(ours), _grey_levels(theirs)
        assert (a - b).abs().mean() < 3.0
        for name, img in (("fast", a), ("reference", b)):
            colourful = (img - img.mean(0)).abs().mean((1, 2))  # distance from grey, per channel
            stats[name].append(torch.stack([img.mean((1, 2)), img.std((1, 2)), colourful]))


def test_reduced_foreground_keeps_boxes_and_pixels(photos: list[Image.Image]) -> None:
    """A JPEG decoded at a reduced DCT scale (``foreground_reduction``): crop windows are scaled to it."""
    fg, bg = photos[0], photos[1]  # astronaut, 512 x 512
    rng = np.random.default_rng(4)
    reduced_some = False
    for _ in range(12):
        params = _without_color(sample_composition_params(fg.size, CFG, rng))
        reduce = foreground_reduction(params)
        assert reduce > 0
        for v in (params.query, params.key):  # every paste is still a downscale of the reduced crop
            assert v.crop_width / reduce >= v.paste_width - 1e-9 and v.crop_height / reduce >= v.paste_height - 1e-9
        scale = 2 ** math.floor(math.log2(reduce)) if reduce >= 2 else 1  # what a JPEG draft could give
        small = fg.reduce(scale) if scale > 1 else fg
        reduced_some |= scale > 1
        q, qb, k, kb = compose_batch([_u8(small)], [_u8(bg)], [_u8(bg)], CFG, params=[params])
        rq, rqb, rk, rkb = compose_pair_with_params(fg, bg, bg, params, CFG)
        assert torch.equal(qb[0], rqb) and torch.equal(kb[0], rkb)
        for ours, ref, box in ((q[0], rq, qb[0]), (k[0], rk, kb[0])):
            x1, y1, x2, y2 = (int(c) for c in box)
            diff = (_grey_levels(ours) - _grey_levels(ref)).abs()
            paste = diff[:, y1:y2, x1:x2]
            # two resampling chains of the same crop (DCT reduce + bilinear vs bilinear), and the crop window
            # rounded to the reduced pixel grid (a shift of at most half an output pixel)
            assert paste.mean() < 6.0
            assert diff.sum() - paste.sum() < 1.0 * (diff.numel() - paste.numel())  # background: resize rounding
    assert reduced_some
    with pytest.raises(ValueError, match="drawn for"):  # a foreground of another shape than the parameters'
        compose_batch([_u8(fg.crop((0, 0, 512, 300)))], [_u8(bg)], [_u8(bg)], CFG, params=[params])


def test_stretch_to_canvas_matches_pil(photos: list[Image.Image]) -> None:
    out = stretch_to_canvas([_u8(p) for p in photos], 64)
    assert out.shape == (4, 3, 64, 64) and out.dtype == torch.uint8
    for i, p in enumerate(photos):
        ref = _u8(p.resize((64, 64), Image.Resampling.BILINEAR)).float()
        assert (out[i].float() - ref).abs().mean() < 1.0


def test_backgrounds_are_resized_per_size_group_as_if_alone(photos: list[Image.Image]) -> None:
    images = [_u8(p) for p in photos] * 2 + [_u8(photos[0].convert("L").convert("RGB"))[:1]]  # sizes repeat
    out = stretch_to_canvas(images, 48)
    for i, img in enumerate(images):
        assert torch.equal(out[i], stretch_to_canvas([img], 48)[0])
        alone = F.interpolate(img.expand(3, -1, -1)[None].float(), size=(48, 48), mode="bilinear",
                              align_corners=False, antialias=True)[0]  # the float kernel of other devices
        assert (out[i].float() - alone).abs().max() <= 1.0
