"""``export_onnx``: a hub model (or a loaded one) to an ONNX file with metadata and proven parity.

Which exporter, and why (measured with torch 2.14 / torchvision 0.29):

- features / embedding: the dynamo exporter (``torch.export``): batch, height and width are true
  symbolic dimensions and every map's size is its own expression (``(height - 1)//4 + 1`` for P2).
  The TorchScript-based exporter would give all maps the same symbolic size, which is wrong.
- detectors (all four architectures): the TorchScript-based exporter. The dynamo exporter fails on
  torchvision's ``batched_nms`` (data-dependent guards); tracing records torchvision's ONNX paths
  for resize, RoIAlign, NMS and mask pasting. Height and width are dynamic; the graph takes one
  image (``[3, H, W]``) and returns a dynamic number of detections.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from insloc_hub.detectors import inference_options
from insloc_hub.errors import ConfigError, ExportError
from insloc_hub.export.metadata import set_metadata, tensor_specs
from insloc_hub.export.parity import ParityReport, Tolerance, verify_onnx
from insloc_hub.export.wrappers import TASKS, PixelBackbone, PixelDetector, feature_names, has_embedding
from insloc_hub.exported import LOCAL_REVISION
from insloc_hub.models import PRESETS, InsLocBackbone
from insloc_hub.pretrained import default_file_mode
from insloc_hub.transforms import IMAGENET_MEAN, IMAGENET_STD
from insloc_hub.version import __version__

logger = logging.getLogger(__name__)

OPSETS = (17, 18)
DEFAULT_OPSET = 18
#: smallest/largest dynamic height and width (the ResNet stem needs a few pixels; 8K covers photographs)
MIN_SIDE, MAX_SIDE = 32, 8192
MAX_BATCH = 1024
EXPORTERS = {
    "dynamo": "torch.onnx dynamo exporter (torch.export)",
    "torchscript": "torch.onnx TorchScript-based exporter (tracing)",
}


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        task: ``features``, ``embedding`` or ``detector``.
        metadata: the ``insloc.*`` metadata written into the file (decoded).
        parity: the verification figures, ``None`` with ``verify=False``.
        seconds: wall time of the whole export (including verification).
    """

    path: Path
    task: str
    metadata: dict[str, Any]
    parity: ParityReport | None
    seconds: float


def is_detector(model: nn.Module) -> bool:
    """A torchvision detector built by insloc-hub (it carries ``insloc_config``)."""
    return getattr(model, "insloc_config", None) is not None and not isinstance(model, InsLocBackbone)


def default_task(model: nn.Module) -> str:
    """``detector`` for detection models, ``features`` for backbone bundles."""
    return "detector" if is_detector(model) else "features"


def check_task(model: nn.Module, task: str, name: str) -> None:
    """Refuse tasks the model cannot do, saying what would work."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {TASKS}")
    if is_detector(model):
        if task != "detector":
            raise ConfigError(f"{name} is a detection model; export it with --task detector (its feature extractor "
                              "alone is not a separate folder: export the pretrained backbone folder for features)")
        return
    if not isinstance(model, InsLocBackbone):
        raise ConfigError(f"cannot export a {type(model).__name__}; expected an InsLocBackbone or a detector from "
                          "build_detector / from_pretrained")
    if task == "detector":
        raise ConfigError(f"{name} is a backbone (task: backbone), not a detector; export --task features or "
                          "embedding, or fine-tune a detector first (insloc-train finetune) and export that folder")
    if task == "embedding" and not has_embedding(model):
        raise ConfigError(f"{name} is a C4 bundle without its res5 head, so it has no embedding; use --task features")


def load_model(model_or_name: nn.Module | str | os.PathLike[str], revision: str | None = None) -> nn.Module:
    """The model on the CPU (a copy if it lives on a GPU), or ``from_pretrained(name, revision=...)``."""
    if isinstance(model_or_name, nn.Module):
        if any(p.device.type != "cpu" for p in model_or_name.parameters()):
            return copy.deepcopy(model_or_name).cpu()  # exported and checked on the CPU; the caller's stays put
        return model_or_name
    from insloc_hub import from_pretrained

    return from_pretrained(model_or_name, revision=revision)


def export_onnx(
    model_or_name: nn.Module | str | os.PathLike[str],
    output: str | os.PathLike[str],
    task: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
    half: bool = False,
    revision: str | None = None,
    verify: bool = True,
    simplify: bool | None = None,
    tolerance: Tolerance | None = None,
    threads: int | None = None,
) -> ExportResult:
    """Export a backbone (``features``/``embedding``) or a detector to ONNX, then check it against PyTorch.

    Args:
        model_or_name: a hub name, alias, ``repo@rev`` or folder, or a loaded model.
        output: the ``.onnx`` file to write (replaced only once the export succeeded and passed).
        task: ``features`` (maps + embedding), ``embedding``, ``detector``; default from the model.
        opset: ONNX opset, 17 or 18.
        batch: fixed batch size (features/embedding); ``None`` = dynamic. Detectors take one image.
        height, width: fixed input size; ``None`` = dynamic (both or neither).
        half: float16 weights and compute (features/embedding only).
        revision: Hub revision when ``model_or_name`` is a name.
        verify: run the parity check (onnxruntime vs PyTorch) and fail beyond tolerance.
        simplify: run onnxslim / onnxsim; ``None`` = when installed.
        tolerance: parity limits (default :class:`Tolerance`, looser with ``half``).
        threads: onnxruntime threads for the check.

    Returns:
        :class:`ExportResult` (path, task, metadata, parity figures).

    Raises:
        ConfigError: bad name/task/sizes or an unwritable output.
        ExportError: the exporter failed, or parity is beyond tolerance (the message has the figures).
        MissingDependencyError: onnxruntime is missing and ``verify`` is on.

    Example:
        >>> result = export_onnx("insloc-r50", "r50.onnx")  # doctest: +SKIP
        >>> result.parity.passed  # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    if opset not in OPSETS:
        raise ConfigError(f"opset {opset} is not supported; use one of {OPSETS}")
    if (height is None) != (width is None):
        raise ConfigError("give both --height and --width for a fixed size, or neither for a dynamic size")
    for label, value, low in (("batch", batch, 1), ("height", height, MIN_SIDE), ("width", width, MIN_SIDE)):
        if value is not None and not low <= value <= (MAX_BATCH if label == "batch" else MAX_SIDE):
            raise ConfigError(f"{label} must be between {low} and {MAX_BATCH if label == 'batch' else MAX_SIDE}, "
                              f"got {value}")
    output = Path(output)
    if verify:  # fail before the (slow) export when the check could not run
        from insloc_hub.exported import import_onnxruntime

        import_onnxruntime("To export without the parity check, pass --no-verify (verify=False).")
    tmp = _writable_temp(output)
    try:
        model = load_model(model_or_name, revision).eval()
        name = str(model_or_name) if not isinstance(model_or_name, nn.Module) else _model_name(model)
        task = task or default_task(model)
        check_task(model, task, name)
        if task == "detector":
            if batch not in (None, 1):
                raise ConfigError("detector graphs take one image ([3, H, W]); batch > 1 is not parity-tested for "
                                  "detectors, so it is not offered: run one image per call (or batch requests in "
                                  "the server)")
            if half:
                raise ConfigError("--half applies to features/embedding graphs; for a float16 detector build a "
                                  "TensorRT engine from the float32 graph (insloc-export tensorrt --precision fp16)")
            batch = None
        module, input_name, output_names, exporter = _prepare(model, task, half)
        example = _example_input(task, batch, height, width)
        _run_exporter(module, example, tmp, exporter, opset, input_name, output_names, task, batch, height, width)
        fields = _metadata_fields(model, name, revision, task, exporter, opset, half)
        onnx_model = _finish_graph(tmp, fields, simplify)
        if "masks" in output_names:
            _name_mask_dims(onnx_model, height, width)
        fields["inputs"] = tensor_specs(onnx_model.graph.input)
        fields["outputs"] = tensor_specs(onnx_model.graph.output)
        parity = None
        if verify:
            _save(onnx_model, tmp)  # check the graph as it will be shipped (simplified, dims named)
            reference = _prepare(model, task, False)[0] if half else module
            tol = tolerance or (Tolerance.for_half() if half else Tolerance())
            parity = verify_onnx(tmp, reference, task, output_names=output_names, input_name=input_name,
                                 batch=batch, height=height, width=width, tolerance=tol, threads=threads)
            fields["parity"] = parity.to_dict()
        else:
            fields["parity"] = {"verified": False, "reason": "exported with --no-verify (verify=False)"}
        set_metadata(onnx_model, fields)
        _save(onnx_model, tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(path=output, task=task, metadata=fields, parity=parity, seconds=time.perf_counter() - start)


def _writable_temp(output: Path) -> Path:
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; give a file name such as {output / 'model.onnx'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}; choose a writable --output") from exc
    os.chmod(name, default_file_mode())  # mkstemp makes 0600
    return Path(name)


def _prepare(model: nn.Module, task: str, half: bool) -> tuple[nn.Module, str, list[str], str]:
    """The module to export, its input name, output names and exporter."""
    if task == "detector":
        with_masks = getattr(model.roi_heads, "has_mask", lambda: False)() if hasattr(model, "roi_heads") else False
        names = ["boxes", "labels", "scores"] + (["masks"] if with_masks else [])
        return PixelDetector(model, with_masks).eval(), "image", names, "torchscript"
    config = getattr(model, "hub_config", {}) or {}
    pre = config.get("preprocessing", {})
    mean, std = pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD)
    if task == "features":
        names = feature_names(model) + (["embedding"] if has_embedding(model) else [])
    else:
        names = ["embedding"]
    backbone = copy.deepcopy(model).half() if half else model
    module = PixelBackbone(backbone, names, mean, std).eval()
    if half:
        module = module.half()
    return module, "images", names, "dynamo"


def _example_input(task: str, batch: int | None, height: int | None, width: int | None) -> torch.Tensor:
    # dynamic dims get an example away from 0/1 (torch.export specialises those) and non-square
    h, w = (height, width) if height else (224, 256)
    if task == "detector":
        return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.randint(0, 256, (batch or 2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _run_exporter(module: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int, input_name: str,
                  output_names: list[str], task: str, batch: int | None, height: int | None,
                  width: int | None) -> None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity decides correctness
            if exporter == "dynamo":
                _export_dynamo(module, example, path, opset, input_name, output_names, batch, height)
            else:
                _export_torchscript(module, example, path, opset, input_name, output_names, height)
    except (ConfigError, ExportError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the {EXPORTERS[exporter]} failed on the {task} graph: {type(exc).__name__}: {first}") \
            from exc


def _export_dynamo(module: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str,
                   output_names: list[str], batch: int | None, height: int | None) -> None:
    dims: dict[int, Any] = {}
    if batch is None:
        dims[0] = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if height is None:
        dims[2] = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
        dims[3] = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    # always 18 here: torch's own down-conversion fails on ReduceMean; _to_opset converts afterwards
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=18, input_names=[input_name], output_names=output_names,
        dynamic_shapes={"images": dims} if dims else None, verbose=False, optimize=True,
    )
    program.save(str(path))
    if opset != 18:
        _to_opset(path, opset)


def _to_opset(path: Path, opset: int) -> None:
    """Convert a saved graph to an older opset with ``onnx.version_converter``.

    The converter keeps ReduceMean-18's ``noop_with_empty_axes`` attribute, which older ReduceMean
    versions lack; at its default (0) dropping it changes nothing, so it is dropped.
    """
    import onnx
    import onnx.version_converter

    model = onnx.version_converter.convert_version(onnx.load(str(path)), opset)
    for node in model.graph.node:
        if node.op_type.startswith("Reduce"):
            kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)
    onnx.save(model, str(path))


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str,
                        output_names: list[str], height: int | None) -> None:
    axes: dict[str, dict[int, str]] = {name: {0: "detections"} for name in output_names}
    if height is None:
        axes[input_name] = {1: "height", 2: "width"}
    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                      output_names=output_names, dynamic_axes=axes, do_constant_folding=True)


def _finish_graph(path: Path, fields: dict[str, Any], simplify: bool | None) -> Any:
    """Load, optionally simplify, check with ``onnx.checker`` and return the model proto."""
    import onnx

    model = onnx.load(str(path))
    if simplify is not False:
        simplified = _simplify(model, required=bool(simplify))
        if simplified is not None:
            model, fields["simplified_by"] = simplified
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {str(exc).splitlines()[0]}") from exc
    return model


def _name_mask_dims(model: Any, height: int | None, width: int | None) -> None:
    """Masks are ``[K, 1, H, W]`` with the input's H and W; the tracer leaves generated names there."""
    for value in model.graph.output:
        if value.name == "masks":
            dims = value.type.tensor_type.shape.dim
            for index, size in ((1, 1), (2, height or "height"), (3, width or "width")):
                dims[index].Clear()
                if isinstance(size, int):
                    dims[index].dim_value = size
                else:
                    dims[index].dim_param = size


def _simplify(model: Any, required: bool) -> tuple[Any, str] | None:
    try:
        import onnxslim

        return onnxslim.slim(model), f"onnxslim {getattr(onnxslim, '__version__', '')}".strip()
    except ImportError:
        pass
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if ok:
            return simplified, f"onnxsim {getattr(onnxsim, '__version__', '')}".strip()
        logger.warning("onnxsim could not validate its simplified graph; keeping the exported one")
        return None
    except ImportError:
        if required:
            raise ConfigError("simplify=True needs onnxslim or onnxsim: pip install onnxslim") from None
    return None


def _save(model: Any, path: Path) -> None:
    import onnx

    mode = os.stat(path).st_mode
    onnx.save(model, str(path))
    os.chmod(path, mode)


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "hub_config", None) or {}
    if config.get("repo_id") or config.get("name"):
        return str(config.get("repo_id") or config["name"])
    folder = getattr(model, "hub_folder", None)
    return str(folder) if folder else f"unsaved {type(model).__name__}"


def _revision(model: nn.Module, name: str, revision: str | None) -> str:
    if revision:
        return revision
    if "@" in name and not Path(name).exists():
        return name.rsplit("@", 1)[1]
    folder = getattr(model, "hub_folder", None)
    if folder is not None:
        parts = Path(folder).parts
        if "snapshots" in parts[:-1]:  # a Hugging Face cache snapshot: snapshots/<commit>/
            return parts[parts.index("snapshots") + 1]
        return LOCAL_REVISION
    return "unsaved"


def backbone_arch(model: InsLocBackbone) -> str:
    """The preset name of a bundle's architecture, or a description of it."""
    cfg = dataclasses.replace(model.config, parts=None)
    for preset, known in PRESETS.items():
        if dataclasses.replace(known, parts=None) == cfg:
            return preset
    return f"resnet{cfg.depth}-{cfg.variant}-width{cfg.width}"


def _metadata_fields(model: nn.Module, name: str, revision: str | None, task: str, exporter: str, opset: int,
                     half: bool) -> dict[str, Any]:
    config = getattr(model, "hub_config", None) or {}
    fields: dict[str, Any] = {
        "task": task, "model_name": name, "revision": _revision(model, name, revision),
        "weights_sha256": config.get("weights", {}).get("sha256", ""),
        "exporter": f"{EXPORTERS[exporter]}, torch {torch.__version__}"
                    + (f" (opset 18, converted to {opset} by onnx.version_converter)"
                       if exporter == "dynamo" and opset != 18 else ""),
        "opset": opset, "version": __version__,
        "precision": "float16" if half else "float32",
    }
    if task == "detector":
        det = model.insloc_config
        inference = inference_options(model)  # CONTRACT part 1: what the modules do now
        fields.update(arch=det.arch, class_names=list(det.class_names or []), options=inference)
        fields["preprocessing"] = {
            "input": "image: uint8 [3, H, W] RGB pixels 0-255, one image per call",
            "normalization": "graph",
            "resize": f"inside the graph: shorter side to {inference['min_size']}, longer side at most "
                      f"{inference['max_size']} (torchvision GeneralizedRCNNTransform)",
            "mean": inference["image_mean"], "std": inference["image_std"],
            "outputs": "boxes xyxy in the input image's pixels; labels 1-based (class_names[label - 1]); scores"
                       + ("; masks [K, 1, H, W] probabilities (threshold 0.5)" if "mask_thresh" in inference else ""),
        }
    else:
        pre = config.get("preprocessing", {})
        fields.update(arch=backbone_arch(model), embedding_dim=model.embedding_dim)
        fields["preprocessing"] = {
            "input": "images: uint8 [N, 3, H, W] RGB pixels 0-255",
            "normalization": "graph",
            "graph_computes": "(pixels / 255 - mean) / std",
            "mean": list(pre.get("mean", IMAGENET_MEAN)), "std": list(pre.get("std", IMAGENET_STD)),
            "color_space": "RGB",
        }
    return fields
