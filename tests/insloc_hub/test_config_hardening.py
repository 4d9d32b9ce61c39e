"""config.json values under generated hostile inputs: each gets a ConfigError naming the field,
raised before any model is built (a ``num_classes=1e8`` predictor is never allocated); a per-case
timeout turns a hang into a failure."""

from __future__ import annotations

import pytest

from insloc_hub.errors import ConfigError
from insloc_hub.pretrained import from_pretrained, read_config
from tests.insloc_hub.hub_folders import copy_folder, edit_config

pytestmark = pytest.mark.timeout(30)


# --- config.json values: ConfigError naming the field, before building (94 cases) -------------

BAD_INTS = [-1, 0.5, 10**9, "64", True, None, [64]]
ARCH_FIELDS = ["depth", "width", "fpn_channels", "head_channels", "head_fc", "roi_size"]


@pytest.mark.parametrize("value", BAD_INTS)
@pytest.mark.parametrize("name", ARCH_FIELDS)
def test_bad_architecture_values_name_the_field(template, tmp_path, name, value):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["architecture"].update({name: value}))
    with pytest.raises(ConfigError, match=rf"architecture\.{name} must be an integer in"):
        from_pretrained(folder)


def _detection(config: dict, **detector) -> None:
    config["task"] = "detection"
    config["detector"] = {"arch": "faster_rcnn_fpn", "num_classes": 3, "class_names": ["a", "b"],
                          "architecture": dict(config["architecture"]), "norm": "bn", "options": {}, **detector}


@pytest.mark.parametrize("value", [10**8, 0, -3, 2.5, "91", None, True, float("nan"), 10_001])
def test_bad_num_classes_is_refused_before_building(template, tmp_path, value):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: _detection(c, num_classes=value))
    with pytest.raises(ConfigError, match=r"detector\.num_classes must be an integer in \[1, 10000\]"):
        from_pretrained(folder)


@pytest.mark.parametrize("value", [-5, 0, 2.5, "800", [800, -1], [], [True], 10**6, None])
@pytest.mark.parametrize("name", ["min_size", "max_size"])
def test_bad_image_sizes_are_refused(template, tmp_path, name, value):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: _detection(c, options={name: value}))
    with pytest.raises(ConfigError, match=rf"detector\.options\.{name}"):
        from_pretrained(folder)


@pytest.mark.parametrize("value, message", [("ab", "bare string 'ab'"), (["a", "a"], "must be distinct"),
                                            (["a", ""], "non-empty strings"), (["a", 1], "non-empty strings")])
def test_bad_class_names_are_refused(template, tmp_path, value, message):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: _detection(c, class_names=value, num_classes=3))
    with pytest.raises(ConfigError, match=rf"detector\.class_names .*{message}"):
        read_config(folder)


@pytest.mark.parametrize("value", [-1, float("inf"), float("nan"), -0.5])
def test_negative_or_non_finite_detector_options_are_refused(template, tmp_path, value):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: _detection(c, options={"box_score_thresh": value}))
    with pytest.raises(ConfigError, match=r"detector\.options\.box_score_thresh"):
        from_pretrained(folder)


@pytest.mark.parametrize("field", ["architecture", "backbone"])  # "backbone": its name in insloc-hub 0.1
@pytest.mark.parametrize("value", [-1, 10**7, 3.5, "18"])
@pytest.mark.parametrize("name", ["width", "depth", "fpn_channels"])
def test_bad_detector_architecture_values(template, tmp_path, name, value, field):
    folder = copy_folder(template, tmp_path / "m")

    def edit(config: dict) -> None:
        _detection(config)
        config["detector"].pop("architecture")
        config["detector"][field] = {**config["architecture"], name: value}

    edit_config(folder, edit)
    with pytest.raises(ConfigError, match=rf"detector\.{field}\.{name}"):
        from_pretrained(folder)


BAD_STATS = [[0.5, 0.5], [0.2, float("nan"), 0.2], [0.2, float("inf"), 0.2], ["0.2", 0.2, 0.2], [True, 0.2, 0.2],
             0.2, None]
BAD_STATS_CASES = [("mean", v) for v in BAD_STATS] + [("std", v) for v in [*BAD_STATS, [0, 0, 0], [0.2, -0.1, 0.2]]]


@pytest.mark.parametrize("name, value", BAD_STATS_CASES)
def test_bad_preprocessing_statistics_name_the_field_and_value(template, tmp_path, name, value):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["preprocessing"].update({name: value}))
    with pytest.raises(ConfigError, match=rf"preprocessing\.{name} must be a list of 3 finite numbers") as info:
        from_pretrained(folder)
    assert repr(value) in str(info.value)


def test_zero_std_fails_the_onnx_export_in_one_line_before_exporting(template, tmp_path, capsys):
    from insloc_hub.export.cli import main

    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["preprocessing"].update(std=[0, 0, 0]))
    out = tmp_path / "x.onnx"
    assert main(["onnx", str(folder), "--output", str(out), "--height", "64", "--width", "64"]) == 2
    err = capsys.readouterr().err
    assert "preprocessing.std must be a list of 3 finite numbers > 0" in err and "[0, 0, 0]" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("value", [256, 0, "128", 128.0, None])
def test_embedding_dim_must_be_the_architectures(template, tmp_path, value):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c.update(embedding_dim=value))
    with pytest.raises(ConfigError, match=rf"embedding_dim must be 128 .*got {value!r}"):
        from_pretrained(folder)


@pytest.mark.parametrize("name", ["image_mean", "image_std"])
def test_bad_detector_normalisation_is_refused(template, tmp_path, name):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: _detection(c, options={name: [0.5, 0.5]}))
    with pytest.raises(ConfigError, match=rf"detector\.options\.{name} must be a list of 3"):
        from_pretrained(folder)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe{\x00}\x00", "is not UTF-8|not valid JSON"),
        (b'{"library": "insloc-hub", "name": "caf\xe9"}', "is not UTF-8|not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nest|not valid JSON"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nest|not valid JSON"),
        (b"", "not valid JSON|cannot read"),
        (b"null", "must hold a JSON object|not an insloc-hub config"),
        (b"[1, 2]", "must hold a JSON object|not an insloc-hub config"),
        (b'{"library": "other"}', "not an insloc-hub config"),
    ],
)
def test_unreadable_config_json(template, tmp_path, content, message):
    folder = copy_folder(template, tmp_path / "m")
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        from_pretrained(folder)


def test_oversized_config_json_is_refused_before_parsing(template, tmp_path):
    folder = copy_folder(template, tmp_path / "m")
    with (folder / "config.json").open("ab") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(ConfigError, match="over the limit"):
        read_config(folder)
