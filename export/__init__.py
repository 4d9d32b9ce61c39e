"""ONNX, TensorRT and Triton export of insloc-hub models (installed as ``insloc_hub.export``).

Example:
    >>> from insloc_hub.export import export_onnx, read_metadata
    >>> result = export_onnx("insloc-r50", "r50.onnx", task="features")  # doctest: +SKIP
    >>> read_metadata("r50.onnx")["outputs"][0]["name"]  # doctest: +SKIP
    'p2'
"""

from insloc_hub.export.metadata import read_metadata
from insloc_hub.export.onnx_export import ExportResult, export_onnx
from insloc_hub.export.parity import ParityReport, Tolerance, match_detections, verify_onnx
from insloc_hub.exported import ort_session

__all__ = ["ExportResult", "ParityReport", "Tolerance", "export_onnx", "match_detections", "ort_session",
           "read_metadata", "verify_onnx"]
