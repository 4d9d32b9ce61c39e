"""Model backends behind one interface: ``torch`` (a hub folder) and ``onnxruntime`` (an exported .onnx).

A backend takes decoded RGB images (``uint8`` arrays ``[H, W, 3]``, any sizes) and returns numpy
results; it never sees HTTP. The batcher calls it from one worker thread.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from insloc_hub.errors import ConfigError, ImageGeometryError
from insloc_hub.exported import LEGACY_LOCAL_REVISIONS, LOCAL_REVISION, decode, ort_session, providers_for
from insloc_hub.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

WARMUP_SIZE = 64  # pixels; a small warm-up image still runs every kernel once


@dataclass
class Detections:
    """Detections of one image: ``boxes`` ``[K, 4]`` xyxy in the image's pixels, 1-based ``labels``, ``scores``."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass
class ModelInfo:
    """What the service says about a loaded model (``/v1/models``, v2 metadata)."""

    name: str
    revision: str
    sha256: str
    task: str  # detection | features | embedding
    backend: str
    device: str
    source: str
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    embedding_dim: int | None = None
    card_summary: str = ""
    #: detectors: the effective inference options (config.json ``detector.inference``: resize, score_thresh...)
    inference: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: ONNX graphs: the input as the graph declares it, and what the server does for fixed dims
    #: (``fixed_batch``, ``fixed_size`` [H, W], ``resize``: how images are brought to that size)
    input: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """``name@revision`` as reported in responses."""
        return f"{self.name}@{self.revision}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256, "task": self.task,
                "backend": self.backend, "device": self.device, "classes": self.class_names,
                "feature_names": self.feature_names, "embedding_dim": self.embedding_dim,
                "card_summary": self.card_summary, "inference": self.inference,
                "preprocessing": self.preprocessing, "input": self.input}


class Backend:
    """The interface: ``detect`` for detectors, ``embed``/``features`` for backbones."""

    info: ModelInfo

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        raise ConfigError(f"model {self.info.name!r} is a {self.info.task} model, not a detector; "
                          "use /v1/features or load a detection model")

    def embed(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise ConfigError(f"model {self.info.name!r} is a detector; embeddings need a backbone model")

    def features(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        raise ConfigError(f"model {self.info.name!r} is a detector; feature maps need a backbone model")

    def resize_limits(self) -> tuple[float, float] | None:
        """A detector's resize: shorter side to ``min_size``, longer side at most ``max_size`` (None: unknown)."""
        options = self.info.inference
        if self.info.task == "detection" and "min_size" in options and "max_size" in options:
            min_size = options["min_size"]
            return float(min_size[-1] if isinstance(min_size, (list, tuple)) else min_size), float(options["max_size"])
        return None

    def check_images(self, images: Sequence[np.ndarray]) -> None:
        """Refuse, before inference, an image the detector's resize would shrink to nothing (1 x 3000 px...).

        Raises:
            ImageGeometryError: naming the image's index, its size and what to crop or pad.
        """
        limits = self.resize_limits()
        if limits is None:
            return
        min_size, max_size = limits
        for index, image in enumerate(images):
            height, width = image.shape[:2]
            short, long = min(height, width), max(height, width)
            # torchvision computes the scale in float32 and the new side as floor(side * scale); torch and ONNX
            # Runtime both round that product as float32 (measured: 25 x 3200 px at max_size 128 runs, 1 px)
            scale = min(np.float32(min_size) / np.float32(short), np.float32(max_size) / np.float32(long))
            resized = math.floor(np.float32(short) * scale)
            if resized >= 1:
                continue
            side, other = ("height", "width") if height <= width else ("width", "height")
            need = math.ceil(long / max_size)
            raise ImageGeometryError(
                f"image {index} is {width}x{height} pixels (width x height): model {self.info.name!r} resizes its "
                f"longer side to at most {max_size:g} px, which leaves its {side} under 1 px; crop its {other} or "
                f"pad its {side} to at least {need} px (an aspect ratio up to about {max_size:g}:1 works)", index)

    def warmup(self) -> None:
        """Run every operation once on a small image so the first request pays no setup cost."""
        image = np.full((WARMUP_SIZE, WARMUP_SIZE, 3), 127, dtype=np.uint8)
        if self.info.task == "detection":
            self.detect([image])
        else:
            self.embed([image])
            if self.info.task == "features":
                self.features([image])


def served_name(text: str) -> str:
    """A name usable in URL paths: ``owner/repo`` -> ``owner--repo``; other odd characters -> ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-") or "model"


def _group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indices of equally sized images (one stacked forward pass per size bucket)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape, []).append(index)
    return groups


def _card_summary(folder: Path | None) -> str:
    """The model card's first prose paragraph (after the YAML header and the title)."""
    if folder is None or not (folder / "README.md").is_file():
        return ""
    text = (folder / "README.md").read_text(errors="replace")
    if text.startswith("---"):
        text = text.split("---", 2)[-1]
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip()
        if paragraph and not paragraph.startswith(("#", "```", "|", "<")):
            return " ".join(paragraph.split())[:400]
    return ""


def _bf16_module(module, device_type: str):
    """``module`` run under bf16 autocast, its tensor outputs returned as float32."""
    import torch

    class Autocast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module
            # torchvision reads attributes such as ``backbone.out_channels``
            if hasattr(module, "out_channels"):
                self.out_channels = module.out_channels

        def forward(self, *args):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = self.module(*args)
            if isinstance(out, dict):
                return type(out)((k, v.float()) for k, v in out.items())
            return out.float()

    return Autocast()


class TorchBackend(Backend):
    """A hub folder loaded with ``insloc_hub.from_pretrained`` (backbone or ``task: detection``).

    On CUDA: bf16 autocast, channels_last and optionally ``torch.compile`` (chosen at run time; the
    CPU path is float32 eager unless ``precision="bf16"`` asks for autocast there too). Detectors run
    only their feature extractor (``model.backbone``) and box head under autocast: box decoding and
    NMS stay float32, since bf16 has 8 significant bits (a box edge near 1,000 px would move by up to 4 px).
    """

    def __init__(self, spec: str, *, name: str | None = None, revision: str | None = None, device: str = "auto",
                 compile: bool = False, precision: str = "auto") -> None:
        import torch

        from insloc_hub import from_pretrained
        from insloc_hub.detectors import inference_options

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        model = from_pretrained(spec, revision=revision, device=self.device)
        config = model.hub_config
        self.is_detector = config.get("task") == "detection"
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.on_cuda)
        if self.on_cuda:
            model = model.to(memory_format=torch.channels_last)
        if self.bf16 and self.is_detector:
            model.backbone = _bf16_module(model.backbone, self.device.type)
            if hasattr(model, "roi_heads"):
                model.roi_heads.box_head = _bf16_module(model.roi_heads.box_head, self.device.type)
        self.model = model
        self.detect_fn = model
        self.features_fn = getattr(model, "forward_features", None)
        self.embed_fn = getattr(model, "forward_embedding", None)
        if compile and self.on_cuda:
            if self.is_detector:  # data-dependent control flow in torchvision detectors: compile the features
                model.backbone = torch.compile(model.backbone, dynamic=True)
            else:
                self.features_fn = torch.compile(model.forward_features, dynamic=True)
                self.embed_fn = torch.compile(model.forward_embedding, dynamic=True)
        rev = revision or (spec.split("@", 1)[1] if "@" in spec and not Path(spec).exists() else None)
        folder = getattr(model, "hub_folder", None)
        features = [f["name"] for f in config.get("features", [])] if not self.is_detector else []
        self.info = ModelInfo(
            name=served_name(name or config.get("name") or Path(spec).name), revision=rev or LOCAL_REVISION,
            sha256=str(config.get("weights", {}).get("sha256", "")),
            task="detection" if self.is_detector else "features", backend="torch", device=str(self.device),
            source=spec, class_names=list(config.get("class_names") or []), feature_names=features,
            embedding_dim=None if self.is_detector else int(model.embedding_dim),
            card_summary=_card_summary(Path(folder) if folder else None),
            # what the loaded detector really applies, read from its modules (not config.json's record of it)
            inference=inference_options(model) if self.is_detector else {},
            preprocessing=dict(config.get("preprocessing", {})),
        )
        # backbones take normalised images unless the folder says the model normalises (CONTRACT part 1)
        pre = self.info.preprocessing
        self.normalise = not self.is_detector and pre.get("normalization", "caller") == "caller"
        self.mean = torch.tensor(pre.get("mean", IMAGENET_MEAN), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("std", IMAGENET_STD), device=self.device).view(1, 3, 1, 1)

    def _autocast(self):
        """Autocast for backbone models (detectors carry their own, on the parts that tolerate bf16)."""
        if self.bf16 and not self.is_detector:
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def _model_input(self, images: Sequence[np.ndarray]):
        """Equally sized uint8 HWC images -> the backbone's float NCHW input (normalised per the folder)."""
        torch = self.torch
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if self.normalise:
            batch = (batch - self.mean) / self.std
        if self.on_cuda:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _padded_shape(self, image: np.ndarray) -> tuple[int, int]:
        """The size torchvision's transform resizes and pads this image to (its batching bucket)."""
        transform = self.model.transform
        height, width = image.shape[:2]
        scale = min(float(transform.min_size[-1]) / min(height, width), float(transform.max_size) / max(height, width))
        divisor = transform.size_divisible
        return tuple(math.ceil(math.floor(d * scale) / divisor) * divisor for d in (height, width))  # type: ignore

    def resize_limits(self) -> tuple[float, float] | None:
        if not self.is_detector:
            return None
        transform = self.model.transform  # what really runs, whatever config.json says
        return float(transform.min_size[-1]), float(transform.max_size)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if not self.is_detector:
            return super().detect(images)
        self.check_images(images)
        # torchvision resizes, normalises and pads a list of any sizes itself; images are grouped by the
        # padded size so that a batch answers exactly what each image alone would (padding moves RPN proposals)
        buckets: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            buckets.setdefault(self._padded_shape(image), []).append(index)
        results: list[Detections | None] = [None] * len(images)
        # on the CPU a batched detector forward is slower per image than one image at a time (ResNet-50
        # Faster R-CNN, 1 thread: -10 %, docs/benchmarks.md), so there the batch runs image by image
        chunk = len(images) if self.on_cuda else 1
        for bucket in buckets.values():
            for start in range(0, len(bucket), chunk):
                indices = bucket[start:start + chunk]
                self._detect_chunk(images, indices, results)
        return results  # type: ignore[return-value]

    def _detect_chunk(self, images: Sequence[np.ndarray], indices: list[int], results: list) -> None:
        torch = self.torch
        tensors = [torch.from_numpy(images[i]).to(self.device).permute(2, 0, 1).float().div_(255.0) for i in indices]
        with torch.inference_mode(), self._autocast():
            outputs = self.detect_fn(tensors)
        for index, o in zip(indices, outputs):
            results[index] = Detections(boxes=o["boxes"].float().cpu().numpy(), labels=o["labels"].cpu().numpy(),
                                        scores=o["scores"].float().cpu().numpy())

    def embed(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.is_detector:
            return super().embed(images)
        results: list[np.ndarray] = [np.empty(0)] * len(images)
        for indices in _group_by_shape(images).values():
            with self.torch.inference_mode(), self._autocast():
                out = self.embed_fn(self._model_input([images[i] for i in indices]))
            for row, index in zip(out.float().cpu().numpy(), indices):
                results[index] = row
        return results

    def features(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if self.is_detector:
            return super().features(images)
        results: list[dict[str, np.ndarray]] = [{}] * len(images)
        for indices in _group_by_shape(images).values():
            with self.torch.inference_mode(), self._autocast():
                batch = self._model_input([images[i] for i in indices])
                maps = {k: v.float().cpu().numpy() for k, v in self.features_fn(batch).items()}
                embedding = self.embed_fn(batch).float().cpu().numpy()
            for row, index in enumerate(indices):
                results[index] = {**{k: v[row] for k, v in maps.items()}, "embedding": embedding[row]}
        return results


class OnnxBackend(Backend):
    """An .onnx file written by ``insloc-export onnx`` (the runtime contract's part 2), run by ONNX Runtime."""

    def __init__(self, path: str, *, name: str | None = None, device: str = "auto", threads: int = 0) -> None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"ONNX file {path!r} does not exist")
        providers = providers_for(device)
        try:
            self.session = ort_session(file, threads=threads, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise ConfigError(f"ONNX Runtime cannot load {path!r}: {exc}") from exc
        meta = decode(self.session.get_modelmeta().custom_metadata_map)
        task = meta.get("task")
        if task not in ("features", "embedding", "detector"):
            raise ConfigError(f"{path!r} has no insloc.task metadata (features, embedding or detector); "
                              "export it with insloc-export onnx")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.batched_detector = task == "detector" and self.input_name == "images"
        exported_name = meta.get("model_name") or file.stem
        if exported_name.startswith(("/", ".", "~")) or Path(exported_name).is_dir():
            exported_name = Path(exported_name).name  # exported from a local folder: its name, not its path
        preprocessing = meta.get("preprocessing")
        revision = meta.get("revision") or LOCAL_REVISION
        if revision in LEGACY_LOCAL_REVISIONS:  # one label for local sources, whichever backend serves them
            revision = LOCAL_REVISION
        options = meta.get("options")  # a detector's effective inference options, as config.json has them
        self.info = ModelInfo(
            name=served_name(name or exported_name),
            revision=revision, sha256=meta.get("weights_sha256", ""),
            task="detection" if task == "detector" else task, backend="onnxruntime",
            device="cuda" if providers[0] == "CUDAExecutionProvider" else "cpu", source=str(file),
            class_names=list(meta.get("class_names", [])),
            feature_names=[n for n in self.output_names if n != "embedding"] if task == "features" else [],
            embedding_dim=None, preprocessing=preprocessing if isinstance(preprocessing, dict) else {},
            inference=dict(options) if isinstance(options, dict) else {},
            card_summary=f"exported by {meta.get('exporter', '?')} (opset {meta.get('opset', '?')}); "
                         f"parity {json.dumps(meta['parity']) if 'parity' in meta else '?'}",
        )
        if "embedding" in self.output_names:
            dim = self.session.get_outputs()[self.output_names.index("embedding")].shape[-1]
            self.info.embedding_dim = dim if isinstance(dim, int) else None
        self.fixed_batch, self.fixed_size = self._read_input(file)

    def _read_input(self, file: Path) -> tuple[int | None, tuple[int, int] | None]:
        """The graph's fixed batch and (height, width), from its declared input; refuse what cannot be served.

        Users export fixed shapes for TensorRT and Triton and point the server at the same file: a fixed
        batch is served in chunks of exactly that batch, a fixed size by resizing every image to it
        (backbones only: a detector's boxes would come out of a distorted image).
        """
        graph_input = self.session.get_inputs()[0]
        shape = list(graph_input.shape or [])
        detector = self.info.task == "detection"
        rank = 4 if self.batched_detector or not detector else 3
        reexport = f"re-export it: insloc-export onnx FOLDER --output {file.name}"
        channels = shape[-3] if len(shape) == rank else None
        if graph_input.type != "tensor(uint8)" or len(shape) != rank or (isinstance(channels, int) and channels != 3):
            raise ConfigError(f"{file} takes {graph_input.type} {shape}, not uint8 RGB pixels "
                              f"{'[3, H, W]' if rank == 3 else '[N, 3, H, W]'}; {reexport}")
        fixed = [d if isinstance(d, int) else None for d in shape]
        height, width = fixed[-2], fixed[-1]
        batch = fixed[0] if rank == 4 else None
        self.info.input = {"name": graph_input.name, "shape": shape, "fixed_batch": batch,
                           "fixed_size": [height, width] if height or width else None}
        if detector:
            if height or width or (self.batched_detector and batch not in (None, 1)):
                raise ConfigError(f"{file} is a detector graph with a fixed input shape {shape}; insloc-serve "
                                  "serves detectors only with dynamic height and width (resizing images to one "
                                  f"size would distort the boxes): {reexport} (dynamic axes: no --height/--width)")
            return None, None
        size = (height, width) if height or width else None
        if size is not None:
            self.info.input["resize"] = (
                f"the graph has a fixed input size: every image is resized to {height or 'H'}x{width or 'W'} "
                "(height x width, bilinear, aspect ratio not kept) before it; feature maps describe the resized "
                "image (multiply map coordinates by original/resized height and width to reach the original "
                "pixels); the width and height in responses stay the original image's")
        return batch, size  # type: ignore[return-value]

    def _chw(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """The image at the graph's fixed size (unchanged for dynamic sides)."""
        if self.fixed_size is None:
            return image
        height = self.fixed_size[0] or image.shape[0]
        width = self.fixed_size[1] or image.shape[1]
        if image.shape[:2] == (height, width):
            return image
        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``[n, 3, H, W]``; a fixed-batch graph gets chunks of exactly its batch, the last one padded."""
        step = self.fixed_batch or len(batch)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            real = len(chunk)
            if real < step:  # pad with copies of the last image; their outputs are dropped below
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - real, axis=0)])
            out = self.session.run(None, {self.input_name: chunk})
            parts.append({name: value[:real] for name, value in zip(self.output_names, out)})
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.output_names}

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if self.info.task != "detection":
            return super().detect(images)
        self.check_images(images)
        results = []
        for image in images:  # the contract's detector graph takes one image
            feed = self._chw(image)[None] if self.batched_detector else self._chw(image)
            out = dict(zip(self.output_names, self.session.run(None, {self.input_name: feed})))
            results.append(Detections(boxes=out["boxes"].astype(np.float32).reshape(-1, 4),
                                      labels=out["labels"].astype(np.int64).reshape(-1),
                                      scores=out["scores"].astype(np.float32).reshape(-1)))
        return results

    def _run_grouped(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        images = [self._fit(image) for image in images]
        results: list[dict[str, np.ndarray]] = [{}] * len(images)
        for indices in _group_by_shape(images).values():
            out = self._run(np.stack([self._chw(images[i]) for i in indices]))
            for row, index in enumerate(indices):
                results[index] = {k: v[row] for k, v in out.items()}
        return results

    def embed(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.info.task == "detection":
            return super().embed(images)
        return [r["embedding"] for r in self._run_grouped(images)]

    def features(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if self.info.task != "features":
            if self.info.task == "embedding":
                raise ConfigError(f"model {self.info.name!r} was exported as an embedding graph; it has no "
                                  "feature maps (export with --task features)")
            return super().features(images)
        return self._run_grouped(images)


def load_backend(spec: str, *, backend: str = "auto", revision: str | None = None, device: str = "auto",
                 compile: bool = False, threads: int = 0, precision: str = "auto") -> Backend:
    """Load one ``--model`` value: ``[served_name=]NAME`` where NAME is a hub name, folder or .onnx file.

    Example:
        >>> load_backend("detector=out/raccoon-detector", device="cpu").info.name  # doctest: +SKIP
        'detector'
    """
    name = None
    match = re.fullmatch(r"([A-Za-z0-9._-]+)=(.+)", spec)
    if match:
        name, spec = match.group(1), match.group(2)
    is_onnx = spec.lower().endswith(".onnx")
    if backend == "auto":
        backend = "onnxruntime" if is_onnx else "torch"
    if backend == "onnxruntime":
        if not is_onnx:
            raise ConfigError(f"--backend onnxruntime serves exported .onnx files, got {spec!r}; export it first "
                              "(insloc-export onnx) or use --backend torch")
        return OnnxBackend(spec, name=name, device=device, threads=threads)
    if is_onnx:
        raise ConfigError(f"{spec!r} is an ONNX file; serve it with --backend onnxruntime")
    return TorchBackend(spec, name=name, revision=revision, device=device, compile=compile, precision=precision)
