"""Every endpoint and format of insloc-serve, over real HTTP, with both backends and real third-party clients."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from insloc_hub import from_pretrained
from insloc_hub.serve.settings import Settings
from insloc_hub.transforms import normalize
from tests.serve.conftest import CLASS_NAMES, image_bytes
from tests.serve.contract_onnx import export_detector, export_features

DET, BB, DET_ONNX, BB_ONNX = "tiny-detector", "tiny-backbone", "tiny-detector-onnx", "tiny-backbone-onnx"


def _export(tiny_models, onnx_dir):
    """The .onnx files the onnxruntime backend serves: insloc-export's where installed, else a stand-in."""
    try:
        from insloc_hub.export import export_onnx
    except ImportError:
        return (export_detector(from_pretrained(tiny_models.detector), CLASS_NAMES, onnx_dir / "det.onnx"),
                export_features(from_pretrained(tiny_models.backbone), onnx_dir / "features.onnx"))
    # parity is insloc-export's own test; random tiny weights give tied scores that float noise reorders
    return (export_onnx(tiny_models.detector, onnx_dir / "det.onnx", task="detector", verify=False).path,
            export_onnx(tiny_models.backbone, onnx_dir / "features.onnx", task="features", verify=False).path)


@pytest.fixture(scope="module")
def server(tiny_models, start_server, tmp_path_factory):
    det_onnx, bb_onnx = _export(tiny_models, tmp_path_factory.mktemp("onnx"))
    settings = Settings(models=[str(tiny_models.detector), str(tiny_models.backbone), f"{DET_ONNX}={det_onnx}",
                                f"{BB_ONNX}={bb_onnx}"], max_batch_size=8, max_wait_ms=2)
    return start_server(settings)


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The same models run in-process: what the service must reproduce."""
    return from_pretrained(tiny_models.detector), from_pretrained(tiny_models.backbone)


def _array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _in_process_detections(detector, data: bytes) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = detector([torch.from_numpy(_array(data).copy()).permute(2, 0, 1).float() / 255])[0]
    return {k: v.numpy() for k, v in out.items()}


def _boxes(detections: list[dict]) -> np.ndarray:
    return np.array([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in detections]).reshape(-1, 4)


def test_health_ready_models_docs(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and sorted(ready.json()["models"]) == sorted([DET, BB, DET_ONNX, BB_ONNX])
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models[DET]["task"] == "detection" and models[DET]["classes"] == CLASS_NAMES
    assert len(models[DET]["sha256"]) == 64 and models[DET]["card_summary"]
    assert models[DET]["inference"]["min_size"] == 96 and models[DET]["inference"]["score_thresh"] == 0.0
    assert models[DET]["preprocessing"]["normalization"] == "model"
    assert models[BB]["preprocessing"]["normalization"] == "caller"
    assert models[BB]["task"] == "features" and models[BB]["embedding_dim"] == 128
    assert models[DET_ONNX]["backend"] == "onnxruntime" and models[DET_ONNX]["classes"] == CLASS_NAMES
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/detect", "/v1/features", "/v1/models", "/hf/{model_name}", "/v2/models/{model_name}/infer"} <= set(
        schema["paths"])
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("model", [DET, DET_ONNX])
def test_detect_raw_body_matches_the_model_in_process(server, reference, model):
    data = image_bytes(80, 60, "JPEG", seed=1)
    response = httpx.post(server.url + f"/v1/detect?model={model}", content=data,
                          headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"].startswith(f"{model}@")
    (result,) = body["results"]
    assert (result["width"], result["height"]) == (80, 60)
    assert set(body["timings"]) == {"decode_ms", "inference_ms", "total_ms"}
    expected = _in_process_detections(reference[0], data)
    assert len(result["detections"]) == len(expected["scores"]) > 0
    # original pixel coordinates, the model's own boxes (onnxruntime within float tolerance)
    np.testing.assert_allclose(_boxes(result["detections"]), expected["boxes"], atol=0.05)
    assert [d["label"] for d in result["detections"]] == [CLASS_NAMES[i - 1] for i in expected["labels"]]


def test_detect_multipart_several_images_and_options(server):
    files = [("image", ("a.png", image_bytes(80, 60, seed=2), "image/png")),
             ("image", ("b.jpg", image_bytes(50, 90, "JPEG", seed=3), "image/jpeg"))]
    response = httpx.post(server.url + "/v1/detect", files=files,
                          data={"model": DET, "score_threshold": "0.34", "max_detections": "3", "classes": "cat,dog"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["width"], r["height"]) for r in results] == [(80, 60), (50, 90)]
    for result in results:
        detections = result["detections"]
        assert len(detections) <= 3
        assert all(d["score"] >= 0.34 and d["label"] in ("cat", "dog") for d in detections)
        assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
        boxes = _boxes(detections)
        assert (boxes >= 0).all() and (boxes[:, 2] <= result["width"]).all() and (boxes[:, 3] <= result["height"]).all()


def test_detect_json_base64_and_data_url(server):
    data = image_bytes(64, 64, seed=4)
    encoded = base64.b64encode(data).decode()
    plain = httpx.post(server.url + "/v1/detect", json={"images": [encoded], "model": DET, "max_detections": 2})
    data_url = httpx.post(server.url + "/v1/detect", json={"image": "data:image/png;base64," + encoded, "model": DET,
                                                           "max_detections": 2})
    assert plain.status_code == data_url.status_code == 200, plain.text
    assert plain.json()["results"] == data_url.json()["results"]
    assert len(plain.json()["results"][0]["detections"]) == 2


def test_detect_annotated_png(server):
    data = image_bytes(80, 60, seed=5)
    response = httpx.post(server.url + f"/v1/detect?model={DET}&annotated=1&score_threshold=0.3", content=data)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    drawn = _array(response.content)
    assert drawn.shape == (60, 80, 3) and (drawn != _array(data)).any()  # boxes were drawn


@pytest.mark.parametrize("model", [BB, BB_ONNX])
def test_features_json_embedding_matches_in_process(server, reference, model):
    data = image_bytes(64, 48, seed=6)
    response = httpx.post(server.url + "/v1/features", json={"images": [base64.b64encode(data).decode()] * 2,
                                                             "model": model})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    tensor = torch.from_numpy(_array(data).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        expected = reference[1].forward_embedding(normalize(tensor))[0].numpy()
    for result in results:
        np.testing.assert_allclose(result["embedding"], expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model", [BB, BB_ONNX])
def test_features_safetensors_maps(server, model):
    from safetensors.numpy import load

    files = [("image", ("a.png", image_bytes(64, 64, seed=7))), ("image", ("b.png", image_bytes(96, 64, seed=8)))]
    response = httpx.post(server.url + f"/v1/features?model={model}", files=files,
                          headers={"accept": "application/octet-stream"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    maps = load(response.content)
    assert {"0.p2", "0.p5", "0.embedding", "1.p2", "1.embedding"} <= set(maps)
    assert maps["0.p2"].shape == (32, 16, 16) and maps["1.p2"].shape == (32, 16, 24)  # stride 4, original sizes
    assert maps["1.embedding"].shape == (128,)


def test_features_of_a_detector_is_a_clear_422(server):
    response = httpx.post(server.url + f"/v1/features?model={DET}", content=image_bytes())
    assert response.status_code == 422 and response.json()["error"]["code"] == "wrong_task"


@pytest.mark.parametrize("model", [DET, DET_ONNX])
def test_huggingface_inference_client_object_detection(server, model):
    from huggingface_hub import InferenceClient

    client = InferenceClient(server.url + f"/hf/{model}")
    data = image_bytes(80, 60, seed=9)
    everything = client.object_detection(data)
    assert everything and all(d.label in CLASS_NAMES for d in everything)
    threshold = float(np.median([d.score for d in everything]))
    confident = client.object_detection(data, threshold=threshold)
    assert 0 < len(confident) < len(everything) and all(d.score >= threshold for d in confident)
    assert 0 <= everything[0].box.xmin < everything[0].box.xmax <= 80


def test_huggingface_inference_client_feature_extraction(server, reference):
    from huggingface_hub import InferenceClient

    data = image_bytes(64, 64, seed=10)
    embedding = InferenceClient(server.url + f"/hf/{BB}").feature_extraction(base64.b64encode(data).decode())
    tensor = torch.from_numpy(_array(data).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        expected = reference[1].forward_embedding(normalize(tensor)).numpy()
    assert embedding.shape == (1, 128)
    np.testing.assert_allclose(embedding, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary-data-extension"])
def test_tritonclient_http_detector(server, reference, binary):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(DET)
    metadata = client.get_model_metadata(DET)
    assert metadata["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "boxes", "datatype": "FP32", "shape": [-1, 4]} in metadata["outputs"]
    images = [image_bytes(80, 60, seed=11), image_bytes(40, 70, "JPEG", seed=12)]
    tensor = triton.InferInput("images", [2], "BYTES")
    values = images if binary else [base64.b64encode(x) for x in images]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("boxes", "scores", "labels",
                                                                            "label_names", "batch_index")]
    result = client.infer(DET, [tensor], outputs=outputs)
    for index, data in enumerate(images):
        expected = _in_process_detections(reference[0], data)
        mine = result.as_numpy("batch_index") == index
        np.testing.assert_allclose(result.as_numpy("boxes")[mine], expected["boxes"], atol=0.05)
        np.testing.assert_array_equal(result.as_numpy("labels")[mine], expected["labels"])
    names = [n.decode() if isinstance(n, bytes) else n for n in result.as_numpy("label_names")]
    assert set(names) <= set(CLASS_NAMES)


def test_tritonclient_http_embedding_default_outputs(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton.InferInput("images", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([image_bytes(64, 64, seed=s) for s in range(3)], dtype=object))
    result = client.infer(BB, [tensor])  # no outputs named: all of them, binary (binary_data_output)
    assert result.as_numpy("embedding").shape == (3, 128)


def test_v2_plain_http_routes(server):
    assert httpx.get(server.url + "/v2").json()["extensions"] == ["binary_tensor_data"]
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + f"/v2/models/{BB}").json()["outputs"][0]["shape"] == [-1, 128]
    missing = httpx.get(server.url + "/v2/models/nope")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)
    bad = httpx.post(server.url + f"/v2/models/{DET}/infer", json={"inputs": [{"name": "images", "datatype": "FP32",
                                                                                "shape": [1], "data": [1.0]}]})
    assert bad.status_code == 400 and "BYTES" in bad.json()["error"]


def test_metrics_count_requests_by_route_and_status(server):
    httpx.post(server.url + f"/v1/detect?model={DET}", content=b"not an image")
    text = httpx.get(server.url + "/metrics").text
    assert 'insloc_requests_total{method="POST",route="/v1/detect",status="200"}' in text
    assert 'insloc_requests_total{method="POST",route="/v1/detect",status="415"}' in text
    assert "insloc_request_latency_seconds_bucket" in text and "insloc_batch_size_bucket" in text
    assert 'insloc_queue_depth{model="tiny-detector"}' in text and "insloc_images_per_second" in text
