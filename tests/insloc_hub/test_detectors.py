"""build_detector: structure, torchvision parity, training and inference on real photos, loading."""

import re
from pathlib import Path

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

# small RoI budgets keep depth-50 steps affordable on 2 CPU cores; thresholds at 0 so that untrained
# detectors still return boxes to check
RCNN_FAST = dict(min_size=160, max_size=224, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                 rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                 box_score_thresh=0.0)
RETINA_FAST = dict(min_size=160, max_size=224, score_thresh=0.0, topk_candidates=100)


def fast(arch):
    return RETINA_FAST if arch == "retinanet_fpn" else RCNN_FAST


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
        assert len(out["boxes"]) > 0 and out["boxes"].shape[1] == 4
        assert out["scores"].shape == out["labels"].shape == out["boxes"].shape[:1]
        assert (out["boxes"][:, 2] <= image.shape[2] + 1e-3).all()
        assert (out["boxes"][:, 3] <= image.shape[1] + 1e-3).all()
    return losses


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_detectors_train_and_infer_on_photos(arch, photos):
    variant = "c4" if arch == "faster_rcnn_c4" else "fpn"
    model = build_detector(arch, class_names=["person", "cup"], preset=f"tiny-{variant}", **fast(arch))
    losses = _train_and_infer(model, *photos)
    expected = {"bbox_regression", "classification"} if arch == "retinanet_fpn" else {
        "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if arch == "mask_rcnn_fpn":
        expected.add("loss_mask")
    assert set(losses) == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_depth50_detectors_train_and_infer_on_photos(arch, photos):
    model = build_detector(arch, 3, **fast(arch))
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
    model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn")
    with pytest.raises(WeightsMismatchError, match=r"fpn\.output\.p3\.conv\.weight: given \(32, 32, 1, 1\)"):
        load_pretrained_into_detector(model, state)


def test_unused_pretrained_tensor_raises_unless_not_strict():
    state = InsLocBackbone("tiny-fpn").state_dict()
    state["box_head.fc2.weight"] = torch.zeros(64, 64)
    model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn")
    with pytest.raises(WeightsMismatchError, match=r"box_head\.fc2\.weight"):
        load_pretrained_into_detector(model, state)
    report = load_pretrained_into_detector(model, state, strict=False)
    assert "box_head.fc2.weight" in report.ignored
    assert "roi_heads.box_head.fc1.weight" in report.loaded


def test_missing_tensor_of_a_pretrained_part_raises():
    state = InsLocBackbone("tiny-fpn").state_dict()
    del state["trunk.layer3.0.bn1.running_var"]
    model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn")
    with pytest.raises(WeightsMismatchError, match=r"backbone\.trunk\.layer3\.0\.bn1\.running_var"):
        load_pretrained_into_detector(model, state)


def test_trunk_only_bundle_leaves_fpn_and_head_new():
    bundle = InsLocBackbone({"depth": 18, "width": 16, "fpn_channels": 32, "head_channels": 32, "head_fc": 64,
                             "parts": ["trunk"]})
    model = build_detector("faster_rcnn_fpn", 3, pretrained=bundle)
    assert any(k.startswith("backbone.fpn.") for k in model.load_report.new)
    assert all(k.startswith("backbone.trunk.") for k in model.load_report.loaded)


def test_reinit_leaves_the_named_layers_fresh_and_loads_the_rest():
    torch.manual_seed(0)
    bundle = InsLocBackbone("tiny-fpn")
    with torch.no_grad():
        for p in bundle.parameters():
            p.add_(1.0)  # pretrained values no fresh init produces
    model = build_detector("faster_rcnn_fpn", 3, pretrained=bundle, reinit="box_head.fc1")
    state, pretrained = model.state_dict(), bundle.state_dict()
    assert torch.equal(state["roi_heads.box_head.convs.0.conv.weight"], pretrained["box_head.convs.0.conv.weight"])
    assert torch.equal(state["roi_heads.box_head.fc1.bias"], torch.zeros_like(state["roi_heads.box_head.fc1.bias"]))
    assert not torch.equal(state["roi_heads.box_head.fc1.weight"], pretrained["box_head.fc1.weight"])
    report = model.load_report
    assert report.ignored == {"box_head.fc1.weight": "left at its fresh initialisation (reinit)",
                              "box_head.fc1.bias": "left at its fresh initialisation (reinit)"}
    assert "roi_heads.box_head.fc1.weight" in report.new and "roi_heads.box_head.fc1.weight" not in report.loaded
    whole_head = build_detector("faster_rcnn_fpn", 3, pretrained=bundle, reinit=["box_head", "fpn"])
    assert all(k.startswith("backbone.trunk.") for k in whole_head.load_report.loaded)


def test_reinit_names_are_checked():
    bundle = InsLocBackbone("tiny-fpn")
    with pytest.raises(ConfigError, match=r"reinit 'box_head.fc' names no pretrained layer.*box_head.fc1"):
        build_detector("faster_rcnn_fpn", 3, pretrained=bundle, reinit=["box_head.fc"])
    with pytest.raises(ConfigError, match="needs pretrained="):
        build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", reinit=["box_head.fc1"])


def test_variant_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs a fpn backbone"):
        build_detector("faster_rcnn_fpn", 3, pretrained=InsLocBackbone("tiny-c4"))


def test_faster_rcnn_fpn_computes_what_torchvision_v2_computes():
    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3, min_size=128,
                                           max_size=160).eval()
    ours = build_detector("faster_rcnn_fpn", 3, min_size=128, max_size=160).eval()
    ref_state = reference.state_dict()
    # torchvision's names -> ours: same tensors in the same order, module by module
    assert [tuple(v.shape) for v in ref_state.values()] == [tuple(v.shape) for v in ours.state_dict().values()]
    ours.load_state_dict(dict(zip(ours.state_dict().keys(), ref_state.values())))
    images = [torch.rand(3, 120, 150)]
    with torch.no_grad():
        a, b = reference(images)[0], ours(images)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


@pytest.mark.parametrize(("option", "value", "wanted"), [
    ("box_batch_size_per_image", "abc", "an integer"), ("box_batch_size_per_image", 1.5, "an integer"),
    ("box_batch_size_per_image", True, "an integer"), ("box_score_thresh", float("nan"), "a finite number"),
    ("box_score_thresh", "0.5", "a finite number"),
])
def test_option_values_of_the_wrong_type_are_refused_before_training(option, value, wanted):
    """What --detector-opt KEY=abc would otherwise send to torchvision, to fail at the first training step."""
    with pytest.raises(ConfigError, match=f"{option}=.*takes {wanted} there"):
        build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", **{option: value})
    build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", box_score_thresh=0, box_batch_size_per_image=64)


def test_unknown_or_misapplied_options_are_errors():
    with pytest.raises(ConfigError, match="'bogus_knob' is not an option of faster_rcnn_fpn"):
        build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", bogus_knob=1)
    with pytest.raises(ConfigError, match="did you mean score_thresh"):
        build_detector("retinanet_fpn", 3, preset="tiny-fpn", box_score_thresh=0.2)


def test_explicit_backbone_conflicting_with_pretrained_is_an_error():
    with pytest.raises(ConfigError, match="conflicts with the pretrained"):
        build_detector("faster_rcnn_fpn", 3, preset="r101-fpn", pretrained=InsLocBackbone("tiny-fpn"))


def test_c4_uses_aligned_roi_align_and_detectron2_rpn_budget():
    model = build_detector("faster_rcnn_c4", 3, preset="tiny-c4", box_head_extra_norm=True)
    assert model.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert model.roi_heads.box_head.extra_norm is not None
    feats = {"c4": torch.randn(1, 64, 8, 8)}
    box = [torch.tensor([[16.0, 16.0, 80.0, 96.0]])]
    pooled = model.roi_heads.box_roi_pool(feats, box, [(128, 128)])
    from torchvision.ops import roi_align

    torch.testing.assert_close(pooled, roi_align(feats["c4"], box, 14, 1 / 16, 0, aligned=True))


def test_norm_modes_and_nothing_frozen_by_default():
    model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn")
    assert all(p.requires_grad for p in model.parameters())
    frozen = build_detector("mask_rcnn_fpn", 3, preset="tiny-fpn", norm="frozen")
    assert isinstance(frozen.backbone.trunk.bn1, FrozenBatchNorm2d)
    for part in (frozen.backbone.trunk, frozen.backbone.fpn, frozen.roi_heads.box_head):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in part.modules())
    # the new mask head keeps trainable BN
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.roi_heads.mask_head.modules())
    sync = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", norm="sync")
    assert isinstance(sync.backbone.trunk.bn1, torch.nn.SyncBatchNorm)
    with pytest.raises(ConfigError, match="norm mode"):
        build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", norm="group")


def test_frozen_bn_keeps_pretrained_statistics():
    bundle = InsLocBackbone("tiny-fpn")
    bundle.trunk.bn1.running_mean.fill_(0.5)
    model = build_detector("faster_rcnn_fpn", 3, pretrained=bundle, norm="frozen")
    assert torch.allclose(model.backbone.trunk.bn1.running_mean, torch.full((16,), 0.5))


def test_torchvision_knobs_pass_through_and_config_round_trips():
    model = build_detector("faster_rcnn_fpn", class_names=["a", "b"], preset="tiny-fpn", min_size=200,
                           box_score_thresh=0.3, box_head_extra_norm=True)
    assert model.transform.min_size == (200,) and model.roi_heads.score_thresh == 0.3
    assert model.roi_heads.box_head.extra_norm is not None
    rebuilt = build_detector_from_config(model.insloc_config.to_dict())
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert rebuilt.insloc_config == model.insloc_config


@pytest.mark.parametrize("given, shown", [("exp1", "'exp1'"), (Path("runs/exp1/final"), "'runs/exp1/final'"),
                                          (42, "NAME")])
def test_a_name_as_pretrained_says_exactly_what_to_call(given, shown):
    with pytest.raises(ConfigError, match="not a (str|PosixPath|int)") as info:
        build_detector("faster_rcnn_fpn", class_names=["raccoon"], pretrained=given)
    assert f"build_detector(..., pretrained=from_pretrained({shown}))" in str(info.value)


def test_class_names_must_be_a_list_of_distinct_non_empty_names():
    with pytest.raises(ConfigError, match=r"bare string 'raccoon' .*for one class use \['raccoon'\]"):
        build_detector("faster_rcnn_fpn", class_names="raccoon", preset="tiny-fpn")
    with pytest.raises(ConfigError, match=r"class_names must be distinct names; \['a'\] appear more than once"):
        build_detector("faster_rcnn_fpn", class_names=["a", "b", "a"], preset="tiny-fpn")
    for bad in (["a", ""], ["a", " "], ["a", 3], [None], {"a": 1}):
        with pytest.raises(ConfigError, match="class_names must be a list of non-empty strings"):
            build_detector("faster_rcnn_fpn", class_names=bad, preset="tiny-fpn")
    model = build_detector("faster_rcnn_fpn", class_names=("cat", "dog"), preset="tiny-fpn")
    assert model.insloc_config.class_names == ["cat", "dog"] and model.insloc_config.num_classes == 3


@pytest.mark.parametrize("name, value", [("min_size", -5), ("min_size", 0), ("min_size", 2.5), ("min_size", True),
                                         ("min_size", "800"), ("min_size", 10_001), ("min_size", []),
                                         ("min_size", [800, -1]), ("max_size", -5), ("max_size", [1333]),
                                         ("max_size", 10**6)])
def test_size_options_are_refused_up_front(name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be an integer in \[1, 10000\].*got {re.escape(repr(value))}"):
        build_detector("faster_rcnn_fpn", class_names=["a"], preset="tiny-fpn", **{name: value})


def test_what_build_detector_accepts_from_pretrained_loads(tmp_path):
    from insloc_hub.detectors import MAX_IMAGE_SIDE
    from insloc_hub.pretrained import from_pretrained, save_pretrained

    model = build_detector("faster_rcnn_fpn", class_names=["a"], preset="tiny-fpn", min_size=(96, 128),
                           max_size=MAX_IMAGE_SIDE)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "d"))
    assert list(loaded.transform.min_size) == [96, 128] and loaded.transform.max_size == MAX_IMAGE_SIDE


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown detector architecture"):
        build_detector("yolo")
    with pytest.raises(ConfigError, match="len\\(class_names\\) \\+ 1"):
        build_detector("faster_rcnn_fpn", 2, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="at least 2"):
        build_detector("faster_rcnn_fpn", 1)
