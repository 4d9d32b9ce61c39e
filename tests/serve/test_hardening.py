"""The service's edge: every bad input is a 4xx in the one error shape, and the service stays up."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from insloc_hub.serve.backends import Backend, Detections, ModelInfo
from insloc_hub.serve.settings import Settings
from tests.serve.conftest import image_bytes

LIMITS = {"max_body_bytes": 300_000, "max_pixels": 500_000, "max_images": 3}


@pytest.fixture(scope="module")
def server(tiny_models, start_server):
    return start_server(Settings(models=[str(tiny_models.detector)], **LIMITS))


def _error(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _big_png(width: int, height: int) -> bytes:
    """A large-dimension image that compresses to a few kB (a decompression bomb in miniature)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_only_model_is_the_default(server):
    assert httpx.post(server.url + "/v1/detect", content=image_bytes()).status_code == 200


def test_body_over_the_limit_is_413_whether_declared_or_streamed(server):
    big = b"\xff" * 400_000
    _error(httpx.post(server.url + "/v1/detect", content=big), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b"\x00" * 10_000

    _error(httpx.post(server.url + "/v1/detect", content=chunks()), 413, "body_too_large")


def test_pixel_limit_is_413_before_decoding(server):
    bomb = _big_png(1000, 1000)
    assert len(bomb) < 50_000
    message = _error(httpx.post(server.url + "/v1/detect", content=bomb), 413, "image_too_large")
    assert "image 0" in message and "pixels" in message


def test_non_image_is_415(server):
    _error(httpx.post(server.url + "/v1/detect", content=b"hello, not an image", headers={"content-type": "image/png"}),
           415, "unsupported_image")
    _error(httpx.post(server.url + "/v1/detect", content=b"text", headers={"content-type": "text/plain"}),
           415, "unsupported_media_type")


def test_truncated_image_is_400_naming_its_index(server):
    good, jpeg = image_bytes(), image_bytes(fmt="JPEG", seed=1)
    files = [("image", ("a.png", good)), ("image", ("b.jpg", jpeg[: len(jpeg) // 2]))]
    message = _error(httpx.post(server.url + "/v1/detect", files=files), 400, "corrupt_image")
    assert message.startswith("image 1")


def test_bad_json_base64_and_options_are_422(server):
    url = server.url + "/v1/detect"
    _error(httpx.post(url, content=b'{"images": [', headers={"content-type": "application/json"}), 422, "invalid_json")
    _error(httpx.post(url, json={"images": ["%%%not base64"]}), 422, "invalid_base64")
    _error(httpx.post(url, json={"pictures": []}), 422, "no_images")
    _error(httpx.post(url, json=[1, 2]), 422, "invalid_json")
    encoded = base64.b64encode(image_bytes()).decode()
    for options in ({"score_threshold": 2}, {"score_threshold": "high"}, {"max_detections": -1},
                    {"max_detections": 1.5}, {"classes": ["unicorn"]}, {"colour": "red"}):
        _error(httpx.post(url, json={"images": [encoded], **options}), 422, "invalid_option")
    _error(httpx.post(url + "?score_threshold=nan", content=image_bytes()), 422, "invalid_option")


def test_file_paths_and_urls_are_never_read(server):
    for path in ("/etc/passwd", "file:///etc/hosts", "../../config.json", "https://example.com/cat.jpg"):
        message = _error(httpx.post(server.url + "/v1/detect", json={"images": [path]}), 422, "invalid_base64")
        assert "not valid base64" in message
    message = _error(httpx.post(server.url + "/v1/detect", json={"images": ["/etc/passwd.jpg"]}), 422)
    assert "file paths" in message


def test_too_many_images_is_413(server):
    files = [("image", (f"{i}.png", image_bytes(seed=i))) for i in range(4)]
    _error(httpx.post(server.url + "/v1/detect", files=files), 413, "too_many_images")
    many = [("image", (f"{i}.png", b"x")) for i in range(50)]
    _error(httpx.post(server.url + "/v1/detect", files=many), 413, "too_many_images")
    encoded = base64.b64encode(image_bytes()).decode()
    _error(httpx.post(server.url + "/v1/detect", json={"images": [encoded] * 4}), 413, "too_many_images")


def test_unknown_routes_models_and_methods_use_the_error_shape(server):
    _error(httpx.get(server.url + "/nowhere"), 404)
    _error(httpx.get(server.url + "/v1/detect"), 405)
    _error(httpx.post(server.url + "/v1/detect?model=other", content=image_bytes()), 404, "model_not_found")
    v2 = httpx.post(server.url + "/v2/models/tiny-detector/infer", content=b"{not json")
    assert v2.status_code == 400 and isinstance(v2.json()["error"], str)


def _random_bodies(rng: random.Random) -> list[tuple[str, dict, bytes]]:
    png, jpeg = image_bytes(seed=3), image_bytes(fmt="JPEG", seed=4)
    cases: list[tuple[str, dict, bytes]] = []
    for i in range(240):
        kind = i % 8
        if kind == 0:
            body, headers = rng.randbytes(rng.randint(0, 3000)), {"content-type": "image/jpeg"}
        elif kind == 1:
            source = png if rng.random() < 0.5 else jpeg
            body, headers = source[: rng.randint(1, len(source) - 1)], {}
        elif kind == 2:  # huge declared dimensions in a real header, then garbage
            header = _big_png(1, 1)
            body = header[:16] + (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big") + header[24:]
            headers = {"content-type": "image/png"}
        elif kind == 3:
            body = rng.choice([b"{", b'{"images": 5}', b'{"images": [null]}', b'{"images": [{"a": 1}]}',
                               b'{"image": "' + rng.randbytes(20).hex().encode() + b'"}', b"[]", b"null",
                               b'{"images": ["aGVsbG8="]}', b"\xff\xfe{"])
            headers = {"content-type": "application/json"}
        elif kind == 4:  # broken multipart
            boundary = "b0undary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n"
                    .encode() + rng.randbytes(rng.randint(0, 500)) + rng.choice([b"", b"\r\n--b0und", b"\r\n--x--"]))
            headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        elif kind == 5:
            body, headers = rng.randbytes(100), {"content-type": "multipart/form-data"}
        elif kind == 6:  # flipped bytes inside a valid image
            data = bytearray(png if i % 16 < 8 else jpeg)
            for _ in range(20):
                data[rng.randrange(8, len(data))] = rng.randrange(256)
            body, headers = bytes(data), {}
            try:  # some flips still decode: skip those, they are valid images
                Image.open(io.BytesIO(body)).load()
                continue
            except Exception:
                pass
        else:
            body = b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "parameters": ' \
                   b'{"binary_data_size": 99}}]}'
            headers = {"inference-header-content-length": str(rng.randint(-5, 200))}
        path = "/v2/models/tiny-detector/infer" if kind == 7 else rng.choice(["/v1/detect", "/v1/detect?annotated=1",
                                                                              "/hf/tiny-detector"])
        cases.append((path, headers, body))
    return cases


def test_hundreds_of_random_and_malformed_bodies_are_all_4xx(server):
    cases = _random_bodies(random.Random(0))
    assert len(cases) > 200

    async def send_all() -> list[tuple[str, int, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            semaphore = asyncio.Semaphore(8)

            async def one(path, headers, body):
                async with semaphore:
                    response = await client.post(path, content=body, headers=headers)
                    return path, response.status_code, response.text

            return await asyncio.gather(*(one(*case) for case in cases))

    results = asyncio.run(send_all())
    bad = [(path, status, text[:200]) for path, status, text in results if not 400 <= status < 500]
    assert not bad, bad[:5]
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.post(server.url + "/v1/detect", content=image_bytes()).status_code == 200


# -- API key ----------------------------------------------------------------------------------------


def test_api_key_from_a_file(tiny_models, start_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    server = start_server(Settings(models=[str(tiny_models.detector)], api_key_file=str(key_file)))
    url = server.url + "/v1/detect"
    _error(httpx.post(url, content=image_bytes()), 401, "unauthorized")
    _error(httpx.post(url, content=image_bytes(), headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
    assert httpx.post(url, content=image_bytes(), headers={"authorization": "Bearer s3cret-key"}).status_code == 200
    assert httpx.post(url, content=image_bytes(), headers={"x-api-key": "s3cret-key"}).status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    v2 = httpx.post(server.url + "/v2/models/tiny-detector/infer", json={})
    assert v2.status_code == 401 and isinstance(v2.json()["error"], str)


# -- queue full and deadlines, with a backend that takes as long as it is told -------------------------


class SlowBackend(Backend):
    """A fake detector that sleeps ``width / 100`` seconds per image (so a test picks each request's cost)."""

    def __init__(self) -> None:
        self.info = ModelInfo(name="slow", revision="test", sha256="", task="detection", backend="fake",
                              device="cpu", source="test", class_names=["thing"])

    def detect(self, images):
        time.sleep(sum(image.shape[1] for image in images) / 100)
        return [Detections(np.zeros((1, 4), np.float32), np.ones(1, np.int64), np.ones(1, np.float32)) for _ in images]


async def _concurrently(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(url, content=body) for body in bodies))


def test_full_queue_is_503_with_retry_after_and_spares_the_others(start_server):
    server = start_server(Settings(max_queue=2, max_batch_size=1, warmup=False), backends=[SlowBackend()])
    responses = asyncio.run(_concurrently(server.url + "/v1/detect", [image_bytes(20, 20, seed=i) for i in range(10)]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1" and response.json()["error"]["code"] == "queue_full"
        else:
            assert response.json()["results"][0]["detections"][0]["label"] == "thing"
    assert httpx.post(server.url + "/v1/detect", content=image_bytes(20, 20)).status_code == 200


def test_deadline_is_504_and_spares_the_others(start_server):
    server = start_server(Settings(request_timeout_s=0.5, warmup=False), backends=[SlowBackend()])
    slow, fast = image_bytes(100, 20), image_bytes(5, 20)  # 1 s and 0.05 s of "device" time
    responses = asyncio.run(_concurrently(server.url + "/v1/detect", [slow]))
    assert _error(responses[0], 504, "deadline_exceeded")
    time.sleep(0.6)  # the slow batch finishes on the device; later requests are unaffected
    assert httpx.post(server.url + "/v1/detect", content=fast).status_code == 200


def test_shutdown_finishes_requests_in_flight(start_server):
    server = start_server(Settings(warmup=False), backends=[SlowBackend()])

    async def request_then_stop() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.create_task(client.post(server.url + "/v1/detect", content=image_bytes(60, 20)))
            await asyncio.sleep(0.2)  # the request is on the device (0.6 s)
            server.server.should_exit = True
            return await pending

    response = asyncio.run(request_then_stop())
    assert response.status_code == 200
    server.thread.join(timeout=10)
    assert not server.thread.is_alive()


def test_requests_in_progress_are_bounded_503_busy(start_server):
    """Memory is bounded: at most max_inflight_requests bodies are held; the rest are refused at once."""
    server = start_server(Settings(max_inflight_requests=2, warmup=False), backends=[SlowBackend()])
    responses = asyncio.run(_concurrently(server.url + "/v1/detect", [image_bytes(30, 20, seed=i) for i in range(8)]))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.json()["error"]["code"] == "busy" and r.headers["retry-after"] for r in busy)
    assert any(r.status_code == 200 for r in responses)
    assert httpx.post(server.url + "/v1/detect", content=image_bytes(5, 20)).status_code == 200


def _read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response read off a raw socket: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed without a reply: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def test_a_stalled_upload_is_408_within_the_deadline_and_frees_its_slot(start_server):
    """Clients that declare a body and never send it cannot hold the in-flight slots past the request timeout."""
    server = start_server(Settings(max_inflight_requests=2, request_timeout_s=1.5, warmup=False),
                          backends=[SlowBackend()])
    stalled = (b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
               b"Content-Length: 100000\r\n\r\n\x89PNG")
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        started = time.monotonic()
        for sock in sockets:
            sock.sendall(stalled)
        time.sleep(0.3)  # both are now reading their bodies: the two slots are taken
        _error(httpx.post(server.url + "/v1/detect", content=image_bytes(5, 20)), 503, "busy")
        for sock in sockets:
            status, headers, body = _read_reply(sock)
            assert status == 408 and headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error["code"] == "request_timeout" and "1.5 s" in error["message"]
        assert time.monotonic() - started < 5
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.post(server.url + "/v1/detect", content=image_bytes(5, 20)).status_code == 200


def test_the_deadline_counts_from_arrival_not_from_the_queue(start_server):
    """Reading a slow body and then computing must fit in one --request-timeout-s, not one each."""
    server = start_server(Settings(request_timeout_s=1.0, warmup=False), backends=[SlowBackend()])
    body = image_bytes(70, 20)  # 0.7 s of "device" time
    head = (f"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body[:10])
        time.sleep(0.5)  # half the deadline goes on the upload
        sock.sendall(body[10:])
        status, _, reply = _read_reply(sock)
    assert status == 504 and json.loads(reply)["error"]["code"] == "deadline_exceeded"
