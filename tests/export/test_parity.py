"""Parity never passes on NaN or inf: equal garbage from both runtimes is not a verified export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from insloc_hub import from_pretrained
from insloc_hub.errors import ExportError
from insloc_hub.export import export_onnx
from insloc_hub.export.parity import ParityReport, Tolerance, compare_case

pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(task: str, reference: dict, exported: dict) -> ParityReport:
    report = ParityReport(task=task, passed=True, images="test")
    compare_case(report, "case", task, reference, exported, Tolerance())
    return report


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["both", "torch", "onnx"])
def test_non_finite_features_fail(bad: float, where: str) -> None:
    clean = np.ones((1, 4, 2, 2), np.float32)
    broken = clean.copy()
    broken[0, 1, 0, 0] = bad
    reference = {"p2": broken if where in ("both", "torch") else clean}
    exported = {"p2": broken if where in ("both", "onnx") else clean}
    report = _compare("features", reference, exported)
    assert report.failures and any("p2" in f for f in report.failures)


def test_non_finite_detections_fail() -> None:
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    reference = {"boxes": boxes, "labels": np.array([1]), "scores": np.array([np.nan], np.float32)}
    report = _compare("detector", reference, dict(reference))
    assert any("scores: 1 non-finite" in f for f in report.failures)


def test_nan_output_fails_the_export_and_leaves_no_file(tiny_fpn_folder: Path, tmp_path: Path) -> None:
    # std 0 (which read_config now refuses, so set on the loaded model) divides by zero inside the graph:
    # both runtimes give NaN, max_abs is NaN, and NaN > tolerance is False; the export must still fail
    model = from_pretrained(tiny_fpn_folder)
    model.hub_config = {**model.hub_config, "preprocessing": {**model.hub_config["preprocessing"],
                                                              "std": [0.0, 0.0, 0.0]}}
    out = tmp_path / "x.onnx"
    with pytest.raises(ExportError, match=r"non-finite values \(NaN/inf\)"):
        export_onnx(model, out, height=64, width=64, threads=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []
