"""ONNX, TensorRT and Triton export of insloc-hub models (installed as ``insloc_hub.export``)."""
