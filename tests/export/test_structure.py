"""Structural checks of exported graphs with NVIDIA's tools that need no GPU (polygraphy, onnx-graphsurgeon)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest


def test_graphsurgeon_finds_no_dead_nodes_and_every_output_produced(features_onnx: Path) -> None:
    gs = pytest.importorskip("onnx_graphsurgeon", reason="structural check needs onnx-graphsurgeon (in [dev])")
    graph = gs.import_onnx(onnx.load(str(features_onnx)))
    before = len(graph.nodes)
    graph.cleanup().toposort()
    assert len(graph.nodes) == before  # nothing unused was exported
    produced = {t.name for node in graph.nodes for t in node.outputs}
    assert [o.name for o in graph.outputs] == ["p2", "p3", "p4", "p5", "embedding"]
    assert all(o.name in produced for o in graph.outputs)


def test_polygraphy_lint_passes(features_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("polygraphy", reason="structural check needs polygraphy (in [dev])")
    script = Path(sys.executable).parent / "polygraphy"
    report = tmp_path / "lint.json"
    done = subprocess.run([str(script), "check", "lint", str(features_onnx), "--input-shapes", "images:[2,3,64,96]",
                           "-o", str(report)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(report.read_text())["summary"]
    assert summary["passing"] and not summary.get("failing")
