"""Collapse diagnostics: the numbers, the one-time warning, the curves, the run folder and the card."""

from __future__ import annotations

import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from insloc_hub.errors import ConfigError
from insloc_hub.pretrained import from_pretrained
from insloc_hub.training.pretraining.diagnostics import CollapseMonitor, embedding_diagnostics, plot_curves, summarize
from insloc_hub.training.pretraining.engine import resolve_config, train
from insloc_hub.training.runtime.run import MetricsWriter
from tests.training.test_engine import write_photos

LEVELS = ("p2", "p3", "p4", "p5")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest


def test_distinct_embeddings_are_healthy_and_identical_ones_collapsed():
    dim, batch = 16, 8
    distinct = torch.eye(dim)[:batch].expand(4, batch, dim)  # orthonormal: cos 0, own key always best
    d = embedding_diagnostics(distinct, distinct, LEVELS)
    assert float(d["inbatch_top1"]) == 100.0 and float(d["inbatch_top1_p3"]) == 100.0
    assert abs(float(d["cos_q"])) < 1e-6 and abs(float(d["cos_k_p5"])) < 1e-6
    same = F.normalize(torch.ones(4, batch, dim), dim=-1)
    d = embedding_diagnostics(same, same, LEVELS)
    assert float(d["cos_q"]) == pytest.approx(1.0) and float(d["cos_k"]) == pytest.approx(1.0)
    assert float(d["emb_std"]) == pytest.approx(0.0, abs=1e-6)
    assert set(d) == {f"{n}{s}" for n in ("inbatch_top1", "cos_q", "cos_k", "emb_std")
                      for s in ("", "_p2", "_p3", "_p4", "_p5")}


def test_random_embeddings_sit_near_chance_and_healthy_std():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1, 512, 128, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, 512, 128, generator=g), dim=-1)  # unrelated to q
    d = embedding_diagnostics(q, k, ("image",))
    assert set(d) == {"inbatch_top1", "cos_q", "cos_k", "emb_std"}  # one level: no suffixes
    assert float(d["inbatch_top1"]) < 2.0  # chance is 0.2 %
    assert abs(float(d["cos_q"])) < 0.01
    assert float(d["emb_std"]) == pytest.approx(1 / math.sqrt(128), rel=0.05)
    # mean pairwise cosine = the brute-force mean over i != j
    sim = q[0] @ q[0].T
    brute = (sim.sum() - sim.diagonal().sum()) / (512 * 511)
    assert float(d["cos_q"]) == pytest.approx(float(brute), abs=1e-5)


def test_collapse_warning_once_with_the_step(caplog):
    monitor = CollapseMonitor(dim=128, batch_size=16)
    healthy = {"cos_k": 0.6, "emb_std": 0.07, "inbatch_top1": 40.0}
    collapsed = {"cos_k": 0.99, "emb_std": 0.002, "inbatch_top1": 6.25}
    learning_but_similar = {"cos_k": 0.97, "emb_std": 0.01, "inbatch_top1": 60.0}  # top-1 far above chance
    with caplog.at_level(logging.WARNING):
        assert not monitor.update(10, healthy)
        assert not monitor.update(20, learning_but_similar)
        assert monitor.update(30, collapsed)
        assert not monitor.update(40, collapsed)  # once
    warnings = [r for r in caplog.records if "COLLAPSE" in r.getMessage()]
    assert len(warnings) == 1 and "step 30" in warnings[0].getMessage() and monitor.collapsed_at == 30


def test_a_resumed_run_keeps_its_collapse_step_and_does_not_warn_again(caplog):
    healthy = {"cos_k": 0.6, "emb_std": 0.07, "inbatch_top1": 40.0}
    collapsed = {"cos_k": 0.99, "emb_std": 0.002, "inbatch_top1": 6.25}
    logged = [{"step": 1, **healthy}, {"step": 2, **collapsed}, {"step": 3, **collapsed}]
    monitor = CollapseMonitor(dim=128, batch_size=16)
    with caplog.at_level(logging.WARNING):
        assert monitor.replay(logged) == 2
        assert not monitor.update(4, collapsed)
    assert monitor.collapsed_at == 2 and "COLLAPSE" not in caplog.text
    assert CollapseMonitor(dim=128, batch_size=16).replay(logged[:1]) is None


def test_summary_of_the_last_records():
    records = [{"step": s, "loss": 1.0, "inbatch_top1": float(s), "cos_k": 0.5, "cos_q": 0.4, "emb_std": 0.05,
                "inbatch_top1_p2": 1.0} for s in range(10, 110, 10)]
    summary = summarize(records, batch_size=16, dim=128, collapsed_at=None, tail=5)
    assert summary["inbatch_top1"] == pytest.approx(80.0) and summary["steps"] == [60, 100]
    assert summary["inbatch_top1_p2"] == 1.0 and summary["chance_inbatch_top1"] == 6.25
    assert summarize([{"step": 1, "loss": 2.0}], batch_size=16, dim=128, collapsed_at=None) == {}


def test_curves_png_and_a_missing_matplotlib(tmp_path, monkeypatch, caplog):
    records = [{"step": s, "loss": 20.0 - s / 10, "lr": 0.1, "inbatch_top1": s / 2, "inbatch_top1_p5": s / 3,
                "cos_q": 0.5, "cos_k": 0.4} for s in range(1, 30)]
    assert plot_curves(records, tmp_path / "curves.png", chance_loss=22.2, batch_size=16)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO):
        assert not plot_curves(records, tmp_path / "other.png")
    assert not (tmp_path / "other.png").exists()
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)


def test_a_run_logs_plots_and_records_the_diagnostics(tmp_path):
    photos = write_photos(tmp_path / "photos", count=8)
    out = tmp_path / "run"
    train(resolve_config(dict(preset="tiny", data=str(photos), output=str(out), batch_size=8, queue_size=16,
                              epochs=2, workers=0, device="cpu", log_every=1)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["inbatch_top1_p5"] <= 100.0 and -1.0 <= r["cos_k"] <= 1.0 for r in records)
    assert {f"emb_std_{lv}" for lv in LEVELS} <= set(records[0])
    assert (out / "curves.png").is_file()
    diagnostics = from_pretrained(out / "final").hub_config["provenance"]["diagnostics"]
    assert diagnostics["chance_inbatch_top1"] == 12.5 and diagnostics["steps"][-1] == 2
    assert diagnostics["inbatch_top1"] == pytest.approx(sum(r["inbatch_top1"] for r in records) / len(records))
    card = (out / "final" / "README.md").read_text()
    assert "Pretraining diagnostics" in card and "in-batch top-1" in card


def test_diagnostics_are_measured_at_log_steps_only_with_the_same_values(tmp_path):
    photos = write_photos(tmp_path / "photos", count=8)
    seen: dict[int, set[str]] = {}

    def keys(event: str, info: dict) -> None:
        if event == "step":
            seen[info["step"]] = set(info["outputs"])

    runs = {}
    for log_every in (1, 2):
        out = tmp_path / f"log{log_every}"
        train(resolve_config(dict(preset="tiny", data=str(photos), output=str(out), batch_size=8, queue_size=16,
                                  epochs=3, workers=0, device="cpu", deterministic=True, log_every=log_every)),
              callbacks=[keys])
        runs[log_every] = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(runs[2]) == [2, 3]  # every 2nd step and the last
    assert "cos_k" not in seen[1] and {"loss", "cos_k", "inbatch_top1_p5"} <= seen[2] & seen[3]
    names = [k for k in runs[1][2] if k.split("_p")[0] in ("inbatch_top1", "cos_q", "cos_k", "emb_std", "loss")]
    assert [runs[2][s][k] for s in (2, 3) for k in names] == [runs[1][s][k] for s in (2, 3) for k in names]


def test_tensorboard_flag(tmp_path, monkeypatch):
    cfg = resolve_config(dict(preset="tiny", data="x", output=str(tmp_path), tensorboard=True))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(cfg)
    # with TensorBoard installed, every numeric metric is a scalar (a stand-in SummaryWriter records them)
    logged: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, path: str) -> None:
            assert Path(path) == tmp_path / "tensorboard"

        def add_scalar(self, key: str, value: float, step: int) -> None:
            logged.append((key, value, step))

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    writer = MetricsWriter(tmp_path, True, 0, tensorboard=True)
    writer.write({"step": 5, "loss": 1.5, "inbatch_top1": 50.0, "cos_k": 0.3, "time": 1.0})
    writer.close()
    assert sorted(logged) == [("cos_k", 0.3, 5), ("inbatch_top1", 50.0, 5), ("loss", 1.5, 5)]
