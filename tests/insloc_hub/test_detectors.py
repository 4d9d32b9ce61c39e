"""build_detector: structure, torchvision parity, training and inference on real photos, loading."""

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2
from torchvision.ops.misc import FrozenBatchNorm2d

from insloc_hub import build_detector
from insloc_hub.detectors import ARCHITECTURES, build_detector_from_config, load_pretrained_into_detector
from insloc_hub.errors import ConfigError, WeightsMismatchError
from insloc_hub.models import InsLocBackbone
from insloc_hub.transforms import to_tensor
from tests.photos import photo

# small RoI budgets keep depth-50 steps affordable on 2 CPU cores
FAST = dict(min_size=160, max_size=224, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("num_classes", [2, 91])
def test_parameter_counts_equal_torchvision_v2(num_classes):
    assert n_params(build_detector("faster_rcnn_fpn", num_classes)) == n_params(
        fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes))
    assert n_params(build_detector("mask_rcnn_fpn", num_classes)) == n_params(
        maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes))


@pytest.fixture(scope="module")
def photos():
    images = [to_tensor(photo("astronaut")), to_tensor(photo("coffee"))]
    targets = [
        {"boxes": torch.tensor([[140.0, 20.0, 360.0, 260.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[90.0, 40.0, 330.0, 310.0]]), "labels": torch.tensor([2])},
    ]
    for image, target in zip(images, targets):
        x1, y1, x2, y2 = target["boxes"][0].int().tolist()
        target["masks"] = torch.zeros(1, *image.shape[1:], dtype=torch.uint8)
        target["masks"][0, y1:y2, x1:x2] = 1
    return images, targets


def _train_and_infer(model, images, targets):
    model.train()
    losses = model(images, [dict(t) for t in targets])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.trunk.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == len(images)
    for out, image in zip(outputs, images):
        assert out["boxes"].shape[1] == 4 and out["scores"].shape == out["labels"].shape
        if len(out["boxes"]):
            assert (out["boxes"][:, 2] <= image.shape[2] + 1e-3).all()
    return losses


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_detectors_train_and_infer_on_photos(arch, photos):
    variant = "c4" if arch == "faster_rcnn_c4" else "fpn"
    model = build_detector(arch, class_names=["person", "cup"], backbone=f"tiny-{variant}", **FAST)
    losses = _train_and_infer(model, *photos)
    expected = {"bbox_regression", "classification"} if arch == "retinanet_fpn" else {
        "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if arch == "mask_rcnn_fpn":
        expected.add("loss_mask")
    assert set(losses) == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_depth50_detectors_train_and_infer_on_photos(arch, photos):
    model = build_detector(arch, 3, **FAST)
    assert model.backbone.trunk.depth == 50
    _train_and_infer(model, *photos)


def test_pretrained_bundle_loads_and_reports():
    torch.manual_seed(0)
    bundle = InsLocBackbone("tiny-fpn")
    model = build_detector("faster_rcnn_fpn", 3, pretrained=bundle)
    report = model.load_report
    state = model.state_dict()
    for key, tensor in bundle.state_dict().items():
        prefix = {"trunk": "backbone.trunk.", "fpn": "backbone.fpn.", "box_head": "roi_heads.box_head."}
        dest = prefix[key.split(".")[0]] + key.split(".", 1)[1]
        assert torch.equal(state[dest], tensor)
        assert dest in report.loaded
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report.new} == {"rpn.head", "roi_heads.box_predictor"}
    assert not report.ignored


def test_c4_bundle_loads_res5_into_box_head():
    bundle = InsLocBackbone("tiny-c4")
    model = build_detector("faster_rcnn_c4", 3, pretrained=bundle)
    assert torch.equal(model.roi_heads.box_head.layer4[0].conv1.weight, bundle.box_head.layer4[0].conv1.weight)
    assert any(k.startswith("roi_heads.box_head.layer4") for k in model.load_report.loaded)


def test_retinanet_reports_the_parts_it_does_not_use():
    model = build_detector("retinanet_fpn", 3, pretrained=InsLocBackbone("tiny-fpn"))
    reasons = set(model.load_report.ignored.values())
    assert any("no RoI box head" in r for r in reasons) and any("P2" in r for r in reasons)
    assert all(k.startswith(("box_head.", "fpn.lateral.p2", "fpn.output.p2")) for k in model.load_report.ignored)


def test_shape_mismatch_raises_with_key_names():
    bundle = InsLocBackbone("tiny-fpn")
    state = bundle.state_dict()
    state["fpn.output.p3.conv.weight"] = torch.zeros(32, 32, 1, 1)
    model = build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn")
    with pytest.raises(WeightsMismatchError, match=r"fpn\.output\.p3\.conv\.weight: pretrained \(32, 32, 1, 1\)"):
        load_pretrained_into_detector(model, state)


def test_unused_pretrained_tensor_raises_unless_not_strict():
    state = InsLocBackbone("tiny-fpn").state_dict()
    state["box_head.fc2.weight"] = torch.zeros(64, 64)
    model = build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn")
    with pytest.raises(WeightsMismatchError, match=r"box_head\.fc2\.weight"):
        load_pretrained_into_detector(model, state)
    report = load_pretrained_into_detector(model, state, strict=False)
    assert "box_head.fc2.weight" in report.ignored
    assert "roi_heads.box_head.fc1.weight" in report.loaded


def test_missing_tensor_of_a_pretrained_part_raises():
    state = InsLocBackbone("tiny-fpn").state_dict()
    del state["trunk.layer3.0.bn1.running_var"]
    model = build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn")
    with pytest.raises(WeightsMismatchError, match=r"backbone\.trunk\.layer3\.0\.bn1\.running_var"):
        load_pretrained_into_detector(model, state)


def test_trunk_only_bundle_leaves_fpn_and_head_new():
    bundle = InsLocBackbone({"depth": 18, "width": 16, "fpn_channels": 32, "head_channels": 32, "head_fc": 64,
                             "parts": ["trunk"]})
    model = build_detector("faster_rcnn_fpn", 3, pretrained=bundle)
    assert any(k.startswith("backbone.fpn.") for k in model.load_report.new)
    assert all(k.startswith("backbone.trunk.") for k in model.load_report.loaded)


def test_variant_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs a fpn backbone"):
        build_detector("faster_rcnn_fpn", 3, pretrained=InsLocBackbone("tiny-c4"))


def test_norm_modes_and_nothing_frozen_by_default():
    model = build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn")
    assert all(p.requires_grad for p in model.parameters())
    frozen = build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn", norm="frozen")
    assert isinstance(frozen.backbone.trunk.bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    sync = build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn", norm="sync")
    assert isinstance(sync.backbone.trunk.bn1, torch.nn.SyncBatchNorm)
    with pytest.raises(ConfigError, match="norm mode"):
        build_detector("faster_rcnn_fpn", 3, backbone="tiny-fpn", norm="group")


def test_frozen_bn_keeps_pretrained_statistics():
    bundle = InsLocBackbone("tiny-fpn")
    bundle.trunk.bn1.running_mean.fill_(0.5)
    model = build_detector("faster_rcnn_fpn", 3, pretrained=bundle, norm="frozen")
    assert torch.allclose(model.backbone.trunk.bn1.running_mean, torch.full((16,), 0.5))


def test_torchvision_knobs_pass_through_and_config_round_trips():
    model = build_detector("faster_rcnn_fpn", class_names=["a", "b"], backbone="tiny-fpn", min_size=200,
                           box_score_thresh=0.3, box_head_extra_norm=True)
    assert model.transform.min_size == (200,) and model.roi_heads.score_thresh == 0.3
    assert model.roi_heads.box_head.extra_norm is not None
    rebuilt = build_detector_from_config(model.insloc_config.to_dict())
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert rebuilt.insloc_config == model.insloc_config


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown detector architecture"):
        build_detector("yolo")
    with pytest.raises(ConfigError, match="len\\(class_names\\) \\+ 1"):
        build_detector("faster_rcnn_fpn", 2, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="at least 2"):
        build_detector("faster_rcnn_fpn", 1)
