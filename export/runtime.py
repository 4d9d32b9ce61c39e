"""onnxruntime sessions, created the same way by parity checks, benchmarks and serving."""

from __future__ import annotations

import os
from typing import Any

from insloc_hub.errors import MissingDependencyError

ORT_INSTALL = "pip install 'insloc-hub[onnxruntime]' (or 'insloc-hub[onnxruntime-gpu]' for CUDA)"


def import_onnxruntime() -> Any:
    """``import onnxruntime``, or a :class:`MissingDependencyError` that says what to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"onnxruntime is not installed; it runs exported graphs and checks their parity: {ORT_INSTALL}. "
            "To export without the check, pass --no-verify (verify=False)."
        ) from exc
    return onnxruntime


def ort_session(path: str | os.PathLike[str], *, threads: int | None = None, providers: list[str] | None = None,
                spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``path``.

    Args:
        threads: intra-op threads (default: onnxruntime's, one per core).
        providers: execution providers (default: CUDA when available, then CPU).
        spinning: let idle worker threads spin. Off by default: spinning threads steal the cores a
            PyTorch model (or another request) in the same process needs.
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: shape-inference warnings on dynamic dims are expected
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)
