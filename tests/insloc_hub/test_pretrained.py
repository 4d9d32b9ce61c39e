"""save_pretrained / from_pretrained / push_to_hub: round trips, integrity, Hub over real HTTP."""

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from insloc_hub import build_detector
from insloc_hub.detectors import ARCHITECTURES, set_inference_options
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


def test_old_backbone_keyword_and_config_field_still_work(tmp_path):
    """insloc-hub 0.1 said backbone= for the preset and "backbone" in config.json's detector section."""
    with pytest.warns(DeprecationWarning, match="use preset="):
        model = build_detector("faster_rcnn_c4", 3, backbone="tiny-c4")
    same = build_detector("faster_rcnn_c4", 3, preset="tiny-c4")
    assert model.insloc_config.architecture == same.insloc_config.architecture
    with pytest.raises(ConfigError, match="once"), pytest.warns(DeprecationWarning):
        build_detector("faster_rcnn_c4", 3, preset="tiny-c4", backbone="tiny-c4")
    folder = save_pretrained(model, tmp_path / "det")
    config = json.loads((folder / "config.json").read_text())
    config["detector"]["backbone"] = config["detector"].pop("architecture")  # as 0.1 wrote it
    (folder / "config.json").write_text(json.dumps(config))
    _assert_same_state(model, from_pretrained(folder))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_detector_round_trip_gives_same_detections(tmp_path, arch):
    torch.manual_seed(0)
    variant = "c4" if arch == "faster_rcnn_c4" else "fpn"
    threshold = {"score_thresh" if arch == "retinanet_fpn" else "box_score_thresh": 0.0}
    model = build_detector(arch, class_names=["person", "cup"], preset=f"tiny-{variant}", min_size=128,
                           max_size=160, **threshold).eval()
    folder = save_pretrained(model, tmp_path / "det", results=[{"dataset": "toy", "metrics": {"AP": 12.5}}])
    loaded = from_pretrained(folder)
    assert type(loaded) is type(model)
    assert loaded.insloc_config.class_names == ["person", "cup"]
    _assert_same_state(model, loaded)
    image = to_tensor(photo("chelsea"))
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    assert len(a["boxes"]) > 0
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
    assert card.startswith("---\n") and "library_name: insloc-hub" in card
    assert "pipeline_tag: image-feature-extraction" in card and "yang2021insloc" in card
    assert config["weights"]["sha256"] in card
    # the usage snippet names the folder as given, never only its base name
    assert f'from_pretrained("{tmp_path / "m"}")' in card


def test_detector_card_has_model_index(tmp_path):
    model = build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn")
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
    real = pretrained.sha256_file
    monkeypatch.setattr(pretrained, "sha256_file", lambda p: calls.append(p) or real(p))
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


def test_dtype_and_loaded_backbone_into_build_detector(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    assert from_pretrained(folder, dtype=torch.bfloat16).trunk.conv1.weight.dtype == torch.bfloat16
    detector = build_detector("faster_rcnn_fpn", class_names=["a"], pretrained=from_pretrained(folder))
    assert len(detector.load_report.loaded) == len(InsLocBackbone("tiny-fpn").state_dict())
    # names are resolved by the caller: a path gets an error that shows how
    with pytest.raises(ConfigError, match=r"build_detector\(\.\.\., pretrained=from_pretrained\("):
        build_detector("faster_rcnn_fpn", class_names=["a"], pretrained=str(folder))


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


def test_card_metadata_parses_as_a_hub_model_card(tmp_path):
    from huggingface_hub import ModelCard

    model = build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn")
    results = [{"dataset": "raccoon", "metrics": {"AP": 41.5, "AP50": 70.0, "AP_small": float("nan")}},
               {"dataset": "empty", "metrics": {}}]
    folder = save_pretrained(model, tmp_path / "d", results=results,
                             provenance={"base_model": "insloc-hub/insloc-r50-fpn-200ep", "note": "two\nlines"})
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "insloc-hub" and data["pipeline_tag"] == "object-detection"
    assert data["base_model"] == "insloc-hub/insloc-r50-fpn-200ep"
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == {"AP": 41.5, "AP50": 70.0}
    assert len(data["model-index"][0]["results"]) == 1
    assert "- note: two lines" in card.text


def test_card_shows_pretraining_diagnostics(tmp_path):
    diagnostics = {"final_loss": 6.123456, "alignment": 0.42, "embedding_std": 0.0881}
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m", provenance={"diagnostics": diagnostics})
    card = (folder / "README.md").read_text()
    assert "## Diagnostics" in card and "- final_loss: 6.123" in card and "- embedding_std: 0.0881" in card


def test_detector_folder_records_which_parts_were_pretrained(tmp_path):
    scratch = build_detector("faster_rcnn_fpn", class_names=["a"], preset="tiny-fpn")
    assert read_config(save_pretrained(scratch, tmp_path / "s"))["pretrained_parts"] == []
    retina = build_detector("retinanet_fpn", class_names=["a"], pretrained=InsLocBackbone("tiny-fpn"))
    config = read_config(save_pretrained(retina, tmp_path / "r"))
    assert config["pretrained_parts"] == ["trunk", "fpn"]
    assert [f["name"] for f in config["features"]][:4] == ["c2", "c3", "c4", "c5"]
    # a reloaded detector keeps its record when saved again
    again = read_config(save_pretrained(from_pretrained(tmp_path / "r"), tmp_path / "r2"))
    assert again["pretrained_parts"] == ["trunk", "fpn"] and again["name"] == "r"


def test_detector_strict_false_skips_what_does_not_fit(tmp_path):
    folder = save_pretrained(build_detector("faster_rcnn_fpn", class_names=["a"], preset="tiny-fpn"), tmp_path / "d")
    config = json.loads((folder / "config.json").read_text())
    config["detector"]["num_classes"], config["detector"]["class_names"] = 5, ["a", "b", "c", "d"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError, match="box_predictor"):
        from_pretrained(folder)
    model = from_pretrained(folder, strict=False)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(format_version="two"), "format_version must be an integer"),
    (lambda c: c.pop("weights"), "no 'weights' record"),
    (lambda c: c.update(task="segmentation"), "unknown task"),
    (lambda c: c.update(task="detection"), "without its 'detector' section"),
])
def test_malformed_configs_are_clear_errors(tmp_path, edit, message):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        from_pretrained(folder)


def test_corrupt_weights_without_verification_are_an_integrity_error(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(IntegrityError, match="not a safetensors file"):
        from_pretrained(folder, verify=False)


def test_device_and_dtype_strings(tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    assert from_pretrained(folder, dtype="bfloat16").trunk.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown device"):
        from_pretrained(folder, device="gpu")
    with pytest.raises(ConfigError, match="dtype"):
        from_pretrained(folder, dtype="int8")


def test_saving_a_detector_with_non_json_options_is_refused(tmp_path):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", rpn_anchor_generator=anchors)
    with pytest.raises(ConfigError, match="rpn_anchor_generator"):
        save_pretrained(model, tmp_path / "d")


def test_push_uploads_only_the_hub_files_and_names_the_repo_in_the_card(hub_env, tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    (folder / "checkpoint_0001.pth").write_bytes(b"not for the hub")
    (folder / ".saving-x").mkdir()
    (folder / ".saving-x" / "model.safetensors").write_bytes(b"half written")
    commit = push_to_hub(folder, "team/clean")
    pushed = set(hub_env.server.files_at("team/clean", commit)) - {".gitattributes"}  # made by repo creation
    assert pushed == {"README.md", "config.json", "model.safetensors"}
    loaded = from_pretrained("team/clean")
    assert loaded.hub_config["repo_id"] == "team/clean"
    assert 'from_pretrained("team/clean")' in (loaded.hub_folder / "README.md").read_text()
    assert "repo_id" not in read_config(folder)  # the user's folder is untouched


def _detector_folder(folder):
    report = folder.parent / "load_report.json"
    report.write_text("{}")
    detector = build_detector("faster_rcnn_fpn", class_names=["raccoon"], preset="tiny-fpn")
    return save_pretrained(detector, folder, extra_files={"load_report.json": report})


def test_saving_a_backbone_over_a_detector_is_refused_unless_overwrite(tmp_path):
    folder = _detector_folder(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ConfigError, match=r"holds a detection model .*saving a backbone model there would replace "
                                          r"it.*overwrite=True"):
        save_pretrained(InsLocBackbone("tiny-fpn"), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # untouched
    save_pretrained(InsLocBackbone("tiny-fpn"), folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert from_pretrained(folder).hub_config["task"] == "backbone"


def test_a_save_that_would_leave_a_listed_file_stale_is_refused_unless_overwrite(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("{}\n")
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m", extra_files={"metrics.jsonl": metrics})
    save_pretrained(InsLocBackbone("tiny-fpn"), folder, extra_files={"metrics.jsonl": metrics})  # same files: fine
    with pytest.raises(ConfigError, match="also lists metrics.jsonl, which this save does not write"):
        save_pretrained(InsLocBackbone("tiny-fpn"), folder)
    save_pretrained(InsLocBackbone("tiny-fpn"), folder, overwrite=True)
    assert not (folder / "metrics.jsonl").exists() and "metrics.jsonl" not in read_config(folder)["files"]


def test_saving_over_files_that_are_not_a_hub_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"lr": 0.03}))  # a training run's config
    with pytest.raises(ConfigError, match="is not a hub folder's config.json"):
        save_pretrained(InsLocBackbone("tiny-fpn"), run)
    assert json.loads((run / "config.json").read_text()) == {"lr": 0.03}
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    with pytest.raises(ConfigError, match=r"holds README.md but no config.json"):
        save_pretrained(InsLocBackbone("tiny-fpn"), notes)
    (notes / "README.md").unlink()
    (notes / "other.txt").write_text("kept")  # files a hub folder does not write are left alone
    save_pretrained(InsLocBackbone("tiny-fpn"), notes)
    assert (notes / "other.txt").read_text() == "kept"


def test_push_refuses_weights_changed_after_saving_before_any_request(hub_env, tmp_path):
    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped byte in the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    hub_env.server.requests.clear()
    with pytest.raises(IntegrityError, match="sha256") as info:
        push_to_hub(folder, "team/tampered")
    message = str(info.value)
    assert str(weights) in message and "re-save the model" in message and "insloc-push-" not in message
    assert hub_env.server.requests == []  # nothing was published


def test_push_errors_name_the_users_folder_not_the_staging_copy(hub_env, tmp_path):
    from insloc_hub.errors import HubAccessError

    folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    with pytest.raises(HubAccessError, match="403") as info:
        push_to_hub(folder, "team/read-only", token="read-token")
    assert f"Push of {folder} to 'team/read-only' failed" in str(info.value)
    assert "insloc-push-" not in str(info.value)
    with pytest.raises(HubAccessError, match="Push of the InsLocBackbone \\(saved for the push\\)"):
        push_to_hub(InsLocBackbone("tiny-fpn"), "team/read-only", token="read-token")


@pytest.mark.parametrize(("arch", "preset", "expected"), [
    ("faster_rcnn_fpn", "tiny-fpn", {"detections_per_img": 100, "rpn_post_nms_top_n_test": 1000}),
    ("mask_rcnn_fpn", "tiny-fpn", {"mask_thresh": 0.5, "nms_thresh": 0.5}),
    ("faster_rcnn_c4", "tiny-c4", {"rpn_pre_nms_top_n_test": 6000, "rpn_post_nms_top_n_test": 1000}),
    ("retinanet_fpn", "tiny-fpn", {"detections_per_img": 300, "topk_candidates": 1000}),
])
def test_detection_config_says_what_a_runtime_needs(tmp_path, arch, preset, expected):
    """config.json carries the effective (not only explicit) inference settings and who normalises."""
    threshold = {"score_thresh" if arch == "retinanet_fpn" else "box_score_thresh": 0.3}
    model = build_detector(arch, class_names=["a", "b"], preset=preset, min_size=320, **threshold)
    folder = save_pretrained(model, tmp_path / arch)
    config = json.loads((folder / "config.json").read_text())
    inference = config["detector"]["inference"]
    assert config["preprocessing"]["normalization"] == "model"
    assert config["preprocessing"]["resize"] == {"min_size": 320, "max_size": 1333}
    assert inference["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert inference["min_size"] == 320 and inference["max_size"] == 1333 and inference["size_divisible"] == 32
    assert inference["score_thresh"] == 0.3
    for key, value in expected.items():
        assert inference[key] == value, key
    loaded = from_pretrained(folder)
    assert loaded.insloc_config.inference == inference
    assert loaded.transform.min_size == (320,)


def test_backbone_config_says_the_caller_normalises(tmp_path):
    config = json.loads((save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "b") / "config.json").read_text())
    assert config["preprocessing"]["normalization"] == "caller"


def test_set_inference_options_changes_modules_and_saved_config(tmp_path):
    model = build_detector("faster_rcnn_fpn", class_names=["a"], preset="tiny-fpn", min_size=(480, 512))
    set_inference_options(model, min_size=256, max_size=400)
    config = json.loads((save_pretrained(model, tmp_path / "d") / "config.json").read_text())
    assert config["detector"]["inference"]["min_size"] == 256 and config["detector"]["options"]["max_size"] == 400
    assert from_pretrained(tmp_path / "d").transform.max_size == 400


def test_hub_folder_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name


def test_detector_with_unsaveable_options_is_refused(tmp_path):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    model = build_detector("faster_rcnn_fpn", 3, preset="tiny-fpn", rpn_anchor_generator=anchors)
    assert model.insloc_config.unsaved_options == ["rpn_anchor_generator"]
    assert "unsaved_options" not in model.insloc_config.to_dict()
    with pytest.raises(ConfigError, match="rpn_anchor_generator"):
        save_pretrained(model, tmp_path / "x")
