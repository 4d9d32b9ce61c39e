"""insloc-export onnx: graphs that take pixels, match PyTorch, carry their metadata and fail loudly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from insloc_hub import from_pretrained
from insloc_hub.errors import ConfigError, ExportError, MissingDependencyError
from insloc_hub.export import export_onnx, match_detections, ort_session, read_metadata
from insloc_hub.export.cli import main
from insloc_hub.export.parity import Tolerance
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import read_config
from insloc_hub.transforms import IMAGENET_MEAN, IMAGENET_STD

from .conftest import world_readable


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels).float() / 255 - mean) / std


def test_features_graph_takes_pixels_and_matches_the_backbone_at_any_batch_and_size(
        features_onnx: Path, tiny_fpn_folder: Path) -> None:
    model = from_pretrained(tiny_fpn_folder)
    session = ort_session(features_onnx, threads=1)
    rng = np.random.default_rng(1)
    for batch, height, width in ((1, 96, 128), (3, 160, 72)):
        pixels = rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": pixels})))
        with torch.no_grad():  # the client sent raw pixels; the graph normalised them itself
            expected = model.forward_features(_normalised(pixels))
            embedding = model.forward_embedding(_normalised(pixels))
        assert list(got) == ["p2", "p3", "p4", "p5", "embedding"]
        for name in ("p2", "p3", "p4", "p5"):
            assert got[name].shape == tuple(expected[name].shape)
            np.testing.assert_allclose(got[name], expected[name].numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got["embedding"], embedding.numpy(), rtol=1e-3, atol=1e-4)
    # idle onnxruntime workers must not spin on the cores PyTorch (or another request) needs
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # true symbolic shapes: each level has its own height expression, not one shared name
    dims = [o.shape for o in session.get_outputs()]
    assert dims[0][0] == "batch" and len({str(d[2]) for d in dims[:4]}) == 4


def test_features_metadata_follows_the_contract(features_onnx: Path, tiny_fpn_folder: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    meta = read_metadata(features_onnx)
    config = read_config(tiny_fpn_folder)
    assert meta["task"] == "features"
    assert meta["weights_sha256"] == config["weights"]["sha256"]
    assert meta["model_name"] == str(tiny_fpn_folder) and meta["revision"] == "local"
    assert meta["arch"] == "tiny-fpn"
    assert meta["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["batch", 3, "height", "width"]}]
    assert [o["name"] for o in meta["outputs"]] == ["p2", "p3", "p4", "p5", "embedding"]
    assert meta["outputs"][-1]["shape"] == ["batch", 128]
    assert meta["preprocessing"]["normalization"] == "graph"
    assert meta["preprocessing"]["mean"] == list(IMAGENET_MEAN)
    assert "dynamo" in meta["exporter"] and meta["opset"] == "18"
    assert meta["parity"]["passed"] is True and len(meta["parity"]["cases"]) == 3
    assert world_readable(features_onnx)
    onnx.checker.check_model(onnx.load(str(features_onnx)))
    assert main(["inspect", str(features_onnx)]) == 0
    printed = capsys.readouterr().out
    assert "task: features" in printed and "parity: passed" in printed and "images: uint8" in printed
    assert main(["inspect", str(features_onnx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == config["weights"]["sha256"]


def test_c4_embedding_with_fixed_batch_size_and_opset_17(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InsLocBackbone("tiny-c4").eval()
    out = tmp_path / "c4.onnx"
    result = export_onnx(model, out, task="embedding", batch=2, height=96, width=128, opset=17, threads=1)
    assert result.parity.passed
    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert result.metadata["inputs"][0]["shape"] == [2, 3, 96, 128]
    assert result.metadata["outputs"] == [{"name": "embedding", "dtype": "float32", "shape": [2, model.embedding_dim]}]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 96, 128), dtype=np.uint8)
    (got,) = ort_session(out, threads=1).run(None, {"images": pixels})
    with torch.no_grad():
        np.testing.assert_allclose(got, model.forward_embedding(_normalised(pixels)).numpy(), rtol=1e-3, atol=1e-4)


def test_half_embedding_runs_in_float16_within_the_half_tolerance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = export_onnx(InsLocBackbone("tiny-fpn"), tmp_path / "half.onnx", task="embedding", half=True,
                         batch=1, height=64, width=64, threads=1)
    assert result.metadata["precision"] == "float16"
    assert result.metadata["outputs"] == [{"name": "embedding", "dtype": "float16", "shape": [1, 128]}]
    worst = max(o["max_rel"] for case in result.parity.cases for o in case["outputs"].values())
    assert 0 < worst < Tolerance.for_half().feature_rel  # compared with the float32 model


def test_resnet50_features_export_dynamic_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = export_onnx(InsLocBackbone("r50-fpn"), tmp_path / "r50.onnx", threads=1)
    assert result.parity.passed
    assert result.metadata["arch"] == "r50-fpn"
    assert result.metadata["outputs"][0]["shape"][:2] == ["batch", 256]
    assert result.metadata["outputs"][-1]["shape"] == ["batch", 2048]
    worst = max(o["max_rel"] for case in result.parity.cases for o in case["outputs"].values())
    assert worst < 1e-3


@pytest.mark.parametrize("arch", ["faster_rcnn_fpn", "mask_rcnn_fpn", "faster_rcnn_c4", "retinanet_fpn"])
def test_every_detector_exports_with_postprocessing_inside(arch: str, detector_folders: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out = tmp_path / f"{arch}.onnx"
    result = export_onnx(detector_folders[arch], out, threads=1)
    meta = read_metadata(out)
    names = ["boxes", "labels", "scores"] + (["masks"] if arch == "mask_rcnn_fpn" else [])
    assert result.task == "detector" and meta["arch"] == arch
    assert meta["class_names"] == ["cat", "mug"]
    assert meta["inputs"] == [{"name": "image", "dtype": "uint8", "shape": [3, "height", "width"]}]
    assert [o["name"] for o in meta["outputs"]] == names
    assert meta["options"]["min_size"] == 128 and meta["options"]["max_size"] == 192
    assert meta["options"] == read_config(detector_folders[arch])["detector"]["inference"]  # CONTRACT part 1
    assert "TorchScript" in meta["exporter"]
    assert meta["parity"]["passed"] and all(c["torch"] > 0 for c in meta["parity"]["cases"])
    if arch == "mask_rcnn_fpn":
        assert meta["outputs"][3]["shape"] == ["detections", 1, "height", "width"]
    # a size the parity check did not use; boxes come back in this image's pixels
    pixels = np.random.default_rng(3).integers(0, 256, (3, 150, 230), dtype=np.uint8)
    got = dict(zip(names, ort_session(out, threads=1).run(None, {"image": pixels})))
    detector = from_pretrained(detector_folders[arch])
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in detector([torch.from_numpy(pixels).float() / 255])[0].items()}
    figures = match_detections(expected, got)
    assert figures["torch"] > 0 and figures["match_rate"] >= 0.95 and figures["label_agreement"] == 1.0
    assert got["boxes"][:, 2].max() <= 230 and got["boxes"][:, 3].max() <= 150
    if arch == "mask_rcnn_fpn":
        assert got["masks"].shape[1:] == (1, 150, 230)


def test_fixed_size_mask_rcnn_and_verify_onnx_reads_sizes_from_the_graph(tmp_path: Path) -> None:
    from insloc_hub import build_detector
    from insloc_hub.export import verify_onnx
    from insloc_hub.export.wrappers import PixelDetector

    torch.manual_seed(0)
    model = build_detector("mask_rcnn_fpn", class_names=["cat"], preset="tiny-fpn", min_size=96, max_size=128,
                           box_detections_per_img=5)
    out = tmp_path / "fixed.onnx"
    result = export_onnx(model, out, height=120, width=160, verify=False)
    assert result.metadata["inputs"][0]["shape"] == [3, 120, 160]
    assert result.metadata["outputs"][3]["shape"] == ["detections", 1, 120, 160]
    report = verify_onnx(out, PixelDetector(model, with_masks=True).eval(), "detector", threads=1)
    assert report.passed and [c["case"] for c in report.cases] == ["photo 1 120x160", "photo 2 120x160",
                                                                  "random 120x160"]


def test_detector_with_zero_detections(tmp_path: Path) -> None:
    from insloc_hub import build_detector

    torch.manual_seed(0)
    model = build_detector("faster_rcnn_fpn", class_names=["cat"], preset="tiny-fpn", min_size=128, max_size=192,
                           box_score_thresh=0.999)
    out = tmp_path / "none.onnx"
    result = export_onnx(model, out, threads=1)
    assert all(c["torch"] == 0 and c["onnx"] == 0 for c in result.parity.cases)
    boxes, labels, scores = ort_session(out, threads=1).run(None, {"image": np.zeros((3, 100, 90), np.uint8)})
    assert boxes.shape == (0, 4) and labels.shape == (0,) and scores.shape == (0,)
    assert labels.dtype == np.int64 and boxes.dtype == np.float32


def test_parity_beyond_tolerance_fails_the_export_with_figures(features_onnx: Path, tmp_path: Path) -> None:
    from insloc_hub import build_detector
    from insloc_hub.export import verify_onnx
    from insloc_hub.export.wrappers import PixelBackbone

    torch.manual_seed(1)  # the exported folder was initialised from seed 0
    other = InsLocBackbone("tiny-fpn").eval()  # not the weights that were exported
    reference = PixelBackbone(other, ["p2", "p3", "p4", "p5", "embedding"], IMAGENET_MEAN, IMAGENET_STD)
    names = ["p2", "p3", "p4", "p5", "embedding"]
    with pytest.raises(ExportError, match=r"beyond tolerance(.|\n)*max rel diff"):
        verify_onnx(features_onnx, reference, "features", output_names=names, input_name="images", threads=1)
    # through export_onnx: the figures are in the error and no unverified file is left behind
    detector = build_detector("faster_rcnn_fpn", class_names=["cat"], preset="tiny-fpn", min_size=128,
                              max_size=192, box_detections_per_img=10)
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match=r"matched 10 of torch 10 / onnx 10 .*< 1.01") as info:
        export_onnx(detector, out, tolerance=Tolerance(match_rate=1.01), threads=1)  # a rate no export can reach
    assert "photo 1 512x512: torch=10, onnx=10, matched=10" in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_matching_is_by_iou_not_by_index() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 50, 60]], np.float32)
    ref = {"boxes": boxes, "labels": np.array([1, 2, 1]), "scores": np.array([0.9, 0.8, 0.7], np.float32)}
    order = [2, 0, 1]  # near-tied scores reorder between runtimes
    shuffled = {"boxes": boxes[order] + 0.1, "labels": ref["labels"][order], "scores": ref["scores"][order] + 1e-4}
    figures = match_detections(ref, shuffled)
    assert figures["matched"] == 3 and figures["label_agreement"] == 1.0 and figures["max_score_diff"] < 2e-4
    missing = {k: v[:2] for k, v in shuffled.items()}
    assert match_detections(ref, missing)["match_rate"] == pytest.approx(2 / 3)
    relabelled = dict(shuffled, labels=np.array([2, 2, 2]))
    assert match_detections(ref, relabelled)["label_agreement"] == pytest.approx(1 / 3)
    empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "scores": np.zeros(0, np.float32)}
    assert match_detections(empty, empty)["match_rate"] == 1.0


def test_cli_no_verify_message(tiny_fpn_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.onnx"
    assert main(["onnx", str(tiny_fpn_folder), "-o", str(out), "--task", "embedding", "--no-verify",
                 "--batch", "1", "--height", "64", "--width", "64"]) == 0
    printed = capsys.readouterr().out
    assert "parity: NOT verified (--no-verify)" in printed
    assert "input  images: uint8 [1, 3, 64, 64]" in printed
    assert read_metadata(out)["parity"] == {"verified": False, "reason": "exported with --no-verify (verify=False)"}


@pytest.mark.parametrize("args, message", [
    (["no-such-model-anywhere"], "no-such-model-anywhere"),
    (["{tiny}", "--task", "detector"], "is a backbone (task: backbone), not a detector"),
    (["{det}", "--task", "features"], "is a detection model; export it with --task detector"),
    (["{det}", "--batch", "4"], "detector graphs take one image"),
    (["{tiny}", "--height", "64"], "give both --height and --width"),
    (["{tiny}", "--batch", "0"], "batch must be between 1 and"),
    (["{tiny}", "--height", "64", "--width", "64", "--dynamic-size"], "--dynamic-size contradicts"),
])
def test_user_errors_are_one_line(args: list[str], message: str, tiny_fpn_folder: Path,
                                  detector_folders: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(tiny=tiny_fpn_folder, det=detector_folders["faster_rcnn_fpn"]) for a in args]
    out = tmp_path / "x.onnx"
    assert main(["onnx", *args[:1], "--output", str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("insloc-export onnx: error:") and message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_output(tiny_fpn_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["onnx", str(tiny_fpn_folder), "--output", str(blocker / "x.onnx")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["onnx", str(tiny_fpn_folder), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_missing_onnxruntime_names_the_install(tiny_fpn_folder: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'insloc-hub\[onnxruntime\]'"):
        export_onnx(tiny_fpn_folder, tmp_path / "x.onnx")
    assert main(["onnx", str(tiny_fpn_folder), "--output", str(tmp_path / "x.onnx")]) == 2
    assert "--no-verify" in capsys.readouterr().err


def test_inspect_refuses_foreign_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(plain))
    with pytest.raises(ConfigError, match="not written by insloc-export"):
        read_metadata(plain)
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    assert main(["inspect", str(tmp_path / "junk.onnx")]) == 2
    assert main(["inspect", str(tmp_path / "absent.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hub_repo_at_revision(hub_env, tmp_path: Path) -> None:
    from insloc_hub import push_to_hub

    torch.manual_seed(4)
    first = push_to_hub(InsLocBackbone("tiny-fpn"), "team/tiny-export")
    push_to_hub(InsLocBackbone("tiny-fpn"), "team/tiny-export", commit_message="newer weights")
    out = tmp_path / "hub.onnx"
    assert main(["onnx", "team/tiny-export", "--revision", first, "-o", str(out), "--task", "embedding",
                 "--no-verify", "--batch", "1", "--height", "64", "--width", "64"]) == 0
    meta = read_metadata(out)
    expected = read_config(from_pretrained("team/tiny-export", revision=first).hub_folder)["weights"]["sha256"]
    assert meta["model_name"] == "team/tiny-export" and meta["revision"] == first
    assert meta["weights_sha256"] == expected
    assert expected != read_config(from_pretrained("team/tiny-export").hub_folder)["weights"]["sha256"]
