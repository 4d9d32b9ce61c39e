"""insloc_hub.hub against a real Hub server on 127.0.0.1 (tests/hub_server.py): push, resolve, cache, offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from insloc_hub import hub
from insloc_hub.errors import ConfigError, ModelNotFoundError

REPO = "tester/insloc-tiny"


def make_hub_folder(folder: Path, *, scale: float = 1.0, extra: dict[str, bytes] | None = None) -> Path:
    """A tiny hub folder: config.json naming its files, model.safetensors, README.md."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "backbone.conv1.weight": torch.linspace(-1, 1, 8 * 3 * 3 * 3).reshape(8, 3, 3, 3) * scale,
        "backbone.bn1.running_mean": torch.arange(8, dtype=torch.float32) * scale,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    files = ["model.safetensors", "config.json", *sorted(extra or {})]
    config = {"library_name": "insloc-hub", "task": "backbone", "scale": scale, "files": files}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text(f"---\nlibrary_name: insloc-hub\ntags: [insloc]\n---\n# tiny x{scale}\n")
    for name, content in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def same_bytes(a: Path, b: Path, names: tuple[str, ...] = ("model.safetensors", "config.json", "README.md")) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture
def pushed(hub_env, tmp_path):
    """REPO with one commit on main (scale 1); returns (source folder, commit sha)."""
    src = make_hub_folder(tmp_path / "v1")
    sha = hub.push_folder_to_hub(src, REPO, commit_message="v1")
    return src, sha


# ---------------------------------------------------------------------------------------- push + resolve


def test_push_returns_commit_sha_and_resolve_gives_identical_bytes(hub_env, pushed):
    src, sha = pushed
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert hub_env.server.branch_head(REPO) == sha

    folder = hub.resolve_model_dir(REPO)
    assert folder.name == sha and folder.is_relative_to(hub_env.cache_dir)
    assert same_bytes(folder, src)


def test_revisions_by_commit_sha_and_by_branch(hub_env, pushed, tmp_path):
    src_v1, sha_v1 = pushed
    src_v2 = make_hub_folder(tmp_path / "v2", scale=2.0)
    sha_v2 = hub.push_folder_to_hub(src_v2, REPO, revision="v2")  # the branch does not exist yet
    assert sha_v2 != sha_v1
    assert hub_env.server.branch_head(REPO, "v2") == sha_v2
    assert hub_env.server.branch_head(REPO, "main") == sha_v1

    by_sha = hub.resolve_model_dir(f"{REPO}@{sha_v1}")
    by_branch = hub.resolve_model_dir(REPO, revision="v2")
    assert same_bytes(by_sha, src_v1) and same_bytes(by_branch, src_v2)
    assert (by_sha / "model.safetensors").read_bytes() != (by_branch / "model.safetensors").read_bytes()
    assert hub.resolve_model_dir(f"{REPO}@v2", revision="v2") == by_branch
    assert hub.resolve_model_dir(REPO) == by_sha  # main did not move

    with pytest.raises(ConfigError, match="Conflicting revisions"):
        hub.resolve_model_dir(f"{REPO}@v2", revision="main")


def test_pull_request_and_unchanged_push(hub_env, pushed, tmp_path):
    """PR refs (refs/pr/N) resolve; pushing the same files again makes no commit."""
    src_v1, sha_v1 = pushed
    assert hub.push_folder_to_hub(src_v1, REPO) == sha_v1  # nothing changed: no new commit

    src_v3 = make_hub_folder(tmp_path / "v3", scale=3.0)
    sha_pr = hub.push_folder_to_hub(src_v3, REPO, create_pr=True)
    assert sha_pr != sha_v1 and hub_env.server.branch_head(REPO) == sha_v1
    assert same_bytes(hub.resolve_model_dir(REPO, revision="refs/pr/1"), src_v3)


# ---------------------------------------------------------------------------------------- offline


def test_pinned_commit_in_cache_needs_no_network(hub_env, pushed, monkeypatch):
    src, sha = pushed
    first = hub.resolve_model_dir(REPO, revision=sha)
    assert hub.resolve_model_dir(REPO) == first  # caches the ref main -> sha as well

    hub_env.server.requests.clear()
    assert hub.resolve_model_dir(REPO, revision=sha) == first
    assert hub_env.server.requests == []  # server up, yet not a single request

    hub_env.server.stop()
    assert hub.resolve_model_dir(f"{REPO}@{sha}") == first  # online mode, Hub gone: still no call needed
    assert hub.resolve_model_dir(REPO, revision=sha, local_files_only=True) == first
    assert hub.resolve_model_dir(REPO, local_files_only=True) == first  # "main" through the cached ref
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, as huggingface_hub read it
    assert hub.resolve_model_dir(REPO, revision=sha) == first
    assert same_bytes(first, src)


def test_offline_uncached_revision_names_repo_revision_and_download_command(hub_env, pushed, monkeypatch):
    _, sha = pushed
    hub.resolve_model_dir(REPO)  # main is cached, branch "v9" is not
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve_model_dir(REPO, revision="v9", local_files_only=True)
    message = str(info.value)
    assert REPO in message and "'v9'" in message
    assert f"insloc-hub download {REPO} --revision v9" in message
    assert info.value.__cause__ is not None

    missing_sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=f"insloc-hub download {REPO} --revision {missing_sha}"):
        hub.resolve_model_dir(f"{REPO}@{missing_sha}")
    with pytest.raises(ModelNotFoundError, match="offline"):
        hub.download(REPO, revision=sha)

    # The command the message gives, once online, makes the offline resolution work.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.push_folder_to_hub(hub.resolve_model_dir(REPO), REPO, revision="v9")
    downloaded = hub.download(REPO, revision="v9")
    hub_env.server.stop()
    assert hub.resolve_model_dir(REPO, revision="v9", local_files_only=True) == downloaded


def test_partial_snapshot_is_an_error_offline_and_healed_online(hub_env, pushed, tmp_path):
    src, sha = pushed
    folder = hub.resolve_model_dir(REPO)
    (folder / "model.safetensors").unlink()

    for kwargs in ({"local_files_only": True}, {"revision": sha, "local_files_only": True}):
        with pytest.raises(ModelNotFoundError, match=r"cache \(model.safetensors missing\)") as info:
            hub.resolve_model_dir(REPO, **kwargs)
        assert f"insloc-hub download {REPO} --revision {kwargs.get('revision', 'main')}" in str(info.value)

    assert hub.resolve_model_dir(REPO) == folder  # online: the missing file is fetched again
    assert same_bytes(folder, src)

    # A cache filled by hand has no tree listing, so snapshot_download returns the partial folder as is:
    # insloc's own check against config.json's "files" catches it.
    by_hand = tmp_path / "by-hand"
    snapshot = by_hand / folder.parent.parent.name / "snapshots" / sha
    snapshot.mkdir(parents=True)
    shutil.copy(folder / "config.json", snapshot / "config.json")
    with pytest.raises(ModelNotFoundError, match="incomplete: model.safetensors listed in config.json") as info:
        hub.resolve_model_dir(REPO, revision=sha, local_files_only=True, cache_dir=by_hand)
    assert f"insloc-hub download {REPO} --revision {sha}" in str(info.value)


# ---------------------------------------------------------------------------------------- names


def test_unknown_alias_lists_aliases_and_suggests(monkeypatch):
    with pytest.raises(ModelNotFoundError) as info:
        hub.parse_model_name("insloc-r5O")
    message = str(info.value)
    assert all(alias in message for alias in hub.ALIASES)
    assert "Did you mean 'insloc-r50'" in message
    with pytest.raises(ModelNotFoundError, match="Known aliases"):
        hub.resolve_model_dir("not a model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        hub.resolve_model_dir("./no/such/folder")


def test_aliases_and_namespace_override(hub_env, tmp_path, monkeypatch):
    assert set(hub.CANONICAL_MODELS) <= set(hub.ALIASES.values())
    assert hub.parse_model_name("insloc-r50").repo_id == "insloc-hub/insloc-r50-fpn-200ep"
    assert hub.parse_model_name("insloc-r50-c4@v1") == hub.ModelRef(
        kind="hub", repo_id="insloc-hub/insloc-r50-c4-200ep", revision="v1", alias="insloc-r50-c4"
    )
    monkeypatch.setenv("INSLOC_HUB_NAMESPACE", "mirror")
    assert hub.parse_model_name("insloc-r50-fpn").repo_id == "mirror/insloc-r50-fpn-200ep"
    assert hub.parse_model_name("insloc-r50-fpn", namespace="other").repo_id == "other/insloc-r50-fpn-200ep"

    src = make_hub_folder(tmp_path / "c4")
    hub.push_folder_to_hub(src, "insloc-r50-c4")  # alias -> mirror/insloc-r50-c4-200ep
    assert hub_env.server.branch_head("mirror/insloc-r50-c4-200ep")
    assert same_bytes(hub.resolve_model_dir("insloc-r50-c4"), src)
    monkeypatch.delenv("INSLOC_HUB_NAMESPACE")
    assert same_bytes(hub.resolve_model_dir("insloc-r50-c4-200ep", namespace="mirror"), src)
    with pytest.raises(ModelNotFoundError, match="insloc-hub/insloc-r50-c4-200ep' .*was not found"):
        hub.resolve_model_dir("insloc-r50-c4")  # default namespace: not on this Hub


def test_local_folder_gets_the_same_completeness_check(tmp_path):
    folder = make_hub_folder(tmp_path / "local", extra={"labels/coco.txt": b"person\n"})
    assert hub.resolve_model_dir(folder) == folder.resolve()
    assert hub.resolve_model_dir(str(folder)) == folder.resolve()
    with pytest.raises(ConfigError, match="revision"):
        hub.resolve_model_dir(folder, revision="main")
    (folder / "labels/coco.txt").unlink()
    with pytest.raises(ModelNotFoundError, match="incomplete: labels/coco.txt"):
        hub.resolve_model_dir(folder)


# ---------------------------------------------------------------------------------------- errors, endpoint, cache


def test_hub_errors_become_actionable_model_not_found_errors(hub_env, pushed, tmp_path, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(ModelNotFoundError, match="'tester/nope' was not found") as info:
        hub.resolve_model_dir("tester/nope")
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)
    with pytest.raises(ModelNotFoundError, match="Revision 'no-such-branch' does not exist"):
        hub.resolve_model_dir(REPO, revision="no-such-branch")

    monkeypatch.setenv("HF_TOKEN", "wrong-token")
    with pytest.raises(hub.HubAccessError, match="401") as info:
        hub.resolve_model_dir(REPO)
    assert isinstance(info.value, ModelNotFoundError) and isinstance(info.value.__cause__, HfHubHTTPError)
    with pytest.raises(hub.HubAccessError, match="403"):
        hub.push_folder_to_hub(make_hub_folder(tmp_path / "ro"), REPO, token="read-token")
    monkeypatch.setenv("HF_TOKEN", hub_env.token)

    # A repo that is not a hub folder, and one whose config.json names a file it lacks.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "notes.txt").write_text("no config here")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_env.endpoint)
    api.create_repo("tester/bare")
    api.upload_folder(repo_id="tester/bare", folder_path=bare)
    with pytest.raises(ModelNotFoundError, match="has no config.json: it is not a complete insloc hub folder"):
        hub.resolve_model_dir("tester/bare")
    api.upload_file(
        repo_id="tester/bare",
        path_in_repo="config.json",
        path_or_fileobj=json.dumps({"files": ["config.json", "model.safetensors"]}).encode(),
    )
    with pytest.raises(ModelNotFoundError, match="(?s)incomplete: model.safetensors .*push the missing file"):
        hub.resolve_model_dir("tester/bare")


def test_push_checks_the_folder_before_any_request(hub_env, tmp_path):
    folder = make_hub_folder(tmp_path / "broken")
    (folder / "model.safetensors").unlink()
    hub_env.server.requests.clear()
    with pytest.raises(ModelNotFoundError, match="model.safetensors listed in config.json is missing"):
        hub.push_folder_to_hub(folder, REPO)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        hub.push_folder_to_hub(tmp_path / "missing", REPO)
    with pytest.raises(ConfigError, match="commit"):
        hub.push_folder_to_hub(make_hub_folder(tmp_path / "ok"), REPO, revision="a" * 40)
    assert hub_env.server.requests == []


def test_endpoint_argument_wins_and_an_unreachable_hub_says_so(hub_env, pushed, monkeypatch):
    src, _ = pushed
    dead = "http://127.0.0.1:9"  # nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    assert same_bytes(hub.download(REPO, endpoint=hub_env.endpoint), src)  # explicit argument wins
    with pytest.raises(ModelNotFoundError, match="Could not reach the Hub at http://127.0.0.1:9 to write"):
        hub.push_folder_to_hub(src, REPO)
    # an official alias that cannot be fetched names the offline route: converting the released checkpoint
    with pytest.raises(ModelNotFoundError, match="insloc-hub convert official <checkpoint.pth>"):
        hub.resolve_model_dir("insloc-r50", local_files_only=True)


def test_list_cached(hub_env, pushed, tmp_path):
    assert hub.list_cached() == []
    assert hub.list_cached(tmp_path / "no-cache-here") == []
    _, sha = pushed
    folder = hub.resolve_model_dir(REPO)
    (cached,) = hub.list_cached()
    assert cached["repo_id"] == REPO and cached["size_on_disk"] > 0
    (revision,) = cached["revisions"]
    assert revision["commit"] == sha and revision["refs"] == ["main"] and revision["path"] == str(folder)
    assert {"config.json", "model.safetensors"} <= set(revision["files"])
    assert hub.list_cached(hub_env.cache_dir) == [cached]
    with pytest.raises(ConfigError, match="is a file"):
        hub.list_cached(folder / "config.json")
