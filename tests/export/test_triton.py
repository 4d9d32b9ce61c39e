"""insloc-export triton: the model repository parses and names the model's real tensors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from insloc_hub import build_detector
from insloc_hub.errors import ConfigError
from insloc_hub.export import export_onnx, ort_session
from insloc_hub.export.cli import main


def _model_config_class() -> type:
    """Triton's ModelConfig protobuf, from tritonclient's generated module (needs protobuf only, not grpc)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or spec.origin is None:
        pytest.fail("tritonclient is a dev dependency: pip install 'tritonclient[http]'")
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


@pytest.fixture(scope="module")
def graphs(features_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton-onnx")
    torch.manual_seed(0)
    detector = build_detector("mask_rcnn_fpn", class_names=["cat", "mug"], preset="tiny-fpn", min_size=96,
                              max_size=128, box_detections_per_img=5)
    return {"features": features_onnx, "detector": export_onnx(detector, root / "det.onnx", verify=False).path}


def _check_tensors(entries: list, real: list, batched: bool) -> None:
    """Each config tensor is a real tensor of the model with consistent dims (-1 where dynamic)."""
    assert [e.name for e in entries] == [r.name for r in real]
    for entry, tensor in zip(entries, real):
        shape = tensor.shape[1:] if batched else tensor.shape
        assert list(entry.dims) == [d if isinstance(d, int) else -1 for d in shape]


def test_features_repository_batches_dynamically(graphs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "models"
    assert main(["triton", str(graphs["features"]), "--repository", str(repo), "--name", "insloc-tiny",
                 "--max-batch-size", "16", "--instances", "2", "--kind", "cpu"]) == 0
    assert f"tritonserver --model-repository {repo.resolve()}" in capsys.readouterr().out
    config = text_format.Parse((repo / "insloc-tiny" / "config.pbtxt").read_text(), _model_config_class()())
    model_file = repo / "insloc-tiny" / "1" / "model.onnx"
    session = ort_session(model_file, threads=1)
    assert config.name == "insloc-tiny" and config.backend == "onnxruntime"
    assert config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 2  # KIND_CPU
    _check_tensors(config.input, session.get_inputs(), batched=True)
    _check_tensors(config.output, session.get_outputs(), batched=True)
    assert config.input[0].data_type == 2  # TYPE_UINT8
    preprocessing = json.loads(config.parameters["insloc.preprocessing"].string_value)
    assert preprocessing["normalization"] == "graph"
    # the copied graph runs with a Triton-formed batch
    outputs = session.run(None, {"images": np.zeros((3, 3, 64, 64), np.uint8)})
    assert outputs[-1].shape[0] == 3


def test_detector_repository_takes_one_image_per_request(graphs: dict[str, Path], tmp_path: Path) -> None:
    from insloc_hub.export.triton import write_triton_repository

    folder = write_triton_repository(graphs["detector"], tmp_path / "models")
    config = text_format.Parse((folder / "config.pbtxt").read_text(), _model_config_class()())
    session = ort_session(folder / "1" / "model.onnx", threads=1)
    assert folder.name == "det" and config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    _check_tensors(config.input, session.get_inputs(), batched=False)
    _check_tensors(config.output, session.get_outputs(), batched=False)
    assert [o.name for o in config.output] == ["boxes", "labels", "scores", "masks"]
    assert json.loads(config.parameters["insloc.class_names"].string_value) == ["cat", "mug"]
    assert config.instance_group[0].kind == 0  # KIND_AUTO


def test_bad_repository_arguments(graphs: dict[str, Path], tmp_path: Path) -> None:
    from insloc_hub.export.triton import write_triton_repository

    with pytest.raises(ConfigError, match="model name"):
        write_triton_repository(graphs["features"], tmp_path, name="bad name/with slash")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write the model repository"):
        write_triton_repository(graphs["features"], blocker, name="m")
