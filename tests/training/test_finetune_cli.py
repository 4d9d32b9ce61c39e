"""``insloc-train finetune`` / ``insloc-train eval`` end to end, in-process, on tiny models and CPU."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained, save_pretrained
from insloc_hub.training.cli import main
from insloc_hub.training.runtime.run import StepTimer
from insloc_hub.transforms import to_tensor
from tests.photos import photo
from tests.training.test_finetune import make_coco, make_voc, tiny_args


def flags(args: dict[str, Any]) -> list[str]:
    out = ["finetune"]
    for key, value in args.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("data") / "voc", 6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path_factory.mktemp("pre") / "tiny-insloc")


@pytest.fixture(scope="module")
def finetuned(voc: Path, pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run from the pretrained folder, shared by the tests that only read its outputs."""
    run = tmp_path_factory.mktemp("runs") / "from-pretrained"
    args = tiny_args(voc, run, init=pretrained, val_data=voc)
    del args["preset"]
    assert main([*flags(args), "--box-head-extra-norm"]) == 0
    return run


def test_finetune_from_pretrained_loads_trunk_fpn_and_box_head(finetuned: Path) -> None:
    report = json.loads((finetuned / "load_report.json").read_text())
    loaded = report["loaded"]
    for prefix in ("backbone.trunk.", "backbone.fpn.", "roi_heads.box_head.conv"):
        assert any(k.startswith(prefix) for k in loaded), prefix
    assert not any(k.startswith(("rpn.", "roi_heads.box_predictor.")) for k in loaded)
    assert any(".extra_norm." in k for k in report["new"])  # the official head's extra BN starts fresh
    assert report["summary"].startswith(f"loaded {len(loaded)} pretrained tensors")
    assert json.loads((finetuned / "final" / "load_report.json").read_text()) == report


def test_final_folder_loads_with_from_pretrained_and_detects(finetuned: Path) -> None:
    model = from_pretrained(finetuned / "final")
    config = model.hub_config
    assert config["task"] == "detection" and config["class_names"] == ["cat", "cup"]
    assert config["detector"]["box_head_extra_norm"] is True
    metrics = config["results"][0]["metrics"]
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    assert config["provenance"]["iterations"] == 3
    assert not model.training
    with torch.no_grad():
        (out,) = model([to_tensor(photo("chelsea").resize((128, 96)))])
    assert set(out) >= {"boxes", "labels", "scores"}
    assert out["boxes"].shape[1:] == (4,) and out["labels"].dtype == torch.int64
    assert ((out["labels"] >= 1) & (out["labels"] <= 2)).all()
    assert {"training_args.json", "metrics.jsonl", "load_report.json"} <= set(config["files"])


def test_run_folder_has_log_checkpoint_and_evaluation(finetuned: Path) -> None:
    records = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in losses] == [1, 2, 3]
    assert records[-1]["final"] and "AP" in records[-1]["eval"]
    assert (finetuned / "checkpoint_000000003.pt").is_file()
    for name in ("metrics.json", "detections.json", "examples.png"):
        assert (finetuned / "eval" / name).is_file()
    args = json.loads((finetuned / "training_args.json").read_text())
    assert args["norm_used"] == "bn" and args["world_size"] == 1 and args["amp_used"] is False


def test_finetune_from_random_init(voc: Path, tmp_path: Path) -> None:
    run = tmp_path / "random"
    assert main(flags(tiny_args(voc, run, iterations=2))) == 0
    report = json.loads((run / "load_report.json").read_text())
    assert report["init"] == "random" and report["loaded"] == [] and report["new"]
    model = from_pretrained(run / "final")
    assert model.hub_config["class_names"] == ["cat", "cup"] and model.hub_config["results"] == []


def test_mask_rcnn_from_coco_polygons(tmp_path: Path) -> None:
    data = make_coco(tmp_path / "coco", 4)
    run = tmp_path / "mask"
    assert main(flags(tiny_args(data, run, arch="mask_rcnn_fpn", iterations=2))) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_mask" in r for r in records if "loss" in r)
    model = from_pretrained(run / "final")
    assert model.hub_config["detector"]["arch"] == "mask_rcnn_fpn"


def test_resume_auto_continues_from_the_newest_checkpoint(voc: Path, tmp_path: Path) -> None:
    run = tmp_path / "resume"
    args = flags(tiny_args(voc, run, iterations=4, checkpoint_every=2, keep_checkpoints=5, steps="3"))
    assert main(args) == 0
    uninterrupted = load_file(run / "final" / "model.safetensors")
    # as if the run had been killed after the checkpoint of iteration 2
    (run / "checkpoint_000000004.pt").unlink()
    (run / "metrics.jsonl").unlink()
    assert main([*args, "--resume", "auto"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert (run / "checkpoint_000000004.pt").is_file()
    resumed = load_file(run / "final" / "model.safetensors")
    # the data stream, the RNG and the optimizer state are restored: the same weights come out
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_ctrl_c_saves_the_iteration_and_says_how_to_continue(voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "stopped"
    args = flags(tiny_args(voc, run, iterations=4, checkpoint_every=100, steps="3"))
    ticks, tick = [], StepTimer.tick

    def tick_then_interrupt(self: StepTimer, *rest: Any) -> None:  # the timer ticks once per iteration
        tick(self, *rest)
        ticks.append(1)
        if len(ticks) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(StepTimer, "tick", tick_then_interrupt)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; SIGINT at iteration 2/4, saved" in err and "checkpoint_000000002.pt" in err
    assert "--resume auto" in err and not (run / "final").exists()
    monkeypatch.undo()
    assert main([*args, "--resume", "auto"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_other_settings_and_unasked_reuse(voc: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = flags(tiny_args(voc, run, iterations=1))
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    other = flags(tiny_args(voc, run, iterations=1, lr=0.5))
    assert main([*other, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "lr" in err


def test_eval_cli_writes_results_and_prints_ap(finetuned: Path, voc: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    assert main(["eval", str(finetuned / "final"), "--data", str(voc), "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| AP | AP50 | AP75 |" in printed and "| cat |" in printed
    for name in ("detections.json", "metrics.json", "examples.png"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["ap"] <= 1.0
    detections = json.loads((out / "detections.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}


# ----------------------------------------------------------------------------------------------
# What users get wrong
# ----------------------------------------------------------------------------------------------


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_arch_and_preset(voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(flags(tiny_args(voc, tmp_path / "r", arch="yolo")))
    assert exc.value.code == 2
    assert "--arch: must be one of faster_rcnn_fpn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(flags(tiny_args(voc, tmp_path / "r", recipe="voc-99")))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--recipe: must be one of" in err and "coco-1x" in err
    with pytest.raises(SystemExit) as exc:
        main(flags(tiny_args(voc, tmp_path / "r", preset="r7-fpn")))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--preset: must be one of" in err and "tiny-fpn" in err


def test_missing_and_unusable_data(voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(flags(tiny_args(tmp_path / "nowhere", tmp_path / "r")), capsys)
    assert "does not exist" in err and "nowhere" in err
    broken = make_voc(tmp_path / "broken", 2)
    for image in (broken / "JPEGImages").iterdir():
        image.unlink()
    err = error_of(flags(tiny_args(broken, tmp_path / "r2")), capsys)
    assert "0 of 2 images usable" in err and "missing image files" in err


def test_bad_init(voc: Path, finetuned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(flags(tiny_args(voc, tmp_path / "r", init=tmp_path / "no-such-model")), capsys)
    assert "--init" in err and "no-such-model" in err
    err = error_of(flags(tiny_args(voc, tmp_path / "r2", init=finetuned / "final")), capsys)
    assert "fine-tuned detector" in err
    err = error_of(flags(tiny_args(voc, tmp_path / "r3", arch="mask_rcnn_fpn")), capsys)
    assert "mask_rcnn_fpn needs instance masks" in err


def test_eval_of_a_backbone_is_refused(pretrained: Path, voc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(["eval", str(pretrained), "--data", str(voc), "--device", "cpu"], capsys)
    assert "pretrained backbone, not a detector" in err
