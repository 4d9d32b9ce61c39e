"""Backends without HTTP: the GPU precision path proven on the CPU, ONNX contract checks, user errors."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from insloc_hub import from_pretrained
from insloc_hub.errors import ConfigError, ImageGeometryError
from insloc_hub.serve.backends import TorchBackend, load_backend
from insloc_hub.transforms import normalize
from tests.serve.conftest import image_bytes
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
    path = export_features(from_pretrained(tiny_models.backbone), tmp_path / "f.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(ConfigError, match="insloc.task"):
        load_backend(str(path))


def test_served_names_and_aliases(tiny_models):
    backend = load_backend(f"my-detector={tiny_models.detector}", device="cpu")
    assert backend.info.name == "my-detector" and backend.info.tag == "my-detector@local"


def test_torch_detector_reports_the_options_it_runs_with_not_an_edited_record(tiny_models, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_models.detector, folder)
    config = json.loads((folder / "config.json").read_text())
    config["detector"]["inference"]["score_thresh"] = 0.5  # a record only: the weights' sha256 does not cover it
    (folder / "config.json").write_text(json.dumps(config))
    backend = load_backend(str(folder), device="cpu")
    assert backend.info.inference["score_thresh"] == backend.model.roi_heads.score_thresh
    assert backend.info.inference == load_backend(str(tiny_models.detector), device="cpu").info.inference


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


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def test_fixed_shape_embedding_graph_runs_any_count_and_size(tiny_models, tiny_onnx):
    # exported as README shows for TensorRT/Triton: --task embedding --batch 4 --height 64 --width 64
    backend = load_backend(str(tiny_onnx.embedding_fixed), device="cpu", threads=1)
    assert backend.info.input["fixed_batch"] == 4 and backend.info.input["fixed_size"] == [64, 64]
    assert "resized to 64x64" in backend.info.input["resize"]  # clients can read what the server does
    backend.warmup()  # one 64x64 image in a batch-4 graph
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
              ((64, 64), (48, 80), (100, 30), (64, 64), (33, 47), (70, 70))]  # 6 images: chunks of 4, 2 padded
    served = backend.embed(images)
    assert len(served) == 6 and all(e.shape == (128,) for e in served)
    model = from_pretrained(tiny_models.backbone)
    batch = torch.stack([torch.from_numpy(_resized(im, 64, 64).copy()).permute(2, 0, 1) for im in images])
    with torch.inference_mode():
        expected = model.forward_embedding(normalize(batch.float() / 255)).numpy()
    np.testing.assert_allclose(np.stack(served), expected, rtol=1e-4, atol=1e-4)
    # each image's answer does not depend on what it was batched (or padded) with
    np.testing.assert_allclose(backend.embed([images[5]])[0], served[5], rtol=1e-5, atol=1e-5)


def test_fixed_shape_features_graph_answers_maps_of_the_resized_image(tiny_onnx):
    backend = load_backend(str(tiny_onnx.features_fixed), device="cpu", threads=1)
    backend.warmup()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 40), (64, 96), (90, 50))]
    maps = backend.features(images)
    assert len(maps) == 3 and all(m["p2"].shape == (32, 16, 24) and m["embedding"].shape == (128,) for m in maps)


def test_fixed_size_detector_graph_is_refused_at_load_with_how_to_reexport(tiny_onnx):
    with pytest.raises(ConfigError) as caught:
        load_backend(str(tiny_onnx.detector_fixed), device="cpu", threads=1)
    message = str(caught.value)
    assert "fixed input shape [3, 96, 128]" in message and "insloc-export onnx" in message
    assert "no --height/--width" in message and "\n" not in message


def test_server_with_a_fixed_shape_graph_becomes_ready_and_answers(tiny_onnx, start_server):
    from insloc_hub.serve.settings import Settings

    server = start_server(Settings(models=[f"emb={tiny_onnx.embedding_fixed}", f"det={tiny_onnx.detector}"]))
    response = httpx.post(server.url + "/v1/features?model=emb", content=image_bytes(90, 40))
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["width"], result["height"]) == (90, 40) and len(result["embedding"]) == 128
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["emb"]["input"]["fixed_size"] == [64, 64] and models["emb"]["input"]["fixed_batch"] == 4
    assert httpx.post(server.url + "/v1/detect?model=det", content=image_bytes()).status_code == 200


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_thin_images_are_refused_before_inference_with_what_to_do(tiny_models, tiny_onnx, kind):
    spec = str(tiny_models.detector) if kind == "torch" else str(tiny_onnx.detector)
    backend = load_backend(spec, device="cpu", threads=1)
    ok = np.full((40, 60, 3), 100, np.uint8)
    for height, width in ((1, 3000), (3000, 1), (23, 3000)):  # max_size 128: 3000/128 needs 24 px
        with pytest.raises(ImageGeometryError) as caught:
            backend.detect([ok, np.full((height, width, 3), 100, np.uint8)])
        message = str(caught.value)
        assert caught.value.index == 1 and message.startswith(f"image 1 is {width}x{height} pixels")
        assert "at least 24 px" in message and "crop" in message
    # the limit is exact: the thinnest image the resize keeps at 1 px still runs
    assert len(backend.detect([np.full((24, 3000, 3), 100, np.uint8), np.full((1, 128, 3), 9, np.uint8)])) == 2


def test_thin_image_is_422_naming_its_index_over_http(tiny_models, start_server):
    from insloc_hub.serve.settings import Settings

    server = start_server(Settings(models=[str(tiny_models.detector)]))
    files = [("image", ("a.png", image_bytes())), ("image", ("b.png", image_bytes(3000, 1)))]
    response = httpx.post(server.url + "/v1/detect", files=files)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_image_size" and error["message"].startswith("image 1 is 3000x1 pixels")
    assert "Input and output sizes" not in error["message"]  # no raw torch text
    assert httpx.post(server.url + "/v1/detect", content=image_bytes()).status_code == 200
