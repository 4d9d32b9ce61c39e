"""Turning model outputs into response bodies: filtered detection lists, annotated PNGs, safetensors."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from insloc_hub.serve.backends import Detections
from insloc_hub.serve.inputs import Options


def label_name(label: int, class_names: list[str]) -> str:
    """Label i (1-based) is class_names[i - 1]; labels outside the list stay numbers (as text)."""
    return class_names[label - 1] if 1 <= label <= len(class_names) else str(label)


def select_detections(det: Detections, opts: Options, class_names: list[str]) -> np.ndarray:
    """Indices of the detections to answer with: ``score >= score_threshold``, of the asked ``classes``, best
    first, at most ``max_detections`` (the one filter of /v1 lists and v2 tensors)."""
    order = np.argsort(-det.scores, kind="stable")
    keep = [i for i in order if float(det.scores[i]) >= opts.score_threshold
            and (opts.classes is None or label_name(int(det.labels[i]), class_names) in opts.classes)]
    return np.array(keep[:opts.max_detections], dtype=np.int64)


def filter_detections(det: Detections, opts: Options, class_names: list[str]) -> list[dict[str, Any]]:
    """:func:`select_detections` as the /v1 list: label names, scores and boxes rounded for JSON."""
    out = []
    for i in select_detections(det, opts, class_names):
        label = int(det.labels[i])
        xmin, ymin, xmax, ymax = (round(float(v), 2) for v in det.boxes[i])
        out.append({"label": label_name(label, class_names), "label_id": label, "score": round(float(det.scores[i]), 5),
                    "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}})
    return out


def annotated_png(image: np.ndarray, detections: list[dict[str, Any]]) -> bytes:
    """The image with its (already filtered) boxes drawn by torchvision, as PNG bytes."""
    import torch
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if detections:
        boxes = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in detections])
        labels = [f"{d['label']} {d['score']:.2f}" for d in detections]
        width = max(2, round(max(image.shape[:2]) / 300))
        tensor = draw_bounding_boxes(tensor, boxes, labels=labels, colors="red", width=width)
    buffer = io.BytesIO()
    Image.fromarray(tensor.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def safetensors_bytes(results: list[dict[str, np.ndarray]], model_tag: str) -> bytes:
    """Per-image maps as one safetensors file: keys ``"<image index>.<map name>"`` (p2..p5, embedding...)."""
    from safetensors.numpy import save

    tensors = {f"{i}.{name}": np.ascontiguousarray(array, dtype=np.float32)
               for i, maps in enumerate(results) for name, array in maps.items()}
    return save(tensors, metadata={"model": model_tag, "images": str(len(results))})
