"""Settings as users give them: flag values and INSLOC_SERVE_* variables, each bad one a one-line error."""

from __future__ import annotations

import math

import pytest

from insloc_hub.errors import ConfigError
from insloc_hub.serve.cli import build_parser, main
from insloc_hub.serve.settings import Settings, env_names


@pytest.mark.parametrize(("field", "value"), [
    ("port", 99999), ("port", -1), ("threads", -2), ("max_batch_size", 0), ("max_wait_ms", math.nan),
    ("request_timeout_s", math.inf), ("request_timeout_s", 0.0), ("precision", "int4"), ("log_level", "loud"),
])
def test_out_of_range_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "[_ ]") if field not in ("precision", "log_level")
                       else "unknown"):
        Settings(**{field: value})


def test_port_bounds_are_accepted():
    assert Settings(port=0).port == 0 and Settings(port=65535).port == 65535


def test_port_out_of_range_on_the_command_line_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("INSLOC_SERVE_MODELS", raising=False)
    assert main(["--model", "./x", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port must be an integer from 0 to 65,535, got 99999" in err
    assert "Traceback" not in err and "OverflowError" not in err


def test_flag_named_variables_and_documented_names_both_work():
    assert Settings.from_env({"INSLOC_SERVE_NO_WARMUP": "1"}).warmup is False
    assert Settings.from_env({"INSLOC_SERVE_NO_WARMUP": "0"}).warmup is True
    assert Settings.from_env({"INSLOC_SERVE_WARMUP": "0"}).warmup is False
    assert Settings.from_env({"INSLOC_SERVE_MODEL": "a=x.onnx"}).models == ["a=x.onnx"]
    assert Settings.from_env({"INSLOC_SERVE_MODELS": "a, b"}).models == ["a", "b"]
    with pytest.raises(ConfigError, match="disagree"):
        Settings.from_env({"INSLOC_SERVE_WARMUP": "1", "INSLOC_SERVE_NO_WARMUP": "1"})


def test_unknown_variable_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"INSLOC_SERVE_MAX_BATCH": "4"})
    message = str(caught.value)
    assert "INSLOC_SERVE_MAX_BATCH" in message and "did you mean INSLOC_SERVE_MAX_BATCH_SIZE?" in message
    assert "INSLOC_SERVE_PORT" in message and "\n" not in message  # the valid names, on one line
    with pytest.raises(ConfigError, match="unknown environment variable INSLOC_SERVE_COLOUR"):
        Settings.from_env({"INSLOC_SERVE_COLOUR": "blue"})
    assert Settings.from_env({"INSLOC_HUB_CACHE": "/tmp/x"}).port == 8000  # other prefixes are not ours


def test_unknown_variable_stops_the_cli(capsys, monkeypatch):
    monkeypatch.setenv("INSLOC_SERVE_MODLES", "x")
    assert main(["--model", "x"]) == 2
    assert "did you mean INSLOC_SERVE_MODELS?" in capsys.readouterr().err


def test_every_flag_names_its_exact_variable_in_help():
    accepted = env_names()
    for action in build_parser()._actions:
        if action.dest in ("help", "func"):
            continue
        named = [word.strip("[],;=01") for word in action.help.split() if word.strip("[").startswith("INSLOC_SERVE_")]
        assert named, action.option_strings
        for name in named:
            assert accepted[name][0] == action.dest, (action.option_strings, name)
        flag = next(s for s in action.option_strings if s.startswith("--"))
        # the rule the epilog states: INSLOC_SERVE_ + the flag's name in capitals
        assert "INSLOC_SERVE_" + flag[2:].upper().replace("-", "_") in named, (flag, named)
