"""Every command-line tool refuses bad values in its parser: exit code 2, one line, no traceback, nothing run.

The cases are generated from the config dataclasses (each field's limits) plus the paths and
devices users get wrong; each one runs the real parser in this process (no subprocess, no data).
"""

from __future__ import annotations

import dataclasses
import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from insloc_hub import cli as hub_cli
from insloc_hub.training import cli as train_cli
from insloc_hub.training.pretraining.engine import PretrainConfig
from insloc_hub.training.transfer.finetune import FinetuneConfig

NOT_WRITABLE = "/proc/insloc-test/run"  # even root cannot create a folder under /proc


def _bad_values(cls: type) -> list[tuple[str, str]]:
    """(flag, value) pairs that break each field's type or limits."""
    cases = []
    for f in dataclasses.fields(cls):
        spec, name = f.metadata, "--" + f.name.replace("_", "-")
        if "choices" in spec:
            cases += [(name, "no-such-choice"), (name, "")]
        if "min" in spec or "above" in spec:
            low = spec.get("min", spec.get("above"))
            cases += [(name, str(low - 1)), (name, "nan" if "above" in spec else "-100"), (name, "abc")]
        if "max" in spec:
            cases += [(name, str(spec["max"] + 1)), (name, "inf")]
    return cases


def _run(main, argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, err.getvalue()


def _assert_one_line_error(main, argv: list[str]) -> None:
    code, err = _run(main, argv)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (argv, err)


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    return {"file": str(a_file), "under_file": str(a_file / "run"), "foreign": str(foreign),
            "not_writable": NOT_WRITABLE, "new": str(tmp_path / "new-run"), "data": str(tmp_path)}


PRETRAIN_CASES = _bad_values(PretrainConfig) + [("--device", "tpu"), ("--device", "cuda:x"), ("--epochs", "1.5")]
FINETUNE_CASES = _bad_values(FinetuneConfig) + [
    ("--steps", "a,b"), ("--min-size", "0"), ("--min-size", "800-480"), ("--device", "tpu"), ("--iterations", "1e3"),
]


def test_the_generated_cases_cover_every_limited_field():
    for cls, cases in ((PretrainConfig, PRETRAIN_CASES), (FinetuneConfig, FINETUNE_CASES)):
        limited = {f.name for f in dataclasses.fields(cls) if {"min", "max", "above", "choices"} & set(f.metadata)}
        assert {flag[2:].replace("-", "_") for flag, _ in cases} >= limited
    assert len(PRETRAIN_CASES) + len(FINETUNE_CASES) > 100


@pytest.mark.parametrize(("flag", "value"), PRETRAIN_CASES)
def test_pretrain_rejects(flag, value, places):
    _assert_one_line_error(train_cli.main, ["pretrain", "--data", places["data"], "--output", places["new"],
                                            f"{flag}={value}"])
    assert not Path(places["new"]).exists()


@pytest.mark.parametrize(("flag", "value"), FINETUNE_CASES)
def test_finetune_rejects(flag, value, places):
    _assert_one_line_error(train_cli.main, ["finetune", "--data", places["data"], "--output", places["new"],
                                            f"{flag}={value}"])
    assert not Path(places["new"]).exists()


@pytest.mark.parametrize("where", ["file", "under_file", "foreign", "not_writable"])
def test_every_output_is_checked_before_work_starts(where, places):
    out = places[where]
    for argv in (
        ["pretrain", "--data", places["data"], "--output", out],
        ["finetune", "--data", places["data"], "--output", out],
        ["eval", "some/model", "--data", places["data"], "--output", out],
        ["export-weights", "run/checkpoint_000000001.pt", out],
    ):
        _assert_one_line_error(train_cli.main, argv)
    _assert_one_line_error(hub_cli.main, ["convert", "official", "x.pth", out])
    if where != "foreign":  # export-d2 writes one file: an existing folder of other things is no problem
        _assert_one_line_error(hub_cli.main, ["export-d2", "insloc-r50", out + "/weights.pkl"])


@pytest.mark.parametrize("argv", [
    ["eval", "m", "--data", "d", "--batch-size", "0"],
    ["eval", "m", "--data", "d", "--score-threshold", "2"],
    ["eval", "m", "--data", "d", "--score-threshold", "-0.1"],
    ["eval", "m", "--data", "d", "--num-visualize", "-1"],
    ["eval", "m", "--data", "d", "--device", "tpu"],
    ["demo", "--image-size", "0"],
    ["demo", "--image-size", "abc"],
])
def test_eval_and_demo_values(argv):
    _assert_one_line_error(train_cli.main, argv)


@pytest.mark.parametrize("argv", [["demo", "--size", "0"], ["demo", "--size", "127"], ["demo", "--arch", "yolo"]])
def test_insloc_hub_values(argv):
    _assert_one_line_error(hub_cli.main, argv)


def test_runtime_errors_are_one_line_too(places, capsys):
    """Errors found after parsing (a cache path that is a file, a text file named .pth) exit 2 with one line."""
    assert hub_cli.main(["list", "--cache-dir", places["file"]]) == 2
    fake = Path(places["data"]) / "text.pth"
    fake.write_text("this is not a checkpoint\n")
    for source_format in ("official", "torchvision", "moco"):
        assert hub_cli.main(["convert", source_format, str(fake), places["new"]]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and err.count("not a PyTorch checkpoint") == 3 and "Traceback" not in err
    assert not os.path.exists(places["new"])


@pytest.mark.parametrize("config", [
    {"architecture": {}, "weights": {}},
    {"architecture": {"depth": 50}, "weights": {"sha256": 3}, "provenance": [1], "results": [3, {"metrics": 2}]},
    {"architecture": {}, "weights": {}, "task": "detection", "detector": {}, "files": ["config.json", 7]},
    {"architecture": {}, "weights": {}, "task": "detection", "detector": {"class_names": [1, None]}},
])
def test_info_on_incomplete_configs_never_tracebacks(config, tmp_path, capsys):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"library": "insloc-hub", **config}))
    for extra in ([], ["--verify"], ["--json"]):
        code = hub_cli.main(["info", str(tmp_path), *extra])
        out, err = capsys.readouterr()
        assert code in (0, 2) and "Traceback" not in err, (config, extra, err)
        assert (code == 0 and out) or len(err.strip().splitlines()) == 1
