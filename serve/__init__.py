"""The FastAPI detection and feature-extraction service (installed as ``insloc_hub.serve``)."""
