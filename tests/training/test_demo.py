"""insloc-train demo: the pipeline end to end on scikit-image photographs, at a tiny budget."""

import importlib.util
import json

from PIL import Image

from insloc_hub.pretrained import read_config
from insloc_hub.training.cli import main


def test_demo_pretrains_finetunes_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("INSLOC_HUB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--pretrain-epochs", "1", "--finetune-iterations", "4",
                 "--copies", "2", "--train-images", "4", "--test-images", "2", "--image-size", "128"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"pretrain", "finetune", "eval"} <= set(summary["stage_seconds"])
    assert 0.0 <= summary["AP50"] <= 1.0
    assert read_config(out / "pretrain" / "final")["task"] == "backbone"
    detector = read_config(out / "finetune" / "final")
    assert detector["task"] == "detection" and detector["class_names"] == ["cat"]
    assert detector["pretrained_parts"] == ["trunk", "fpn", "box_head"]
    assert (out / "eval" / "examples.png").stat().st_size > 0
    if importlib.util.find_spec("insloc_hub.export.cli") is not None:  # the export and serve stage ran
        served = json.loads((out / "serve" / "served_detections.json").read_text())
        assert served["model"].startswith("demo@") and len(served["results"]) == 1
        assert all(d["score"] >= 0.5 and d["label"] == "cat" for d in served["results"][0]["detections"])
        assert Image.open(out / "serve" / "served_annotated.png").size == (128, 128)
        assert (out / "serve" / "detector.onnx").stat().st_size > 0
        assert "export+serve" in summary["stage_seconds"]
