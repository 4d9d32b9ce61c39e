"""The transfer experiment's rows: derived inits keep exactly their parts, commands carry each row's flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from insloc_hub import InsLocBackbone, build_detector, from_pretrained, save_pretrained
from insloc_hub.models.backbone import backbone_config
from insloc_hub.training.pretraining import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import transfer_raccoon  # noqa: E402


@pytest.mark.parametrize("parts", [("trunk",), ("trunk", "fpn")])
def test_parts_folder_keeps_those_parts_with_their_weights(tmp_path: Path, parts: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    full = InsLocBackbone(backbone_config("tiny-fpn"))
    folder = transfer_raccoon.parts_folder(save_pretrained(full, tmp_path / "full", name="full"),
                                           tmp_path / "kept", parts)
    kept = from_pretrained(folder)
    assert kept.config.parts == parts
    state, reference = kept.state_dict(), full.state_dict()
    assert {k.split(".")[0] for k in state} == set(parts)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    detector = build_detector("faster_rcnn_fpn", 2, pretrained=kept)  # the missing parts start from their init
    trunk_weight = next(v for k, v in detector.state_dict().items() if k.endswith("conv1.weight"))
    assert torch.equal(trunk_weight, reference["trunk.conv1.weight"])


def test_every_row_names_a_known_pretraining_and_part() -> None:
    for name, row in transfer_raccoon.ROW_SPECS.items():
        assert row.pretraining is None or row.pretraining in transfer_raccoon.PRETRAININGS, name
        assert row.parts is None or set(row.parts) <= {"trunk", "fpn", "box_head"}, name
    assert set(transfer_raccoon.ROWS) <= set(transfer_raccoon.ROW_SPECS)
    assert transfer_raccoon.ROW_SPECS["insloc-xnorm"].finetune_flags == ("--box-head-extra-norm",)
    assert transfer_raccoon.ROW_SPECS["insloc-newfc"].finetune_flags == ("--reinit", "box_head.fc1")


def test_unknown_row_is_refused_with_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        transfer_raccoon.main(["--work", str(tmp_path), "--table", str(tmp_path / "t.md"), "--rows", "random,nope"])
    assert exit_info.value.code == 2
    assert "unknown rows ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "epochs"), [("insloc-c256", 60), ("moco-c256", 60), ("insloc-c256-e240", 240),
                                             ("moco-c256-e240", 240)])
def test_c256_pretrainings_resolve_to_the_official_canvas_and_keep_the_rest_of_the_budget(tmp_path: Path, name: str,
                                                                                       epochs: int) -> None:
    method, flags = transfer_raccoon.PRETRAININGS[name]
    budget = transfer_raccoon.CONFIGS["cpu"]
    preset = "small-data" if method == "insloc" else None
    cmd = transfer_raccoon.pretrain_command(method, tmp_path, tmp_path / "out", budget, "cpu", 0, preset) + list(flags)
    parser = argparse.ArgumentParser()
    pretrain.add_subcommands(parser.add_subparsers())
    args = parser.parse_args(cmd[len(transfer_raccoon.CLI):])
    cfg = pretrain.config_from_args(args)
    assert cfg.canvas == 256 and budget.pretrain_canvas == 128
    assert (cfg.method, cfg.epochs, cfg.batch_size, cfg.queue_size) == (method, epochs, 16, 256)
