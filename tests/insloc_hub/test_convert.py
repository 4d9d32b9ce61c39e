"""Conversion at the borders: official InstanceLoc / torchvision / MoCo in, detectron2 out."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from insloc_hub.convert import (
    C4_PROJ,
    CLASSIFIER,
    MOCO_MLP,
    MOMENTUM,
    PROJ_CLS,
    PROJ_FC2,
    QUEUE,
    UNKNOWN,
    convert_moco,
    convert_official,
    convert_to_folder,
    convert_torchvision_resnet,
    export_detectron2,
)
from insloc_hub.errors import CheckpointError, ConfigError, WeightsMismatchError
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained
from tests.insloc_hub.official_layout import official_state_dict_from_bundle
from tests.insloc_hub.test_models import roi_features


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSLOC_HUB_CACHE", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest


def _trained_like(name: str, seed: int = 0) -> InsLocBackbone:
    """A tiny bundle whose BN statistics are not the defaults (so running stats are really checked)."""
    torch.manual_seed(seed)
    model = InsLocBackbone(name)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.num_batches_tracked.fill_(1234)
    return model.eval()


def _assert_same_outputs(a: InsLocBackbone, b: InsLocBackbone) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 0.0, 63.0, 30.0]]), torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    with torch.no_grad():
        fa, fb = a.forward_features(images), b.forward_features(images)
        assert list(fa) == list(fb)
        for key in fa:
            assert torch.equal(fa[key], fb[key]), key
        assert torch.equal(roi_features(a, images, boxes), roi_features(b, images, boxes))
        assert torch.equal(a.forward_embedding(images), b.forward_embedding(images))


# ---------------------------------------------------------------------------------------------------------------------
# official InstanceLoc checkpoints


@pytest.mark.parametrize("name,ddp", [("tiny-fpn", False), ("tiny-fpn", True), ("tiny-c4", False)])
def test_official_checkpoint_round_trips_through_a_hub_folder(tmp_path, name, ddp):
    original = _trained_like(name)
    src = tmp_path / "insloc_200ep.pth"
    checkpoint = official_state_dict_from_bundle(original, ddp_prefix=ddp, path=src)
    assert checkpoint["meta"]["epoch"] == 200

    folder, report = convert_to_folder("official", src, tmp_path / "hub", provenance={"epochs": 200})
    loaded = from_pretrained(folder)
    assert loaded.config == original.config
    _assert_same_outputs(original, loaded)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())

    # every source tensor is accounted for
    source_keys = {k.removeprefix("module.") for k in checkpoint["state_dict"]}
    assert set(report.mapped) | set(report.dropped) == source_keys
    assert set(report.mapped.values()) == set(original.state_dict())
    assert report.dropped["queue"] == report.dropped["queues"] == report.dropped["queue_ptr"] == QUEUE
    assert report.dropped["backbone_k.conv1.weight"] == MOMENTUM
    assert {r for k, r in report.dropped.items() if k.startswith(("backbone_k.", "roi_head_k."))} == {MOMENTUM}
    if name == "tiny-fpn":
        assert report.dropped["neck_k.lateral_convs.0.bn.running_var"] == MOMENTUM
        assert report.dropped["roi_head.bbox_head.shared_fcs.1.weight"] == PROJ_FC2
        assert report.dropped["roi_head.bbox_head.fc_cls.weight"] == PROJ_CLS
        assert report.mapped["neck.lateral_convs.0.bn.running_mean"] == "fpn.lateral.p2.norm.running_mean"
        assert report.mapped["neck.fpn_convs.3.conv.weight"] == "fpn.output.p5.conv.weight"
        assert report.mapped["roi_head.bbox_head.shared_convs.3.bn.weight"] == "box_head.convs.3.norm.weight"
        assert report.mapped["roi_head.bbox_head.shared_fcs.0.weight"] == "box_head.fc1.weight"
    else:
        assert report.dropped["roi_head.bbox_head.fc_cls.weight"] == C4_PROJ
        assert report.mapped["roi_head.shared_head.layer4.0.downsample.1.running_var"] == (
            "box_head.layer4.0.downsample.1.running_var")
    assert "momentum" in report.summary() and "fc_cls" in report.summary()

    config = json.loads((folder / "config.json").read_text())
    prov = config["provenance"]
    assert prov["source_file"] == "insloc_200ep.pth" and prov["source_format"] == "insloc-official"
    assert prov["converted_with"] == "insloc_hub.convert.convert_official" and prov["epochs"] == 200
    assert prov["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert {d["reason"] for d in prov["dropped"]} == set(report.dropped.values())


def test_official_variant_detection_and_depth_checks(tmp_path):
    src = tmp_path / "fpn.pth"
    official_state_dict_from_bundle(_trained_like("tiny-fpn"), with_momentum=False, path=src)
    bundle, report = convert_official(src, variant="fpn", depth=18)
    assert bundle.config.variant == "fpn" and bundle.config.depth == 18 and bundle.config.width == 16
    assert set(report.dropped.values()) == {PROJ_FC2, PROJ_CLS}
    with pytest.raises(ConfigError, match="not a c4 checkpoint"):
        convert_official(src, variant="c4")
    with pytest.raises(ConfigError, match="ResNet-18.*not the ResNet-50"):
        convert_official(src, depth=50)


def test_unknown_official_key_is_named_unless_not_strict(tmp_path):
    checkpoint = official_state_dict_from_bundle(_trained_like("tiny-fpn"))
    checkpoint["state_dict"]["rpn_head.mystery.weight"] = torch.zeros(3)
    src = tmp_path / "odd.pth"
    torch.save(checkpoint, src)
    with pytest.raises(WeightsMismatchError, match=r"rpn_head\.mystery\.weight"):
        convert_official(src)
    _, report = convert_official(src, strict=False)
    assert report.dropped["rpn_head.mystery.weight"] == UNKNOWN


def test_incomplete_official_checkpoint_lists_missing_tensors(tmp_path):
    checkpoint = official_state_dict_from_bundle(_trained_like("tiny-fpn"))
    del checkpoint["state_dict"]["neck.fpn_convs.2.bn.running_mean"]
    src = tmp_path / "partial.pth"
    torch.save(checkpoint, src)
    with pytest.raises(WeightsMismatchError, match=r"fpn\.output\.p4\.norm\.running_mean"):
        convert_official(src)


class _Custom:
    """Stands for anything a checkpoint could pickle beyond tensors and containers."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_files_that_need_pickle_are_refused(tmp_path):
    src = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "meta": _Custom()}, src)
    with pytest.raises(CheckpointError, match=r"refusing to load .*_Custom.*never unpickles such files") as caught:
        convert_official(src)
    assert "weights_only=False" not in str(caught.value)  # never advise unpickling a foreign file
    with pytest.raises(CheckpointError, match="refusing"):
        convert_moco(src)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        convert_torchvision_resnet(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read .*garbage.pth as a PyTorch checkpoint"):
        convert_official(garbage)


# ---------------------------------------------------------------------------------------------------------------------
# torchvision and MoCo


def _torchvision_stages(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        out.append(x)
    return out


def _randomised_resnet18() -> torch.nn.Module:
    torch.manual_seed(3)
    model = resnet18(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_torchvision_resnet_to_folder_matches_torchvision_features(tmp_path):
    reference = _randomised_resnet18()
    src = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), src)
    folder, report = convert_to_folder("torchvision", src, tmp_path / "hub")
    assert report.dropped == {"fc.weight": CLASSIFIER, "fc.bias": CLASSIFIER}
    loaded = from_pretrained(folder)
    assert loaded.config.parts == ("trunk",) and loaded.config.depth == 18 and loaded.config.width == 64
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = list(loaded.forward_features(images).values())
        theirs = _torchvision_stages(reference, images)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert json.loads((folder / "config.json").read_text())["provenance"]["source_format"] == "torchvision"


def test_torchvision_resnet_c4_puts_layer4_in_the_res5_head():
    reference = _randomised_resnet18()
    bundle, report = convert_torchvision_resnet(reference.state_dict(), variant="c4")
    assert bundle.config.variant == "c4" and bundle.config.parts == ("trunk", "box_head")
    assert report.mapped["layer4.1.bn2.running_var"] == "box_head.layer4.1.bn2.running_var"
    assert report.mapped["layer3.0.downsample.0.weight"] == "trunk.layer3.0.downsample.0.weight"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(reference.avgpool(_torchvision_stages(reference, images)[-1]), 1)
        assert torch.equal(bundle.forward_embedding(images), expected)


def _moco_checkpoint(reference: torch.nn.Module, v2: bool = True) -> dict:
    sd = reference.state_dict()
    state: dict[str, torch.Tensor] = OrderedDict()
    for prefix in ("encoder_q", "encoder_k"):
        for key, value in sd.items():
            if not key.startswith("fc."):
                state[f"module.{prefix}.{key}"] = value.clone()
        if v2:
            state[f"module.{prefix}.fc.0.weight"] = torch.randn(512, 512)
            state[f"module.{prefix}.fc.0.bias"] = torch.zeros(512)
            state[f"module.{prefix}.fc.2.weight"] = torch.randn(128, 512)
            state[f"module.{prefix}.fc.2.bias"] = torch.zeros(128)
        else:
            state[f"module.{prefix}.fc.weight"] = torch.randn(128, 512)
            state[f"module.{prefix}.fc.bias"] = torch.zeros(128)
    state["module.queue"] = torch.randn(128, 32)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet18", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}


@pytest.mark.parametrize("v2", [True, False])
def test_moco_checkpoint_to_folder_matches_encoder_q(tmp_path, v2):
    reference = _randomised_resnet18()
    src = tmp_path / "moco.pth.tar"
    torch.save(_moco_checkpoint(reference, v2), src)
    folder, report = convert_to_folder("moco", src, tmp_path / "hub")
    loaded = from_pretrained(folder)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in
                   zip(loaded.forward_features(images).values(), _torchvision_stages(reference, images)))
    reasons = report.dropped_by_reason()
    assert set(reasons) == {MOMENTUM, QUEUE, MOCO_MLP}
    assert reasons[QUEUE] == ["queue", "queue_ptr"]
    assert all(k.startswith("encoder_q.fc.") for k in reasons[MOCO_MLP])
    assert report.mapped["encoder_q.layer1.0.bn1.weight"] == "trunk.layer1.0.bn1.weight"
    with pytest.raises(CheckpointError, match="not a MoCo checkpoint"):
        src2 = tmp_path / "plain.pth"
        torch.save(reference.state_dict(), src2)
        convert_moco(src2)


def test_unknown_torchvision_key_is_named():
    state = resnet18(weights=None).state_dict()
    state["attention.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match=r"attention\.weight"):
        convert_torchvision_resnet(state)
    _, report = convert_torchvision_resnet(state, strict=False)
    assert report.dropped["attention.weight"] == UNKNOWN


# ---------------------------------------------------------------------------------------------------------------------
# detectron2 export


def _official_converter(state: dict[str, torch.Tensor], c4: bool) -> dict[str, np.ndarray]:
    """The rules of limbo0000/InstanceLoc transfer/detection/convert_pretrained.py, restated as a test oracle
    (substring tests and replacements in the same order as that script)."""
    out = {}
    for k, v in state.items():
        k = k.replace("roi_head.shared_head", "backbone")
        if not c4 and "roi_head.bbox_head.shared_fcs" in k:
            out[k.replace("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc1.")] = v.numpy()
            continue
        blocks = [("bn1", "conv1.norm"), ("bn2", "conv2.norm"), ("bn3", "conv3.norm"),
                  ("downsample.0", "shortcut"), ("downsample.1", "shortcut.norm")]
        if "backbone" in k and "backbone_k" not in k and "layer" not in k:
            k = k.replace("backbone", "backbone.stem" if c4 else "backbone.bottom_up.stem").replace("bn1", "conv1.norm")
        elif "backbone" in k and "backbone_k" not in k:
            if c4 and "layer4" in k:
                k = k.replace("backbone", "roi_heads").replace("layer4", "res5")
            elif not c4:
                k = k.replace("backbone", "backbone.bottom_up")
            for i in range(4):
                k = k.replace(f"layer{i + 1}", f"res{i + 2}")
            for old, new in blocks:
                k = k.replace(old, new)
        elif "neck" in k and "neck_k" not in k:
            for i in range(4):
                for kind, d2 in (("lateral_convs", "fpn_lateral"), ("fpn_convs", "fpn_output")):
                    k = k.replace(f"neck.{kind}.{i}.bn", f"backbone.{d2}{i + 2}.norm")
                    k = k.replace(f"neck.{kind}.{i}.conv", f"backbone.{d2}{i + 2}")
        elif "roi_head.bbox_head.shared_convs" in k:
            i = int(k.split(".")[3])
            k = k.replace(f"roi_head.bbox_head.shared_convs.{i}.conv.", f"roi_heads.box_head.conv{i + 1}.")
            k = k.replace(f"roi_head.bbox_head.shared_convs.{i}.bn.", f"roi_heads.box_head.conv{i + 1}.norm.")
        else:
            continue
        out[k] = v.numpy()
    return out


FPN_EXPECTED = [
    "backbone.bottom_up.stem.conv1.weight",
    "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.bottom_up.res2.0.conv1.norm.running_mean",
    "backbone.bottom_up.res3.0.shortcut.weight",
    "backbone.bottom_up.res3.0.shortcut.norm.bias",
    "backbone.bottom_up.res5.1.conv2.norm.weight",
    "backbone.fpn_lateral2.weight",
    "backbone.fpn_lateral2.norm.weight",
    "backbone.fpn_output5.norm.running_mean",
    "roi_heads.box_head.conv1.weight",
    "roi_heads.box_head.conv1.norm.running_var",
    "roi_heads.box_head.conv4.norm.bias",
    "roi_heads.box_head.fc1.weight",
    "roi_heads.box_head.fc1.bias",
]
C4_EXPECTED = [
    "backbone.stem.conv1.weight",
    "backbone.stem.conv1.norm.running_mean",
    "backbone.res2.0.conv1.weight",
    "backbone.res4.0.shortcut.norm.running_var",
    "roi_heads.res5.0.conv1.weight",
    "roi_heads.res5.0.conv1.norm.weight",
    "roi_heads.res5.0.shortcut.weight",
    "roi_heads.res5.1.conv2.norm.running_var",
]


@pytest.mark.parametrize("name,expected", [("tiny-fpn", FPN_EXPECTED), ("tiny-c4", C4_EXPECTED)])
def test_detectron2_export_matches_the_official_converter(tmp_path, name, expected):
    bundle = _trained_like(name)
    official_state_dict_from_bundle(bundle, path=tmp_path / "src.pth")
    folder, _ = convert_to_folder("official", tmp_path / "src.pth", tmp_path / "hub")
    out = tmp_path / "d2" / "model.pkl"
    report = export_detectron2(folder, out)
    with open(out, "rb") as f:  # our own file, just written
        data = pickle.load(f)
    assert data["matching_heuristics"] is True and data["__author__"] == "insloc-hub"
    model = data["model"]
    assert set(expected) <= set(model)
    assert not any("num_batches_tracked" in k for k in model)
    assert all(isinstance(v, np.ndarray) for v in model.values())

    c4 = name == "tiny-c4"
    official = _official_converter(official_state_dict_from_bundle(bundle)["state_dict"], c4)
    official = {k: v for k, v in official.items()
                if not k.endswith("num_batches_tracked") and "shared_fcs.1" not in k}
    assert set(model) == set(official)
    assert all(np.array_equal(model[k], official[k]) for k in model)
    state = bundle.state_dict()
    assert np.array_equal(model[report.mapped["trunk.layer1.0.bn1.running_mean"]],
                          state["trunk.layer1.0.bn1.running_mean"].numpy())
    assert all("num_batches_tracked" in k for k in report.dropped)


def test_detectron2_c4_export_of_a_torchvision_trunk(tmp_path):
    bundle, _ = convert_torchvision_resnet(_randomised_resnet18().state_dict())
    report = export_detectron2(bundle, tmp_path / "r18.pkl", c4=True)
    assert report.mapped["trunk.layer4.0.downsample.1.weight"] == "roi_heads.res5.0.shortcut.norm.weight"
    assert report.mapped["trunk.layer3.1.conv2.weight"] == "backbone.res4.1.conv2.weight"
    assert report.mapped["trunk.bn1.bias"] == "backbone.stem.conv1.norm.bias"
    c4_bundle = _trained_like("tiny-c4")
    as_fpn = export_detectron2(c4_bundle, tmp_path / "c4_as_fpn.pkl", c4=False)
    assert as_fpn.mapped["box_head.layer4.0.conv1.weight"] == "backbone.bottom_up.res5.0.conv1.weight"
    assert as_fpn.mapped["trunk.conv1.weight"] == "backbone.bottom_up.stem.conv1.weight"
    with pytest.raises(ConfigError, match="no place in a C4 detector"):
        export_detectron2(InsLocBackbone("tiny-fpn"), tmp_path / "unused.pkl", c4=True)
    assert not (tmp_path / "unused.pkl").exists()
