"""Backends without HTTP: the GPU precision path proven on the CPU, ONNX contract checks, user errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torchvision.ops import box_iou

from insloc_hub.errors import ConfigError
from insloc_hub.serve.backends import TorchBackend, load_backend
from tests.serve.contract_onnx import export_features


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::4, ::4])  # 128 x 128 RGB


def test_bf16_detector_path_keeps_boxes_in_float32(tiny_models, photo):
    torch.set_num_threads(1)
    fp32 = TorchBackend(str(tiny_models.detector), device="cpu", precision="fp32").detect([photo])[0]
    bf16_backend = TorchBackend(str(tiny_models.detector), device="cpu", precision="bf16")
    assert type(bf16_backend.model.backbone).__name__ == "Autocast"
    bf16 = bf16_backend.detect([photo])[0]
    assert bf16.boxes.dtype == np.float32 and len(bf16.boxes) > 0
    # the best fp32 boxes are found again under bf16 (same places, to a bf16 tolerance)
    iou = box_iou(torch.from_numpy(fp32.boxes[:5]), torch.from_numpy(bf16.boxes)).max(dim=1).values
    assert (iou > 0.7).float().mean() >= 0.6, iou


def test_bf16_backbone_embedding_close_to_fp32(tiny_models, photo):
    fp32 = TorchBackend(str(tiny_models.backbone), device="cpu", precision="fp32").embed([photo])[0]
    bf16 = TorchBackend(str(tiny_models.backbone), device="cpu", precision="bf16").embed([photo])[0]
    cosine = float(fp32 @ bf16 / np.linalg.norm(fp32) / np.linalg.norm(bf16))
    assert bf16.dtype == np.float32 and cosine > 0.99


def test_bad_model_specs_are_config_errors(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="onnxruntime"):
        load_backend(str(tiny_models.detector), backend="onnxruntime")
    with pytest.raises(ConfigError, match="does not exist"):
        load_backend(str(tmp_path / "missing.onnx"))
    with pytest.raises(ConfigError, match="precision"):
        load_backend(str(tiny_models.detector), precision="int4")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ConfigError, match="cannot load"):
        load_backend(str(tmp_path / "junk.onnx"))


def test_onnx_without_insloc_metadata_is_refused(tiny_models, tmp_path):
    from insloc_hub import from_pretrained

    path = export_features(from_pretrained(tiny_models.backbone), tmp_path / "f.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(ConfigError, match="insloc.task"):
        load_backend(str(path))


def test_served_names_and_aliases(tiny_models):
    backend = load_backend(f"my-detector={tiny_models.detector}", device="cpu")
    assert backend.info.name == "my-detector" and backend.info.tag == "my-detector@local"


def test_onnx_detector_reports_its_inference_options_and_the_local_revision(tiny_models, tiny_onnx, tmp_path):
    torch_info = load_backend(str(tiny_models.detector), device="cpu").info
    onnx_info = load_backend(str(tiny_onnx.detector), device="cpu", threads=1).info
    # the options /v1/models promises (score_thresh...) come from the file's metadata, as torch's from config.json
    assert onnx_info.inference == torch_info.inference
    assert onnx_info.inference["score_thresh"] == 0.0 and onnx_info.inference["min_size"] == 96
    assert onnx_info.revision == torch_info.revision == "local"
    assert onnx_info.tag == "tiny-detector@local"
    # files exported before the label was unified say "local folder": served as "local" too
    model = onnx.load(str(tiny_onnx.detector))
    for prop in model.metadata_props:
        if prop.key == "insloc.revision":
            prop.value = "local folder"
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert load_backend(str(tmp_path / "old.onnx"), device="cpu", threads=1).info.revision == "local"
