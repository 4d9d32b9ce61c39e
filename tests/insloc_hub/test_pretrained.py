"""save_pretrained / from_pretrained / push_to_hub: round trips, integrity, Hub over real HTTP."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from insloc_hub import build_detector
from insloc_hub.detectors import ARCHITECTURES
from insloc_hub.errors import ConfigError, IntegrityError, ModelNotFoundError, WeightsMismatchError
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained, push_to_hub, read_config, save_pretrained
from insloc_hub.transforms import to_tensor
from tests.photos import photo


@pytest.fixture(autouse=True)
def _private_verification_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSLOC_HUB_CACHE", str(tmp_path / "insloc-cache"))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ["tiny-fpn", "tiny-c4"])
def test_backbone_round_trip_is_bit_identical(tmp_path, arch):
    torch.manual_seed(0)
    model = InsLocBackbone(arch).eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.trunk.bn1.running_mean.uniform_(-1, 1)
    folder = save_pretrained(model, tmp_path / "m", provenance={"epochs": 3})
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    loaded = from_pretrained(folder)
    assert isinstance(loaded, InsLocBackbone) and not loaded.training
    _assert_same_state(model, loaded)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for key, value in model.forward_features(x).items():
            assert torch.equal(value, loaded.forward_features(x)[key])
        assert torch.equal(model.forward_embedding(x), loaded.forward_embedding(x))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_detector_round_trip_gives_same_detections(tmp_path, arch):
    torch.manual_seed(0)
    variant = "c4" if arch == "faster_rcnn_c4" else "fpn"
    model = build_detector(arch, class_names=["person", "cup"], backbone=f"tiny-{variant}", min_size=128,
                           max_size=160, box_score_thresh=0.0).eval()
    folder = save_pretrained(model, tmp_path / "det", results=[{"dataset": "toy", "metrics": {"AP": 12.5}}])
    loaded = from_pretrained(folder)
    assert type(loaded) is type(model)
    assert loaded.insloc_config.class_names == ["person", "cup"]
    _assert_same_state(model, loaded)
    image = to_tensor(photo("chelsea"))
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key])


def test_config_records_the_contract(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m", name="tiny", provenance={"data": "toy"})
    config = read_config(folder)
    assert config["task"] == "backbone"
    assert config["architecture"]["depth"] == 18 and config["architecture"]["variant"] == "fpn"
    assert config["pretrained_parts"] == ["trunk", "fpn", "box_head"]
    assert [f["name"] for f in config["features"]] == ["c2", "c3", "c4", "c5", "p2", "p3", "p4", "p5"]
    assert config["preprocessing"]["color_space"] == "RGB"
    assert len(config["weights"]["sha256"]) == 64
    assert config["provenance"]["data"] == "toy"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: \"insloc-hub\"")
    assert "pipeline_tag: \"image-feature-extraction\"" in card and "yang2021insloc" in card
    assert config["weights"]["sha256"] in card


def test_detector_card_has_model_index(tmp_path):
    model = build_detector("faster_rcnn_fpn", class_names=["raccoon"], backbone="tiny-fpn")
    folder = save_pretrained(model, tmp_path / "d", results=[{"dataset": "raccoon", "metrics": {"AP50": 61.0}}])
    card = (folder / "README.md").read_text()
    assert "model-index:" in card and "value: 61.0" in card and "object-detection" in card
    assert read_config(folder)["class_names"] == ["raccoon"]


def test_tampered_weights_fail_the_checksum(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["trunk.conv1.weight"] = state["trunk.conv1.weight"] + 1e-3
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(IntegrityError, match="sha256"):
        from_pretrained(folder)


def test_checksum_is_not_recomputed_for_an_unchanged_file(tmp_path, monkeypatch):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    from insloc_hub import pretrained

    calls = []
    real = pretrained._sha256
    monkeypatch.setattr(pretrained, "_sha256", lambda p: calls.append(p) or real(p))
    from_pretrained(folder)
    from_pretrained(folder)
    assert len(calls) == 1
    from_pretrained(folder, verify=True)
    assert len(calls) == 2


def test_wrong_architecture_lists_keys(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"]["fpn_channels"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError, match=r"wrong shape: fpn\.lateral\.p2\.conv\.weight"):
        from_pretrained(folder)


def test_missing_keys_are_named_and_strict_false_loads_the_rest(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["box_head.fc1.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises((WeightsMismatchError, IntegrityError)):
        from_pretrained(folder)
    with pytest.raises(WeightsMismatchError, match=r"missing: box_head\.fc1\.bias"):
        from_pretrained(folder, verify=False)
    model = from_pretrained(folder, verify=False, strict=False)
    assert torch.equal(model.box_head.fc1.weight, state["box_head.fc1.weight"])
    assert model.box_head.fc1.bias.shape == (64,) and torch.isfinite(model.box_head.fc1.bias).all()


def test_not_an_insloc_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not an insloc-hub config"):
        from_pretrained(tmp_path)


def test_unknown_alias_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="insloc-r50"):
        from_pretrained("insloc-r51")


def test_dtype_and_pretrained_name_into_build_detector(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    assert from_pretrained(folder, dtype=torch.bfloat16).trunk.conv1.weight.dtype == torch.bfloat16
    detector = build_detector("faster_rcnn_fpn", class_names=["a"], pretrained=str(folder))
    assert len(detector.load_report.loaded) == len(InsLocBackbone("tiny-fpn").state_dict())


def test_push_then_load_by_repo_revision_and_offline(hub_env, tmp_path, monkeypatch):
    torch.manual_seed(1)
    v1 = InsLocBackbone("tiny-fpn")
    sha1 = push_to_hub(v1, "team/tiny-insloc", provenance={"epochs": 1})
    assert len(sha1) == 40
    torch.manual_seed(2)
    v2 = InsLocBackbone("tiny-fpn")
    folder = save_pretrained(v2, tmp_path / "v2")
    sha2 = push_to_hub(folder, "team/tiny-insloc", commit_message="epoch 2")
    assert sha2 != sha1

    _assert_same_state(from_pretrained("team/tiny-insloc"), v2)
    _assert_same_state(from_pretrained(f"team/tiny-insloc@{sha1}"), v1)
    _assert_same_state(from_pretrained("team/tiny-insloc", revision=sha1), v1)

    hub_env.server.stop()  # no network from here on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_same_state(from_pretrained(f"team/tiny-insloc@{sha1}"), v1)
    _assert_same_state(from_pretrained("team/tiny-insloc", local_files_only=True), v2)
    with pytest.raises(ModelNotFoundError, match="insloc-hub download"):
        from_pretrained("team/never-pushed")


def test_alias_resolves_through_namespace_override(hub_env, monkeypatch):
    push_to_hub(InsLocBackbone("tiny-c4"), "mirror/insloc-r50-c4-200ep")
    monkeypatch.setenv("INSLOC_HUB_NAMESPACE", "mirror")
    model = from_pretrained("insloc-r50-c4")
    assert model.config.variant == "c4"
    assert isinstance(from_pretrained("insloc-r50-c4", namespace="mirror"), InsLocBackbone)


def test_partial_snapshot_is_detected(hub_env, monkeypatch):
    push_to_hub(InsLocBackbone("tiny-fpn"), "team/partial")
    folder = from_pretrained("team/partial").hub_folder
    weights = folder / "model.safetensors"
    weights.unlink() if weights.is_symlink() else shutil.os.remove(weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        from_pretrained("team/partial")
