"""The insloc-hub command line: info, download, push, list, demo and its errors."""

import json

import pytest

from insloc_hub.cli import build_parser, main
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import save_pretrained


@pytest.fixture(autouse=True)
def _private_verification_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSLOC_HUB_CACHE", str(tmp_path / "insloc-cache"))


@pytest.fixture
def folder(tmp_path):
    return save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "tiny", provenance={"epochs": 2})


def test_info_prints_summary_files_and_sha(folder, capsys):
    assert main(["info", str(folder), "--verify"]) == 0
    out = capsys.readouterr().out
    sha = json.loads((folder / "config.json").read_text())["weights"]["sha256"]
    assert "ResNet-18 width 16, variant fpn" in out and f"{sha} (verified)" in out
    assert "model.safetensors" in out and "epochs = 2" in out
    assert main(["info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["task"] == "backbone"


def test_info_lists_the_deviations_from_the_official_recipe_one_per_line(tmp_path, capsys):
    deviations = ["batch_size 16 (official 256): one machine", "canvas 128 (official 256)"]
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "tiny",
                             provenance={"deviations_from_official": deviations})
    assert main(["info", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("provenance:  deviations_from_official =")
    assert [line.strip() for line in lines[start + 1:start + 3]] == [f"- {d}" for d in deviations]


def test_info_into_a_closed_pipe_exits_quietly(folder):
    """`insloc-hub info X --json | head -1`: the reader is gone; no BrokenPipeError traceback, status 141."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "insloc_hub.cli", "info", str(folder), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before anything is written: deterministic, unlike a race with head
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_info_of_a_missing_model_exits_2_with_a_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing-here")]) == 2
    assert "error:" in capsys.readouterr().err


def test_push_download_and_list_against_a_local_hub(hub_env, folder, capsys):
    assert main(["push", str(folder), "team/cli-model", "--message", "first"]) == 0
    commit = capsys.readouterr().out.strip()
    assert len(commit) == 40
    assert main(["download", "team/cli-model", "--revision", commit]) == 0
    snapshot = capsys.readouterr().out.strip()
    assert snapshot.endswith(commit)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "insloc-r50" in out and "team/cli-model" in out


def test_push_of_an_empty_or_missing_folder_says_what_is_missing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["push", str(empty), "team/x"]) == 2
    err = capsys.readouterr().err
    assert f"{empty} is not a hub folder: it has no config.json" in err and "not valid JSON" not in err
    assert main(["push", str(tmp_path / "nowhere"), "team/x"]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("arch,preset", [("faster_rcnn_fpn", "tiny-fpn"), ("mask_rcnn_fpn", "tiny-fpn"),
                                         ("faster_rcnn_c4", "tiny-c4"), ("retinanet_fpn", "tiny-fpn")])
def test_demo_runs_every_architecture_on_a_tiny_preset(arch, preset, capsys):
    assert main(["demo", "--arch", arch, "--preset", preset, "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "pretrained tensors" in out and "training step:" in out
    assert "inference on a 512x512 photo" in out


def test_old_backbone_flag_still_works_with_a_deprecation_warning(capsys):
    with pytest.warns(DeprecationWarning, match="--backbone is deprecated; use --preset"):
        args = build_parser().parse_args(["demo", "--backbone", "tiny-c4"])
    assert args.preset == "tiny-c4"
    assert "--backbone is deprecated" in capsys.readouterr().err


def test_convert_official_and_export_d2(tmp_path, capsys):
    import pickle

    import torch

    from tests.insloc_hub.official_layout import official_state_dict_from_bundle

    bundle = InsLocBackbone("tiny-fpn")
    checkpoint = tmp_path / "insloc_fpn_200ep.pth"
    torch.save(official_state_dict_from_bundle(bundle), checkpoint)
    out = tmp_path / "converted"
    assert main(["convert", "official", str(checkpoint), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "momentum" in printed and f"wrote {out}" in printed
    assert main(["export-d2", str(out), str(tmp_path / "d2.pkl")]) == 0
    with open(tmp_path / "d2.pkl", "rb") as f:
        d2 = pickle.load(f)
    assert d2["matching_heuristics"] is True
    assert "backbone.fpn_lateral2.norm.weight" in d2["model"]


def test_convert_and_export_d2_hints_name_the_flags_not_python_arguments(tmp_path, capsys):
    import torch
    from torchvision.models import resnet18

    from insloc_hub.convert import convert_torchvision_resnet, export_detectron2
    from insloc_hub.errors import ConfigError, WeightsMismatchError

    state = resnet18(weights=None).state_dict()
    state["attention.weight"] = torch.zeros(1)
    checkpoint = tmp_path / "r18.pth"
    torch.save(state, checkpoint)
    assert main(["convert", "torchvision", str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "attention.weight" in err and "Pass --no-strict to drop them" in err and "strict=False" not in err
    assert main(["convert", "torchvision", str(checkpoint), str(tmp_path / "out"), "--no-strict"]) == 0
    assert "strict=False" not in capsys.readouterr().out  # the report says why a key was dropped in flags too

    fpn = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "fpn")
    assert main(["export-d2", str(fpn), str(tmp_path / "d2.pkl"), "--c4"]) == 2
    err = capsys.readouterr().err
    assert "Omit --c4" in err and "c4=False" not in err
    # API callers keep the Python wording
    with pytest.raises(WeightsMismatchError, match="Pass strict=False"):
        convert_torchvision_resnet(state)
    with pytest.raises(ConfigError, match="Export with c4=False"):
        export_detectron2(fpn, tmp_path / "d2.pkl", c4=True)


def test_hub_hints_name_the_flags(folder, capsys):
    assert main(["info", str(folder), "--revision", "v1"]) == 2
    err = capsys.readouterr().err
    assert "--revision 'v1' was given for the local folder" in err and "revision=" not in err


def test_convert_into_a_detector_folder_needs_overwrite_and_leaves_no_stale_file(tmp_path, capsys):
    import torch
    from torchvision.models import resnet18

    from insloc_hub.detectors import build_detector

    (tmp_path / "load_report.json").write_text("{}")
    detector = build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn")
    out = save_pretrained(detector, tmp_path / "out", extra_files={"load_report.json": tmp_path / "load_report.json"})
    checkpoint = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), checkpoint)
    assert main(["convert", "torchvision", str(checkpoint), str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a detection model" in err and "pass --overwrite" in err and "overwrite=True" not in err
    assert json.loads((out / "config.json").read_text())["task"] == "detection"
    assert main(["convert", "torchvision", str(checkpoint), str(out), "--overwrite"]) == 0
    assert not (out / "load_report.json").exists()
    assert json.loads((out / "config.json").read_text())["task"] == "backbone"


def test_convert_refuses_a_missing_file(tmp_path, capsys):
    assert main(["convert", "moco", str(tmp_path / "nope.pth"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
