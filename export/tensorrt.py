"""``build_engine``: a TensorRT engine from an exported ONNX file, with a JSON sidecar and a parity check.

Uses the TensorRT 10 Python API (``tensorrt-cu12`` / ``tensorrt-cu13`` wheels): the ONNX parser, one
optimisation profile (min/opt/max shape per dynamic input), fp16/bf16 builder flags, a workspace
limit and a reusable timing cache. The engine is then run (CUDA buffers from PyTorch, an output
allocator for data-dependent shapes such as a detector's number of boxes) on the same pixels as
onnxruntime and compared like the ONNX export is.

Verified here: only the paths that need no GPU (argument checks, profiles, the missing-TensorRT
message). Engine building needs an NVIDIA GPU with TensorRT, which this project's machines lack.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insloc_hub.errors import ConfigError, ExportError, MissingDependencyError
from insloc_hub.export.metadata import read_metadata

PRECISIONS = ("fp32", "fp16", "bf16")
TENSORRT_INSTALL = (
    "pip install 'insloc-hub[tensorrt]' (TensorRT 10 for CUDA 12: tensorrt-cu12, tensorrt-cu12-libs, "
    "tensorrt-cu12-bindings; 'insloc-hub[tensorrt-cu13]' for CUDA 13) on a Linux machine with an NVIDIA GPU, "
    "its driver, and a CUDA build of PyTorch"
)
#: default profile sides for dynamic height/width (min, opt, max) and batch (features graphs)
DEFAULT_SIDES = {"features": (224, 224, 1024), "embedding": (224, 224, 1024), "detector": (320, 800, 1344)}
DEFAULT_BATCH = (1, 8, 32)


@dataclass
class EngineResult:
    """What :func:`build_engine` wrote: the engine, its sidecar, and the check against onnxruntime."""

    path: Path
    sidecar: Path
    info: dict[str, Any]
    parity: Any


def require_tensorrt() -> Any:
    """``import tensorrt`` and check for a CUDA GPU; otherwise say exactly what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed: {TENSORRT_INSTALL}.") from exc
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            f"TensorRT {tensorrt.__version__} is installed but no CUDA GPU is visible (torch.cuda.is_available() is "
            f"False); building an engine needs an NVIDIA GPU and driver: {TENSORRT_INSTALL}."
        )
    return tensorrt


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"bad shape {text!r}; write it like 1x3x224x224") from None
    if not shape or any(v < 1 for v in shape):
        raise ConfigError(f"bad shape {text!r}; every dimension must be a positive integer")
    return shape


def profile_shapes(metadata: dict[str, Any], min_shape: str | None = None, opt_shape: str | None = None,
                   max_shape: str | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The optimisation profile ``{input: (min, opt, max)}`` for an exported graph.

    Fixed dims of the graph are kept; dynamic ones take the given shapes or the defaults
    (:data:`DEFAULT_BATCH`, :data:`DEFAULT_SIDES`).

    Raises:
        ConfigError: a given shape has the wrong rank, contradicts a fixed dim, or min <= opt <= max fails.

    Example:
        >>> profile_shapes({"task": "features", "inputs": [{"name": "images", "dtype": "uint8",
        ...                 "shape": ["batch", 3, "height", "width"]}]})["images"][1]
        (8, 3, 224, 224)
    """
    task = metadata["task"]
    (spec,) = metadata["inputs"]
    dims = spec["shape"]
    low, mid, high = DEFAULT_SIDES[task]
    defaults = []
    for level, side in enumerate((low, mid, high)):
        shape = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                shape.append(dim)
            elif task != "detector" and axis == 0:
                shape.append(DEFAULT_BATCH[level])
            else:
                shape.append(side)
        defaults.append(tuple(shape))
    given = [parse_shape(s) if s else None for s in (min_shape, opt_shape, max_shape)]
    shapes = []
    for label, shape, default in zip(("min", "opt", "max"), given, defaults):
        if shape is None:
            shapes.append(default)
            continue
        if len(shape) != len(dims):
            raise ConfigError(f"--{label}-shape {shape} has {len(shape)} dims; {spec['name']} has {len(dims)} {dims}")
        for axis, (value, dim) in enumerate(zip(shape, dims)):
            if isinstance(dim, int) and value != dim:
                raise ConfigError(f"--{label}-shape dim {axis} is {value} but the graph fixes it to {dim}")
        shapes.append(shape)
    if not all(a <= b <= c for a, b, c in zip(*shapes)):
        raise ConfigError(f"the profile needs min <= opt <= max in every dim, got {shapes[0]}, {shapes[1]}, "
                          f"{shapes[2]}")
    return {spec["name"]: tuple(shapes)}


def build_engine(
    onnx_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
    verify: bool = True,
) -> EngineResult:
    """Build a TensorRT engine from an ``insloc-export onnx`` file; write ``output`` and ``output.json``.

    Args:
        onnx_path: an ONNX file written by :func:`insloc_hub.export.export_onnx`.
        output: the engine file (``.engine`` / ``.plan``).
        precision: ``fp32``, ``fp16`` or ``bf16`` (TF32 stays on for fp32, as TensorRT's default).
        min_shape, opt_shape, max_shape: the optimisation profile of the input (``1x3x224x224``);
            defaults from :func:`profile_shapes`.
        workspace_gib: builder workspace limit.
        timing_cache: file read before and written after the build, so rebuilds skip kernel timing.
        verify: compare the engine with onnxruntime on the parity pixels.

    Raises:
        MissingDependencyError: TensorRT or a CUDA GPU is missing (the message says what to install).
        ExportError: TensorRT could not parse/build the graph, or the engine differs beyond tolerance.

    Example:
        >>> build_engine("r50.onnx", "r50.engine", precision="fp16")  # doctest: +SKIP
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if workspace_gib <= 0:
        raise ConfigError(f"--workspace must be positive (GiB), got {workspace_gib}")
    metadata = read_metadata(onnx_path)
    profile = profile_shapes(metadata, min_shape, opt_shape, max_shape)
    output = Path(output)
    trt = require_tensorrt()
    import torch

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        trt_profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path} (see its log above)")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(bytes(serialized))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    info: dict[str, Any] = {
        "onnx": str(onnx_path), "task": metadata["task"], "model_name": metadata.get("model_name"),
        "precision": precision, "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "workspace_gib": workspace_gib, "timing_cache": str(timing_cache) if timing_cache else None,
        "tensorrt_version": trt.__version__, "gpu": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "platform": platform.platform(), "build_seconds": round(time.perf_counter() - start, 1),
        "inputs": metadata.get("inputs"), "outputs": metadata.get("outputs"),
        "class_names": metadata.get("class_names"), "preprocessing": metadata.get("preprocessing"),
    }
    parity = None
    if verify:
        parity = verify_engine(output, onnx_path, metadata, profile, precision)
        info["parity"] = parity.to_dict()
    sidecar = output.with_name(output.name + ".json")
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return EngineResult(path=output, sidecar=sidecar, info=info, parity=parity)


def verify_engine(engine_path: Path, onnx_path: str | os.PathLike[str], metadata: dict[str, Any],
                  profile: dict[str, tuple[tuple[int, ...], ...]], precision: str) -> Any:
    """Compare the engine with onnxruntime on the parity pixels that fit the profile."""
    from insloc_hub.export.parity import ParityReport, Tolerance, compare_case, parity_inputs, photographs
    from insloc_hub.exported import ort_session

    task = metadata["task"]
    (input_name, (lo, _, hi)), = profile.items()
    output_names = [o["name"] for o in metadata["outputs"]]
    fixed = metadata["inputs"][0]["shape"]
    batch = fixed[0] if task != "detector" and isinstance(fixed[0], int) else None
    height = fixed[-2] if isinstance(fixed[-2], int) else None
    width = fixed[-1] if isinstance(fixed[-1], int) else None
    tol = Tolerance() if precision == "fp32" else Tolerance.for_half()
    report = ParityReport(task=f"{task} (TensorRT {precision} vs onnxruntime)", passed=True,
                          images=photographs()[1], tolerance=tol.__dict__)
    session = ort_session(onnx_path)
    runner = EngineRunner(engine_path)
    for label, pixels in parity_inputs(task, batch=batch, height=height, width=width):
        if not all(a <= s <= b for a, s, b in zip(lo, pixels.shape, hi)):
            report.cases.append({"case": label, "skipped": f"shape {list(pixels.shape)} outside the profile"})
            continue
        reference = dict(zip(output_names, session.run(output_names, {input_name: pixels})))
        got = runner.run({input_name: pixels})
        compare_case(report, label, task, reference, got, tol)
    report.passed = not report.failures
    if not report.passed:
        raise ExportError(f"{engine_path} differs from onnxruntime beyond tolerance:\n{report.summary()}")
    return report


class EngineRunner:
    """Run a serialized engine on numpy inputs with CUDA buffers from PyTorch (no pycuda needed)."""

    def __init__(self, engine_path: str | os.PathLike[str]) -> None:
        trt = require_tensorrt()
        import torch

        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT {trt.__version__} cannot load {engine_path} (built by another version/GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str) -> Any:
        return self.torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute once; outputs come back as numpy arrays (data-dependent shapes resolved)."""
        torch, trt = self.torch, self.trt
        stream = torch.cuda.Stream()
        keep = []
        for name in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        allocator = _OutputAllocator(trt, torch)
        static: dict[str, Any] = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if -1 in shape:  # known only after execution (e.g. number of detections)
                self.context.set_output_allocator(name, allocator)
            else:
                static[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                self.context.set_tensor_address(name, static[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed (see its log above)")
        stream.synchronize()
        results = {n: t.cpu().numpy() for n, t in static.items()}
        for name in self.outputs:
            if name not in static:
                shape = allocator.shapes[name]
                count = int(np.prod(shape)) if shape else 1
                buffer = allocator.buffers[name].view(self._torch_dtype(name))[:count]
                results[name] = buffer.reshape(shape).cpu().numpy()
        return results


def _OutputAllocator(trt: Any, torch: Any) -> Any:  # noqa: N802 - builds a subclass of a lazily imported base
    class OutputAllocator(trt.IOutputAllocator):
        """Gives TensorRT PyTorch-owned CUDA memory for outputs whose size is known only at run time."""

        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(shape)

    return OutputAllocator()
