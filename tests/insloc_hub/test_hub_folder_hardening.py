"""Hub folders under generated hostile inputs: the file names config.json lists, the weights file,
the verify cache (config.json values: test_config_hardening.py).

Each case asserts the specific error (ConfigError naming the field, IntegrityError,
WeightsMismatchError) raised before anything large is allocated or read; a per-case timeout turns a
hang (hashing /dev/zero, a 1e8-class predictor) into a failure.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from insloc_hub.errors import ConfigError, IntegrityError, ModelNotFoundError, WeightsMismatchError
from insloc_hub.models import InsLocBackbone
from insloc_hub.pretrained import from_pretrained, read_config, save_pretrained, verify_weights
from tests.insloc_hub.hub_folders import copy_folder, edit_config

pytestmark = pytest.mark.timeout(30)


# --- file names config.json lists: only inside the folder (40 cases) ---------------------------

UNSAFE_NAMES = ["/etc/passwd", "../model.safetensors", "../../x/model.safetensors", "/dev/zero",
                "sub/model.safetensors", "", ".", "..",
                "C:\\weights.safetensors", "..\\model.safetensors", "a\x00b", "~/.ssh/id_rsa"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_weights_file_must_be_a_plain_name(template, tmp_path, name):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["weights"].update(file=name))
    with pytest.raises((ConfigError, ModelNotFoundError), match="weights.file|plain file name|relative|missing"):
        from_pretrained(folder)


@pytest.mark.parametrize("name", [42, None, ["model.safetensors"], {"x": 1}])
def test_weights_file_of_the_wrong_type(template, tmp_path, name):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["weights"].update(file=name))
    with pytest.raises(ConfigError):
        from_pretrained(folder)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../b", "\\\\server\\share", "C:/x", "..", 7, ""])
def test_listed_files_must_stay_inside_the_folder(template, tmp_path, name):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["files"].append(name))
    with pytest.raises(ConfigError, match='"files"'):
        from_pretrained(folder)


@pytest.mark.parametrize("sha", ["", "abc", "Z" * 64, 12, ["x"]])
def test_malformed_sha256(template, tmp_path, sha):
    folder = copy_folder(template, tmp_path / "m")
    edit_config(folder, lambda c: c["weights"].update(sha256=sha))
    with pytest.raises((ConfigError, IntegrityError), match="sha256"):
        from_pretrained(folder)


def test_extra_file_names_are_plain_names(tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("x")
    for name in ("../escape.txt", "/tmp/abs.txt", "sub/dir.txt"):
        with pytest.raises(ConfigError, match="plain file name"):
            save_pretrained(InsLocBackbone("tiny-fpn"), tmp_path / "out", extra_files={name: source})
    assert not (tmp_path / "escape.txt").exists()


# --- the weights file itself (30 cases) -------------------------------------------------------


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "folder", "fifo"])
def test_weights_must_be_a_regular_file(template, tmp_path, target):
    folder = copy_folder(template, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.unlink()
    if target == "folder":
        weights.mkdir()
    elif target == "fifo":
        os.mkfifo(weights)
    else:
        weights.symlink_to(target)
    for verify in (True, False):
        with pytest.raises((IntegrityError, ModelNotFoundError), match="regular file|missing|incomplete"):
            from_pretrained(folder, verify=verify)


@pytest.mark.parametrize("change", [-1, -100, -4096, 1, 4096, 10**6])
def test_weights_size_must_match_the_header(template, tmp_path, change):
    folder = copy_folder(template, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    for verify in (True, False):
        with pytest.raises(IntegrityError, match="truncated or has extra bytes"):
            from_pretrained(folder, verify=verify)


@pytest.mark.parametrize(
    "header",
    [b"", b"\x01", struct.pack("<Q", 2**40), struct.pack("<Q", 5) + b"{bad}", struct.pack("<Q", 2) + b"[]",
     struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
     struct.pack("<Q", 40) + b'{"x": {"dtype": "F32", "shape": [1]}}   ',
     struct.pack("<Q", 60) + b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'[:60]],
)
def test_garbage_safetensors_headers(template, tmp_path, header):
    folder = copy_folder(template, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(header)
    with pytest.raises(IntegrityError):
        from_pretrained(folder, verify=False)


def _rewrite_weights(folder: Path, change) -> None:
    """Rewrite the weights with ``change(state)`` and record the new sha256 (a consistent folder)."""
    from insloc_hub.pretrained import sha256_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    edit_config(folder, lambda c: c["weights"].update(sha256=sha256_file(path)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8])
@pytest.mark.parametrize("key", ["trunk.conv1.weight", "trunk.bn1.running_var", "fpn.inner.0.weight"])
def test_weights_of_another_dtype_name_the_tensor(template, tmp_path, dtype, key):
    folder = copy_folder(template, tmp_path / "m")
    state_keys = load_file(str(folder / "model.safetensors")).keys()
    key = next(k for k in state_keys if k.startswith(key.split(".")[0]) and k.endswith(key.split(".")[-1]))
    _rewrite_weights(folder, lambda s: s.update({key: s[key].to(dtype)}))
    with pytest.raises(WeightsMismatchError, match=rf"tensor '{key}' is"):
        from_pretrained(folder)


def test_float_counter_is_refused(template, tmp_path):
    folder = copy_folder(template, tmp_path / "m")
    key = next(k for k in load_file(str(folder / "model.safetensors")) if k.endswith("num_batches_tracked"))
    _rewrite_weights(folder, lambda s: s.update({key: s[key].double()}))
    with pytest.raises(WeightsMismatchError, match="num_batches_tracked"):
        from_pretrained(folder)


def test_wrong_shape_is_found_from_the_header(template, tmp_path):
    folder = copy_folder(template, tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.update({"trunk.conv1.weight": torch.zeros(3, 3, 7, 7)}))
    with pytest.raises(WeightsMismatchError, match="wrong shape"):
        from_pretrained(folder)


# --- the verify cache ------------------------------------------------------------------------


def test_flipped_byte_with_restored_mtime_is_caught(template, tmp_path):
    folder = copy_folder(template, tmp_path / "m")
    config = read_config(folder)
    verify_weights(folder, config)  # recorded as verified
    weights = folder / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    time.sleep(0.01)  # ctime has at least this resolution everywhere we run
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before.st_mtime_ns and weights.stat().st_size == before.st_size
    with pytest.raises(IntegrityError, match="sha256"):
        verify_weights(folder, config)


def test_verified_file_is_not_hashed_twice(template, tmp_path, monkeypatch):
    from insloc_hub import pretrained

    folder = copy_folder(template, tmp_path / "m")
    config = read_config(folder)
    verify_weights(folder, config)
    calls = []
    monkeypatch.setattr(pretrained, "sha256_file", lambda p: calls.append(p) or "x")
    verify_weights(folder, config)
    assert calls == []


def test_the_verify_record_lives_in_the_test_cache_not_the_home(template, tmp_path, isolated_caches, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = copy_folder(template, tmp_path / "m")
    verify_weights(folder, read_config(folder), always=True)
    assert (Path(os.environ["INSLOC_HUB_CACHE"]) / "verified-weights.json").is_file()
    assert Path(os.environ["INSLOC_HUB_CACHE"]).is_relative_to(isolated_caches)
    assert not (tmp_path / "home").exists()

