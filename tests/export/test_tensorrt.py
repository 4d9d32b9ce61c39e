"""insloc-export tensorrt: what can be checked without a GPU (no TensorRT or GPU exists on CI)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from insloc_hub.errors import ConfigError, MissingDependencyError
from insloc_hub.export.cli import main
from insloc_hub.export.tensorrt import build_engine, profile_shapes

FEATURES = {"task": "features", "inputs": [{"name": "images", "dtype": "uint8",
                                            "shape": ["batch", 3, "height", "width"]}]}
DETECTOR = {"task": "detector", "inputs": [{"name": "image", "dtype": "uint8", "shape": [3, "height", "width"]}]}


def test_default_profiles_keep_fixed_dims_and_cover_dynamic_ones() -> None:
    assert profile_shapes(FEATURES)["images"] == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 1024, 1024))
    assert profile_shapes(DETECTOR)["image"] == ((3, 320, 320), (3, 800, 800), (3, 1344, 1344))
    fixed = {"task": "features", "inputs": [{"name": "images", "dtype": "uint8", "shape": [4, 3, 256, 256]}]}
    assert set(profile_shapes(fixed)["images"]) == {(4, 3, 256, 256)}
    given = profile_shapes(FEATURES, "1x3x128x128", "4x3x256x256", "16x3x512x512")["images"]
    assert given == ((1, 3, 128, 128), (4, 3, 256, 256), (16, 3, 512, 512))


@pytest.mark.parametrize("shapes, message", [
    (("1x3x128", None, None), "has 3 dims"),
    (("1x4x128x128", None, None), "the graph fixes it to 3"),
    (("64x3x224x224", None, None), "min <= opt <= max"),
    (("1x3xabcx224", None, None), "write it like 1x3x224x224"),
])
def test_bad_profiles_are_explained(shapes: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        profile_shapes(FEATURES, *shapes)


def _features_file(tmp_path: Path) -> Path:
    """A minimal insloc-export file (metadata only matters before TensorRT is needed)."""
    import onnx

    from insloc_hub.export.metadata import set_metadata

    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["embedding"])], "g",
                                   [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.UINT8, [1, 3])],
                                   [onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.UINT8, [1, 3])])
    model = onnx.helper.make_model(graph)
    set_metadata(model, {**FEATURES, "outputs": [{"name": "embedding", "dtype": "uint8", "shape": [1, 3]}]})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_without_tensorrt_the_command_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without the wheels
    onnx_file = _features_file(tmp_path)
    assert main(["tensorrt", str(onnx_file), "--output", str(tmp_path / "m.engine")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed: pip install 'insloc-hub[tensorrt]'" in err
    assert "tensorrt-cu12" in err and "NVIDIA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_without_a_gpu_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="TensorRT 10.16.1 is installed but no CUDA GPU is visible"):
        build_engine(_features_file(tmp_path), tmp_path / "m.engine")


def test_argument_errors_come_before_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--workspace must be positive"):
        build_engine(_features_file(tmp_path), tmp_path / "e", workspace_gib=0)
    assert main(["tensorrt", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_tensorrt_extra_names_installable_tensorrt_10_wheels() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["tensorrt"]
    assert {r.split(">")[0] for r in extra} == {"tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu12-bindings"}
    assert all(">=10.0,<11" in r for r in extra)  # the API build_engine uses
