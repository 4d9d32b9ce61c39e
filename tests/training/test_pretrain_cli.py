"""``insloc-train pretrain`` / ``export-weights``: smoke runs and every user-facing error message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from insloc_hub import build_detector
from insloc_hub.pretrained import from_pretrained, save_pretrained
from insloc_hub.training import cli
from insloc_hub.training.pretraining.engine import PretrainConfig
from insloc_hub.training.pretraining.insloc import InsLoc
from tests.training.test_engine import write_photos

TINY = ["--preset", "tiny", "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # the parser refused a value
        code = exit_.code
    return code, capsys.readouterr().err


def test_every_config_field_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(PretrainConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
    assert "--no-nesterov" in text and "65536" in text


def test_tiny_preset_smoke_run_and_export_weights(photos, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY], capsys)
    assert code == 0, err
    assert (out / "final" / "model.safetensors").is_file() and (out / "composition.png").is_file()
    config = from_pretrained(out / "final").hub_config
    assert config["architecture"]["depth"] == 18 and config["provenance"]["epochs"] == 2
    code, _ = run(["export-weights", out, tmp_path / "exported"], capsys)
    assert code == 0 and (tmp_path / "exported" / "README.md").is_file()
    # a fine-tuned detector's folder is not replaced by accident, and --overwrite leaves nothing of it behind
    (tmp_path / "load_report.json").write_text("{}")
    detector = save_pretrained(build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn"),
                               tmp_path / "detector", extra_files={"load_report.json": tmp_path / "load_report.json"})
    code, err = run(["export-weights", out, detector], capsys)
    assert code == 2 and "holds a detection model" in err and "pass --overwrite" in err and "=True" not in err
    code, err = run(["export-weights", out, detector, "--overwrite"], capsys)
    assert code == 0, err
    assert from_pretrained(detector).hub_config["task"] == "backbone" and not (detector / "load_report.json").exists()


def test_device_composition_amp_and_channels_last_paths_on_cpu(photos, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, "--gpu-composition", "on", "--amp", "on",
                     "--channels-last", "on", "--max-steps", "1"], capsys)
    assert code == 0, err
    assert from_pretrained(out / "final").hub_config["provenance"]["steps"] == 1


@pytest.mark.parametrize(("flags", "parts", "arch"), [
    (["--method", "moco", "--max-steps", "2"], ("trunk",), "faster_rcnn_fpn"),  # the MoCo v2 baseline
    (["--arch", "tiny-c4", "--max-steps", "1"], ("trunk", "box_head"), "faster_rcnn_c4"),  # C4 reconstruction
])
def test_moco_baseline_and_c4_reconstruction_smoke(photos, tmp_path, capsys, flags, parts, arch):
    out = tmp_path / "run"
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, *flags], capsys)
    assert code == 0, err
    bundle = from_pretrained(out / "final")
    assert bundle.config.parts == parts
    provenance = bundle.hub_config["provenance"]
    assert provenance["method"].startswith("MoCo v2") if "moco" in flags else "reconstruction" in provenance
    detector = build_detector(arch, num_classes=2, pretrained=bundle)
    loaded_parts = {"box_head" if k.startswith("roi_heads.box_head.") else k.split(".")[1]
                    for k in detector.load_report.loaded}
    assert loaded_parts == set(parts)


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "r42-fpn"], "--arch: must be one of r101-fpn, r18-fpn, r50-c4, r50-fpn, tiny-c4, tiny-fpn"),
        (["--queue-size", "20"], "--queue-size 20 must be a multiple of the global --batch-size 8"),
        (["--canvas", "70"], "--canvas must be a multiple of 16"),
        (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
        (["--method", "moco", "--no-box-jitter"], "--no-box-jitter applies to --method insloc only"),
        (["--method", "moco", "--projection-norm", "level"], "MoCo v2 has one level: use batch"),
        (["--arch", "tiny-c4", "--projection-norm", "level"], "tiny-c4 has one level: use batch"),
    ],
)
def test_config_errors(photos, tmp_path, capsys, extra, message):
    code, err = run(["pretrain", "--data", photos, "--output", tmp_path / "r", *TINY, *extra], capsys)
    assert code == 2 and message in err and "insloc-train pretrain: error:" in err


def test_data_errors(tmp_path, capsys):
    code, err = run(["pretrain", "--output", tmp_path / "r", *TINY], capsys)
    assert code == 2 and "the following arguments are required: --data" in err
    code, err = run(["pretrain", "--data", tmp_path / "nowhere", "--output", tmp_path / "r", *TINY], capsys)
    assert code == 2 and "does not exist" in err
    few = write_photos(tmp_path / "few", count=3)
    code, err = run(["pretrain", "--data", few, "--output", tmp_path / "r", *TINY], capsys)
    assert code == 2 and "found 3 images" in err and "--batch-size 8" in err


def test_resume_errors(photos, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, "--max-steps", "1"], capsys)
    assert code == 0, err
    # same folder again without --resume: refuse rather than silently continue or overwrite
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY], capsys)
    assert code == 2 and "already holds checkpoints" in err and "--resume auto" in err
    # a checkpoint from another configuration names the differing fields
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, "--resume", "auto", "--lr", "0.5",
                     "--temperature", "0.1"], capsys)
    assert code == 2 and "another configuration" in err and "lr" in err and "temperature" in err
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, "--resume", tmp_path / "missing.pt"],
                    capsys)
    assert code == 2 and "does not exist" in err
    # a different data set
    other = write_photos(tmp_path / "more", count=24)
    code, err = run(["pretrain", "--data", other, "--output", out, *TINY, "--resume", "auto"], capsys)
    assert code == 2 and "trained on 16 images" in err
    # resuming with --resume auto and a larger --max-steps continues the run
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, "--resume", "auto", "--max-steps", "2"],
                    capsys)
    assert code == 0, err
    assert from_pretrained(out / "final").hub_config["provenance"]["steps"] == 2


def test_export_weights_errors(tmp_path, capsys):
    bogus = tmp_path / "checkpoint_000000001.pt"
    bogus.write_bytes(b"not a checkpoint")
    code, err = run(["export-weights", bogus, tmp_path / "out"], capsys)
    assert code == 2 and "corrupt" in err
    torch.save({"model": {}}, tmp_path / "other.pt")
    code, err = run(["export-weights", tmp_path / "other.pt", tmp_path / "out"], capsys)
    assert code == 2 and "not an insloc-train pretraining checkpoint" in err
    code, err = run(["export-weights", tmp_path / "empty-run", tmp_path / "out"], capsys)
    assert code == 2


def test_cuda_out_of_memory_suggests_a_smaller_batch(photos, tmp_path, capsys, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(InsLoc, "forward", oom)
    code, err = run(["pretrain", "--data", photos, "--output", tmp_path / "r", *TINY], capsys)
    assert code == 2 and "ran out of memory with 8 images per GPU" in err and "--batch-size 4" in err


def test_unreadable_images_are_skipped_and_reported_once_per_epoch(photos, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for p in photos.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        code, err = run(["pretrain", "--data", data, "--output", out, *TINY, "--epochs", "1"], capsys)
    assert code == 0, err
    assert "zz_broken.jpg" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = [r for r in records if "unreadable_draws" in r]
    assert len(report) == 1 and report[0]["unreadable_files"] == 1 and report[0]["unreadable_draws"] >= 1


def test_in_batch_backgrounds_flag_needs_device_composition(photos, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(["pretrain", "--data", photos, "--output", out, *TINY, "--gpu-composition", "on",
                     "--batch-backgrounds", "--max-steps", "1"], capsys)
    assert code == 0, err
    code, err = run(["pretrain", "--data", photos, "--output", tmp_path / "cpu", *TINY, "--gpu-composition", "off",
                     "--batch-backgrounds", "--max-steps", "1"], capsys)
    assert code != 0 and "--gpu-composition on" in err and "Traceback" not in err


def test_ctrl_c_before_a_save_says_what_is_lost_and_eval_offers_no_resume(monkeypatch, capsys):
    """Only commands that resume say how; a run stopped before it could save says that steps are lost."""
    from insloc_hub.training.pretraining import pretrain
    from insloc_hub.training.transfer import finetune

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run_pretrain", interrupted)
    monkeypatch.setattr(finetune, "_run_eval", interrupted)
    assert cli.main(["pretrain", "--data", "photos", "--output", "run"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("insloc-train pretrain: interrupted; the steps since the newest checkpoint in --output are "
                          "lost") and "--resume auto" in err
    assert cli.main(["eval", "run/final", "--data", "voc"]) == 130
    assert capsys.readouterr().err == "insloc-train eval: interrupted\n"
