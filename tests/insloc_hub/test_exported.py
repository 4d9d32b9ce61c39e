"""insloc_hub.exported: the metadata encoding and onnxruntime sessions export, serve and the benchmarks share."""

from __future__ import annotations

import sys

import pytest

from insloc_hub.errors import ConfigError, MissingDependencyError
from insloc_hub.exported import decode, encode, import_onnxruntime, providers_for


def test_metadata_round_trips_and_ignores_foreign_keys():
    fields = {"task": "detector", "class_names": ["cat", "mug"], "opset": 18, "parity": {"passed": True},
              "revision": None}
    props = encode(fields)
    assert props == {"insloc.task": "detector", "insloc.class_names": '["cat", "mug"]', "insloc.opset": "18",
                     "insloc.parity": '{"passed": true}'}  # None values are left out; JSON for structured keys
    assert decode({**props, "producer": "x"}) == {"task": "detector", "class_names": ["cat", "mug"], "opset": "18",
                                                  "parity": {"passed": True}}
    assert decode({"insloc.class_names": "not json"}) == {"class_names": "not json"}


def test_missing_onnxruntime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes ``import onnxruntime`` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"insloc-hub\[onnxruntime\].*pass --no-verify"):
        import_onnxruntime("To skip, pass --no-verify.")


def test_providers_follow_the_device():
    ort = pytest.importorskip("onnxruntime")
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert providers_for("auto") == (["CUDAExecutionProvider"] if has_cuda else []) + ["CPUExecutionProvider"]
    if has_cuda:
        assert providers_for("cuda:0")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(ConfigError, match="onnxruntime-gpu"):
            providers_for("cuda")
