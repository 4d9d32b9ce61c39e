"""benchmarks/collapse_check.py: the CPU smoke path writes the JSON the GPU check reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import collapse_check  # noqa: E402


def test_synthetic_photos_are_distinct_and_deterministic():
    a, b = collapse_check.synthetic_photo(0), collapse_check.synthetic_photo(1)
    assert a.size == (320, 240) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(collapse_check.synthetic_photo(0)))
    assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() > 10


def test_smoke_run_writes_diagnostics_and_a_verdict(tmp_path):
    out = tmp_path / "collapse.json"
    assert collapse_check.main(["--smoke", "--synthetic", "--output", str(out), "--work", str(tmp_path / "w")]) == 0
    result = json.loads(out.read_text())
    assert result["smoke"] and result["verdict"] in ("collapsed", "learning", "undecided")
    assert result["steps_done"] == 6 and [d["step"] for d in result["diagnostics"]] == [2, 4, 6]
    first = result["diagnostics"][0]
    assert {"inbatch_top1", "cos_q", "cos_k", "emb_std", "inbatch_top1_p5", "cos_k_p2"} <= set(first)
    assert result["config"]["key_momentum"] == 0.999 and result["config"]["lr"] == 0.03
    assert result["chance_inbatch_top1"] == 12.5
