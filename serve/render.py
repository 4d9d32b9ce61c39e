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


def filter_detections(det: Detections, opts: Options, class_names: list[str]) -> list[dict[str, Any]]:
    """Detections above ``score_threshold``, of the asked ``classes``, best first, at most ``max_detections``."""
    order = np.argsort(-det.scores, kind="stable")
    out = []
    for i in order:
        score = float(det.scores[i])
        name = label_name(int(det.labels[i]), class_names)
        if score < opts.score_threshold or (opts.classes is not None and name not in opts.classes):
            continue
        xmin, ymin, xmax, ymax = (round(float(v), 2) for v in det.boxes[i])
        out.append({"label": name, "label_id": int(det.labels[i]), "score": round(score, 5),
                    "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}})
        if opts.max_detections is not None and len(out) >= opts.max_detections:
            break
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
