"""How requests are read: content types, JSON, base64, options and Accept, as clients really send them."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from insloc_hub.serve.negotiate import preferred_type
from insloc_hub.serve.settings import Settings
from tests.serve.conftest import image_bytes

DET, BB = "tiny-detector", "tiny-backbone"
#: what curl sends with --data-binary and no -H 'Content-Type: ...'
CURL_DEFAULT = {"content-type": "application/x-www-form-urlencoded"}
V2_INFER = f"/v2/models/{DET}/infer"


@pytest.fixture(scope="module")
def server(tiny_models, start_server):
    return start_server(Settings(models=[str(tiny_models.detector), str(tiny_models.backbone)], max_wait_ms=1))


def _error(response: httpx.Response, status: int, code: str) -> str:
    """The message of a /v1 or /hf error, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _v2_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def _v2_request(data: list) -> dict:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data}]}


def test_curl_data_binary_without_a_content_type_is_an_image_body(server):
    """The README's curl lines: --data-binary sends application/x-www-form-urlencoded unless told otherwise."""
    data = image_bytes(64, 48, "JPEG", seed=1)
    drawn = httpx.post(server.url + f"/v1/detect?model={DET}&annotated=1", content=data, headers=CURL_DEFAULT)
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png", drawn.text
    embedded = httpx.post(server.url + f"/v1/features?model={BB}", content=data, headers=CURL_DEFAULT)
    assert embedded.status_code == 200 and len(embedded.json()["results"][0]["embedding"]) == 128, embedded.text
    maps = httpx.post(server.url + f"/v1/features?model={BB}", content=data,
                      headers={**CURL_DEFAULT, "accept": "application/octet-stream"})
    assert maps.status_code == 200 and maps.headers["content-type"] == "application/octet-stream", maps.text
    # a non-image body under that type is still refused as what it is: not an image
    _error(httpx.post(server.url + f"/v1/detect?model={DET}", content=b"a=1&b=2", headers=CURL_DEFAULT),
           415, "unsupported_image")


def test_infinite_nan_and_huge_numbers_are_422_options(server):
    encoded = base64.b64encode(image_bytes()).decode()
    url = server.url + f"/v1/detect?model={DET}"
    for name, literal in [("max_detections", "1e999"), ("max_detections", "-1e999"), ("max_detections", "NaN"),
                          ("max_detections", "Infinity"), ("max_detections", "1e300"), ("max_detections", "9" * 400),
                          ("score_threshold", "1e999"), ("score_threshold", "NaN"), ("score_threshold", "-Infinity"),
                          ("score_threshold", "9" * 400), ("threshold", "1e999")]:
        body = f'{{"images": ["{encoded}"], "{name}": {literal}}}'.encode()
        message = _error(httpx.post(url, content=body, headers={"content-type": "application/json"}),
                         422, "invalid_option")
        assert name.replace("threshold", "score_threshold").replace("score_score", "score") in message
        assert len(message) < 200  # the offending value is shown cut short
    for query in ("max_detections=1e999", "max_detections=inf", "max_detections=" + "9" * 5000,
                  "score_threshold=inf", "score_threshold=1e999", "score_threshold=" + "9" * 400):
        _error(httpx.post(f"{url}&{query}", content=image_bytes()), 422, "invalid_option")
    json_type = {"content-type": "application/json"}
    hf = f'{{"inputs": "{encoded}", "parameters": {{"threshold": 1e999}}}}'.encode()
    _error(httpx.post(server.url + f"/hf/{DET}", content=hf, headers=json_type), 422, "invalid_option")
    # an integer literal longer than Python's conversion limit is a JSON error, not a server error
    too_long = f'{{"images": ["{encoded}"], "max_detections": {"9" * 5000}}}'.encode()
    _error(httpx.post(url, content=too_long, headers=json_type), 422, "invalid_json")
    v2 = json.dumps(_v2_request([encoded]))[:-1]
    for parameters in ('{"max_detections": 1e999}', '{"score_threshold": NaN}', '{"max_detections": 1e300}'):
        body = f'{v2}, "parameters": {parameters}}}'.encode()
        assert "must be" in _v2_error(httpx.post(server.url + V2_INFER, content=body, headers=json_type), 400)
    assert httpx.post(url, json={"images": [encoded], "max_detections": 1}).status_code == 200


def test_deeply_nested_json_is_a_client_error_on_every_protocol(server):
    nested = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    json_type = {"content-type": "application/json"}
    for path in (f"/v1/detect?model={DET}", f"/v1/features?model={BB}", f"/hf/{DET}"):
        message = _error(httpx.post(server.url + path, content=nested, headers=json_type), 422, "invalid_json")
        assert "nested" in message
    assert "nested" in _v2_error(httpx.post(server.url + V2_INFER, content=nested, headers=json_type), 400)
    assert httpx.post(server.url + f"/v1/detect?model={DET}", content=image_bytes()).status_code == 200


def test_query_classes_split_on_commas_like_the_body(server):
    data = image_bytes(80, 60, seed=2)
    encoded = base64.b64encode(data).decode()
    url = server.url + f"/v1/detect?model={DET}"
    from_json = httpx.post(url, json={"images": [encoded], "classes": ["cat", "dog"]})
    from_form = httpx.post(url, files={"image": ("a.png", data)}, data={"classes": "cat,dog"})
    from_query = httpx.post(url + "&classes=cat,dog", content=data)
    repeated = httpx.post(url + "&classes=cat&classes=dog", content=data)
    for response in (from_json, from_form, from_query, repeated):
        assert response.status_code == 200, response.text
    expected = from_json.json()["results"][0]["detections"]
    assert expected and {d["label"] for d in expected} <= {"cat", "dog"}
    for response in (from_form, from_query, repeated):
        assert response.json()["results"][0]["detections"] == expected
    message = _error(httpx.post(url + "&classes=cat,unicorn", content=data), 422, "invalid_option")
    assert "['unicorn']" in message


def test_a_model_of_the_wrong_type_is_named_as_such(server):
    """Several models are served: a list where the name belongs must not read as 'no model given'."""
    encoded = base64.b64encode(image_bytes()).decode()
    for model in (["tiny-detector"], 3, {"name": DET}):
        message = _error(httpx.post(server.url + "/v1/detect", json={"images": [encoded], "model": model}),
                         422, "invalid_option")
        assert "model must be a string" in message


def test_line_wrapped_base64_is_accepted_other_characters_are_not(server):
    data = image_bytes(64, 64, seed=4)
    plain = base64.b64encode(data).decode()
    url = server.url + f"/v1/detect?model={DET}"
    expected = httpx.post(url, json={"images": [plain]}).json()["results"]
    wrapped = {"python encodebytes": base64.encodebytes(data).decode(),
               "CRLF, 64 columns": "\r\n".join(plain[i:i + 64] for i in range(0, len(plain), 64)),
               "data URL, tabs and spaces": "data:image/png;base64," + " \t".join(plain[i:i + 40]
                                                                                for i in range(0, len(plain), 40))}
    for name, text in wrapped.items():
        response = httpx.post(url, json={"images": [text]})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["results"] == expected, name
    v2 = httpx.post(server.url + V2_INFER, json=_v2_request([base64.encodebytes(data).decode()]))
    assert v2.status_code == 200, v2.text
    message = _error(httpx.post(url, json={"images": [plain[:100] + "*" + plain[100:]]}), 422, "invalid_base64")
    assert "image 0" in message and "'*'" in message and "100" in message


def test_features_accept_header_uses_q_values(server):
    url = server.url + f"/v1/features?model={BB}"
    data = image_bytes(64, 64, seed=5)
    answers = {"application/json, application/octet-stream;q=0.1": "application/json",
               "application/octet-stream;q=0.1, application/json": "application/json",
               "application/json;q=0.5, application/octet-stream": "application/octet-stream",
               "text/html, */*;q=0.8": "application/json",
               "application/*": "application/json"}
    for accept, expected in answers.items():
        response = httpx.post(url, content=data, headers={"accept": accept})
        assert response.status_code == 200 and response.headers["content-type"] == expected, (accept, response.text)
    message = _error(httpx.post(url, content=data, headers={"accept": "text/html, image/*"}), 406, "not_acceptable")
    assert "application/json" in message and "application/octet-stream" in message


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "application/json"),
    ("", "application/json"),
    ("*/*", "application/json"),
    ("application/octet-stream", "application/octet-stream"),
    ("application/JSON;q=0.2, Application/Octet-Stream;q=0.3", "application/octet-stream"),
    ("application/octet-stream;q=0.5, application/json;q=0.5", "application/json"),  # tie: the first offered
    ("*/*;q=0.9, application/json;q=0", "application/octet-stream"),  # the more specific range wins
    ("application/*;q=0.1, application/octet-stream;q=0.2", "application/octet-stream"),
    ("text/html", None),
    ("application/json;q=0, application/octet-stream;q=0", None),
    ("application/json;q=high, application/octet-stream", "application/octet-stream"),  # a bad q drops its range
    ("nonsense", "application/json"),  # nothing parseable: as if absent
])
def test_preferred_type_follows_q_values_and_specificity(accept, expected):
    assert preferred_type(accept, ("application/json", "application/octet-stream")) == expected


def test_v2_malformed_requests_are_400(server):
    """KServe v2 answers every malformed inference request with 400, bad base64 included."""
    _v2_error(httpx.post(server.url + V2_INFER, content=b"{not json", headers={"content-type": "application/json"}),
              400)
    message = _v2_error(httpx.post(server.url + V2_INFER, json=_v2_request(["%%%not base64"])), 400)
    assert "base64" in message
