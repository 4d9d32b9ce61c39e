"""The shared model modules: trunk layout, FPN, heads and the backbone bundle."""

import pytest
import torch
from torchvision.models import resnet18, resnet50
from torchvision.ops import MultiScaleRoIAlign

from insloc_hub.errors import ConfigError
from insloc_hub.models import FPN, BackboneConfig, BoxHead, InsLocBackbone, Res5Head, ResNetTrunk


def roi_features(model: InsLocBackbone, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """A bundle's box-head features ``[sum(N_i), D]`` for xyxy boxes on each image, pooled as the detectors
    pool (torchvision's FPN level mapping; 14x14 on c4 then res5 for C4): the box head's behaviour under test."""
    feats = model.forward_features(images)
    names, ratio = (["p2", "p3", "p4", "p5"], 2) if model.config.variant == "fpn" else (["c4"], 0)
    pooler = MultiScaleRoIAlign(names, model.config.roi_size, ratio)
    image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
    return model.box_head(pooler({k: feats[k] for k in names}, [b.to(images.dtype) for b in boxes], image_sizes))


@pytest.mark.parametrize("depth,factory", [(18, resnet18), (50, resnet50)])
def test_trunk_has_torchvision_names_and_shapes(depth, factory):
    trunk = ResNetTrunk(depth)
    reference = factory(weights=None).state_dict()
    ours = trunk.state_dict()
    assert set(ours) == {k for k in reference if not k.startswith("fc.")}
    assert all(ours[k].shape == reference[k].shape for k in ours)


def test_trunk_loads_torchvision_weights_and_matches_its_features():
    reference = resnet50(weights=None).eval()
    trunk = ResNetTrunk(50).eval()
    trunk.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    body = torch.nn.Sequential(*list(reference.children())[:-2])
    torch.testing.assert_close(trunk(x)["c5"], body(x))


def test_feature_info_lists_names_channels_strides():
    trunk = ResNetTrunk(18, width=16)
    feats = trunk(torch.zeros(1, 3, 64, 64))
    for info in trunk.feature_info:
        assert feats[info["name"]].shape[1] == info["num_chs"]
        assert 64 // feats[info["name"]].shape[-1] == info["reduction"]
        assert trunk.get_submodule(info["module"]) is not None
    assert [i["name"] for i in ResNetTrunk(18, width=16, num_stages=3).feature_info] == ["c2", "c3", "c4"]


def test_stride_sits_in_the_3x3_conv():
    block = ResNetTrunk(50).layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_fpn_has_bn_no_activation_and_p2_to_p5():
    fpn = FPN([16, 32, 64, 128], 8)
    assert all(not isinstance(m, torch.nn.ReLU) for m in fpn.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fpn.modules()) == 8
    assert all(m.bias is None for m in fpn.modules() if isinstance(m, torch.nn.Conv2d))
    out = fpn([torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([16, 32, 64, 128])])
    assert list(out) == ["p2", "p3", "p4", "p5"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_fpn_top_down_uses_nearest_upsampling():
    fpn = FPN([4, 4], 4).eval()
    for lv in fpn.levels:  # identity laterals and outputs expose the top-down sum
        for conv_norm in (fpn.lateral[lv], fpn.output[lv]):
            w = torch.zeros_like(conv_norm.conv.weight)
            centre = w.shape[-1] // 2
            w[range(4), range(4), centre, centre] = 1.0
            conv_norm.conv.weight.data = w
    c2, c3 = torch.zeros(1, 4, 4, 4), torch.arange(16.0).view(1, 4, 2, 2)
    eps = fpn.lateral["p2"].norm.eps
    out = fpn([c2, c3])
    expected = c3.repeat_interleave(2, -1).repeat_interleave(2, -2) / (1 + eps) ** 0.5 / (1 + eps) ** 0.5
    torch.testing.assert_close(out["p2"], expected)


def test_box_head_matches_official_shape():
    head = BoxHead()
    assert len(head.convs) == 4
    assert head.fc1.in_features == 256 * 7 * 7 and head.fc1.out_features == 1024
    assert head(torch.randn(3, 256, 7, 7)).shape == (3, 1024)
    assert BoxHead(32, 7, 32, 4, 64, extra_norm=True).extra_norm.num_features == 64


def test_res5_head_halves_resolution_and_pools():
    head = Res5Head(50)
    assert head.layer4[0].conv2.stride == (2, 2)
    assert head(torch.randn(2, 1024, 14, 14)).shape == (2, 2048)


@pytest.mark.parametrize("arch", ["tiny-fpn", "tiny-c4"])
def test_bundle_features_embedding_and_roi_features(arch):
    model = InsLocBackbone(arch).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert [i["name"] for i in model.feature_info] == list(feats)
    emb = model.forward_embedding(x)
    assert emb.shape == (2, model.embedding_dim)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 50.0]]), torch.tensor([[0.0, 0.0, 64.0, 64.0], [10, 10, 20, 30]])]
    assert roi_features(model, x, boxes).shape[0] == 3


def test_bundle_keys_are_the_hub_contract():
    keys = InsLocBackbone("tiny-fpn").state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"trunk", "fpn", "box_head"}
    assert "fpn.lateral.p2.conv.weight" in keys and "box_head.fc1.weight" in keys
    c4_keys = InsLocBackbone("tiny-c4").state_dict().keys()
    assert "box_head.layer4.0.conv1.weight" in c4_keys and not any(k.startswith("trunk.layer4") for k in c4_keys)


def test_config_round_trip_and_errors():
    cfg = BackboneConfig(depth=18, width=16, parts=("trunk",))
    assert BackboneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="depth"):
        BackboneConfig(depth=42)
    with pytest.raises(ConfigError, match="variant"):
        BackboneConfig(variant="c5")
    with pytest.raises(ConfigError, match="unknown architecture"):
        InsLocBackbone("r77-fpn")
    with pytest.raises(ConfigError, match="unknown architecture fields"):
        BackboneConfig.from_dict({"depth": 50, "colour": "blue"})
