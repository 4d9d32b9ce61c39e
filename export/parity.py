"""Parity of an exported graph with its PyTorch model: same pixels in, figures out, pass or fail.

Inputs are real photographs (scikit-image's, when installed) at two sizes plus random pixels.
Feature outputs are compared element-wise (max absolute and relative difference); detections are
matched by IoU, never by index, because near-tied scores legitimately reorder between runtimes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from insloc_hub.errors import ExportError

#: scikit-image's sample photographs used for parity (the first ones found)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@dataclass
class Tolerance:
    """What counts as the same model.

    Attributes:
        feature_rel: max |onnx - torch| / max |torch| per output (float32 exports reach ~1e-6).
        match_rate: detections matched (IoU >= ``match_iou``) over the larger of the two counts.
        match_iou: IoU at which two boxes are the same detection.
        label_agreement: share of matched pairs with the same label.
        score_abs: largest score difference of a matched pair.
        mask_mean_abs: mean |difference| of matched mask probabilities.
    """

    feature_rel: float = 1e-3
    match_rate: float = 0.9
    match_iou: float = 0.9
    label_agreement: float = 0.95
    score_abs: float = 0.02
    mask_mean_abs: float = 0.02

    @classmethod
    def for_half(cls) -> Tolerance:
        return cls(feature_rel=3e-2, score_abs=0.05, mask_mean_abs=0.05, match_rate=0.8)


@dataclass
class ParityReport:
    """The figures of one verification; ``passed`` is false when any tolerance is exceeded."""

    task: str
    passed: bool
    images: str
    cases: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line per case, then the failures, for logs and error messages."""
        lines = [f"parity ({self.task}, {self.images}): {'passed' if self.passed else 'FAILED'}"]
        for case in self.cases:
            figures = ", ".join(f"{k}={_fmt(v)}" for k, v in case.items() if k not in ("case", "outputs"))
            lines.append(f"  {case['case']}: {figures}")
            for name, out in case.get("outputs", {}).items():
                lines.append(f"    {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in out.items()))
        lines += [f"  exceeds tolerance: {f}" for f in self.failures]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def photographs() -> tuple[list[np.ndarray], str]:
    """scikit-image's sample photographs as HWC uint8 arrays, or smooth synthetic images without it."""
    try:
        from skimage import data
    except ImportError:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:480, 0:640]
        images = []
        for _ in range(3):
            base = np.stack([(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4)) % 256] * 3, axis=-1)
            images.append((base + rng.integers(0, 40, size=(1, 1, 3))).clip(0, 255).astype(np.uint8))
        return images, "synthetic gradients (scikit-image not installed) + random pixels"
    return [np.asarray(getattr(data, name)())[..., :3] for name in PHOTOS], "scikit-image photographs + random pixels"


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def parity_inputs(task: str, *, batch: int | None, height: int | None, width: int | None,
                  seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """The (label, uint8 array) cases a graph is checked on.

    ``batch``/``height``/``width`` are the graph's fixed sizes, ``None`` where dynamic. Dynamic
    graphs see two photograph sizes (and two batch sizes) plus random pixels at a third size.
    """
    photos, _ = photographs()
    rng = np.random.default_rng(seed)
    if task == "detector":
        sizes = [(height, width)] * 3 if height else [photos[0].shape[:2], photos[1].shape[:2], (240, 320)]
        cases = []
        for i, (h, w) in enumerate(sizes[:2]):
            img = photos[i] if photos[i].shape[:2] == (h, w) else _resize(photos[i], h, w)
            cases.append((f"photo {i + 1} {h}x{w}", np.ascontiguousarray(img.transpose(2, 0, 1))))
        h, w = sizes[2]
        cases.append((f"random {h}x{w}", rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)))
        return cases
    sizes = [(height, width)] * 3 if height else [(224, 224), (256, 320), (160, 200)]
    batches = [batch] * 3 if batch else [1, 2, 3]
    cases = []
    for case, ((h, w), n) in enumerate(zip(sizes[:2], batches[:2])):
        imgs = [_resize(photos[(case * 2 + k) % len(photos)], h, w).transpose(2, 0, 1) for k in range(n)]
        cases.append((f"photos {n}x{h}x{w}", np.ascontiguousarray(np.stack(imgs))))
    (h, w), n = sizes[2], batches[2]
    cases.append((f"random {n}x{h}x{w}", rng.integers(0, 256, size=(n, 3, h, w), dtype=np.uint8)))
    return cases


def compare_features(reference: dict[str, np.ndarray], exported: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: ``max_abs`` difference and ``max_rel`` = max_abs / max |reference|."""
    result = {}
    for name, ref in reference.items():
        got = exported[name]
        if got.shape != ref.shape:
            result[name] = {"max_abs": float("inf"), "max_rel": float("inf"),
                            "shape": f"onnx {list(got.shape)} vs torch {list(ref.shape)}"}
            continue
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, and compare_case reports non-finite outputs
            diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        result[name] = {"max_abs": diff, "max_rel": diff / max(scale, 1e-12)}
    return result


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``[N, 4]`` x ``[M, 4]``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_detections(reference: dict[str, np.ndarray], exported: dict[str, np.ndarray],
                     iou_threshold: float = 0.9) -> dict[str, Any]:
    """Match two detection sets one-to-one by IoU (same label first), and measure the matched pairs.

    Returns counts (``torch``, ``onnx``, ``matched``), ``match_rate`` (matched over the larger
    count; 1.0 when both are empty), ``label_agreement``, ``max_score_diff``, ``max_box_diff_px``,
    ``min_iou`` of the matched pairs and, with masks, ``mask_mean_abs``.
    """
    iou = box_iou(reference["boxes"], exported["boxes"])
    same = reference["labels"][:, None] == exported["labels"][None, :] if iou.size else np.zeros_like(iou, bool)
    pairs = np.argwhere(iou >= iou_threshold)
    # greedy one-to-one: same-label pairs first, then highest IoU
    order = sorted(pairs.tolist(), key=lambda p: (not same[p[0], p[1]], -iou[p[0], p[1]]))
    used_r, used_e, matched = set(), set(), []
    for r, e in order:
        if r not in used_r and e not in used_e:
            used_r.add(r)
            used_e.add(e)
            matched.append((r, e))
    n_ref, n_exp = len(reference["boxes"]), len(exported["boxes"])
    result: dict[str, Any] = {"torch": n_ref, "onnx": n_exp, "matched": len(matched),
                              "match_rate": len(matched) / max(n_ref, n_exp) if max(n_ref, n_exp) else 1.0}
    if matched:
        r_idx, e_idx = np.array([m[0] for m in matched]), np.array([m[1] for m in matched])
        result["label_agreement"] = float(same[r_idx, e_idx].mean())
        result["max_score_diff"] = float(np.abs(reference["scores"][r_idx] - exported["scores"][e_idx]).max())
        result["max_box_diff_px"] = float(np.abs(reference["boxes"][r_idx] - exported["boxes"][e_idx]).max())
        result["min_iou"] = float(iou[r_idx, e_idx].min())
        if "masks" in reference:
            ref_m, exp_m = reference["masks"][r_idx], exported["masks"][e_idx]
            if ref_m.shape == exp_m.shape:
                result["mask_mean_abs"] = float(np.abs(ref_m - exp_m).mean())
            else:
                result["mask_mean_abs"] = float("inf")
    return result


def non_finite_outputs(outputs: dict[str, np.ndarray]) -> dict[str, int]:
    """``{name: count}`` of the floating-point outputs holding NaN or inf."""
    counts = {name: int(np.count_nonzero(~np.isfinite(array))) for name, array in outputs.items()
              if np.issubdtype(np.asarray(array).dtype, np.floating)}
    return {name: n for name, n in counts.items() if n}


def check_detections(figures: dict[str, Any], tol: Tolerance, case: str) -> list[str]:
    """The tolerance failures (as sentences) of one :func:`match_detections` result."""
    failures = []
    # written as "not within", so that a NaN figure (which compares False with anything) fails
    if not figures["match_rate"] >= tol.match_rate:
        failures.append(f"{case}: matched {figures['matched']} of torch {figures['torch']} / onnx {figures['onnx']} "
                        f"detections at IoU >= {tol.match_iou} (rate {figures['match_rate']:.3f} < {tol.match_rate})")
    if not figures.get("label_agreement", 1.0) >= tol.label_agreement:
        failures.append(f"{case}: label agreement {figures['label_agreement']:.3f} < {tol.label_agreement}")
    if not figures.get("max_score_diff", 0.0) <= tol.score_abs:
        failures.append(f"{case}: score difference {figures['max_score_diff']:.3g} > {tol.score_abs}")
    if not figures.get("mask_mean_abs", 0.0) <= tol.mask_mean_abs:
        failures.append(f"{case}: mask mean |diff| {figures['mask_mean_abs']:.3g} > {tol.mask_mean_abs}")
    return failures


def compare_case(report: ParityReport, label: str, task: str, reference: dict[str, np.ndarray],
                 exported: dict[str, np.ndarray], tol: Tolerance) -> None:
    """Compare one input's outputs (detections by IoU matching, features by relative difference) into ``report``.

    NaN or inf in either runtime's outputs is a failure: equal garbage is not parity.
    """
    for runtime, outputs in (("torch", reference), ("onnx", exported)):
        for name, count in non_finite_outputs(outputs).items():
            report.failures.append(f"{label} {name}: {count} non-finite values (NaN/inf) in the {runtime} output")
    if task == "detector":
        figures = match_detections(reference, exported, tol.match_iou)
        report.cases.append({"case": label, **figures})
        report.failures += check_detections(figures, tol, label)
        return
    per_output = compare_features(reference, exported)
    report.cases.append({"case": label, "outputs": per_output})
    for name, fig in per_output.items():
        if not fig["max_rel"] <= tol.feature_rel:  # NaN fails too
            shape = f", {fig['shape']}" if "shape" in fig else ""
            report.failures.append(f"{label} {name}: max rel diff {fig['max_rel']:.3g} > {tol.feature_rel} "
                                   f"(max abs {fig['max_abs']:.3g}{shape})")


def verify_onnx(
    path: str | os.PathLike[str],
    reference: nn.Module,
    task: str,
    *,
    output_names: list[str] | None = None,
    input_name: str | None = None,
    batch: int | None = None, height: int | None = None, width: int | None = None,  # the input's shape
    tolerance: Tolerance | None = None,
    session: Any = None,
    threads: int | None = None,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run the ONNX file with onnxruntime and ``reference`` (the exported PyTorch module) on the same pixels.

    Args:
        path: the ONNX file.
        reference: the module that was exported (uint8 in, tuple out), in eval mode.
        task: ``features``, ``embedding`` or ``detector``.
        output_names: the graph's output names, in the module's output order (default: the graph's).
        input_name: the graph's input name (default: its only input).
        batch, height, width: fixed sizes of the graph, ``None`` where dynamic (default: read from
            the graph's input shape).
        tolerance: limits (default :class:`Tolerance`).
        session: an existing onnxruntime session (default: a CPU/CUDA session on ``path``).
        raise_on_failure: raise :class:`ExportError` with the figures when a tolerance is exceeded.

    Example:
        >>> report = verify_onnx("m.onnx", PixelBackbone(...), "features", output_names=[...],
        ...                      input_name="images")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    from insloc_hub.exported import ort_session

    tol = tolerance or Tolerance()
    session = session or ort_session(path, threads=threads)
    graph_input = session.get_inputs()[0]
    input_name = input_name or graph_input.name
    output_names = output_names or [o.name for o in session.get_outputs()]
    if batch is None and height is None:
        dims = list(graph_input.shape)
        fixed = [d if isinstance(d, int) else None for d in dims]
        batch = fixed[0] if task != "detector" else None
        height, width = fixed[-2], fixed[-1]
    _, images_kind = photographs()
    report = ParityReport(task=task, passed=True, images=images_kind, tolerance=asdict(tol))
    device = next(reference.parameters()).device
    for label, pixels in parity_inputs(task, batch=batch, height=height, width=width):
        onnx_out = dict(zip(output_names, session.run(output_names, {input_name: pixels})))
        with torch.inference_mode():
            torch_out = reference(torch.from_numpy(pixels).to(device))
        torch_np = {n: t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                    for n, t in zip(output_names, torch_out)}
        compare_case(report, label, task, torch_np, onnx_out, tol)
    report.passed = not report.failures
    if raise_on_failure and not report.passed:
        raise ExportError(f"{path} differs from the PyTorch model beyond tolerance:\n{report.summary()}")
    return report
