"""Hub transport: turn a model name into a local hub folder, and push hub folders to the Hub.

This module is model-agnostic. It knows the *hub folder* contract (``config.json`` naming the
files of the folder under ``"files"``, default ``["model.safetensors", "config.json"]``) and the
Hugging Face Hub, nothing about architectures. ``from_pretrained`` builds on :func:`resolve_model_dir`.

Accepted names (see :func:`parse_model_name`)::

    resolve_model_dir("insloc-r50")                        # alias -> insloc-hub/insloc-r50-fpn-200ep
    resolve_model_dir("insloc-r50", namespace="my-org")    # alias in another namespace
    resolve_model_dir("my-org/my-detector")                # repo id, branch "main"
    resolve_model_dir("my-org/my-detector@v1.0")           # branch, tag or commit sha
    resolve_model_dir("./runs/pretrain/hub")               # local hub folder

Environment variables, read at call time (not only when huggingface_hub is imported):

- ``INSLOC_HUB_NAMESPACE``: namespace of the aliases (default ``insloc-hub``).
- ``HF_ENDPOINT``: Hub endpoint (a mirror, a private Hub, a test server).
- ``HF_HUB_OFFLINE=1``: never touch the network; everything must already be in the cache.
- ``HF_HUB_CACHE`` / ``HF_HOME``: where the cache lives; ``HF_TOKEN``: the token.

Every failure a user can meet while resolving a model is a :class:`~insloc_hub.errors.ModelNotFoundError`
whose message says what to do next; the huggingface_hub exception is kept as ``__cause__``.
"""

from __future__ import annotations

import difflib
import glob
import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import huggingface_hub
from huggingface_hub import HfApi, constants, hf_hub_download, scan_cache_dir, snapshot_download

from insloc_hub.errors import ConfigError, HubAccessError, InsLocError, ModelNotFoundError

try:  # huggingface_hub >= 0.24 keeps its errors here; older versions only in ``utils``
    from huggingface_hub import errors as _hf_errors
except ImportError:  # pragma: no cover - old huggingface_hub
    from huggingface_hub import utils as _hf_errors  # type: ignore[no-redef]

__all__ = [
    "ALIASES",
    "CANONICAL_MODELS",
    "DEFAULT_FILES",
    "DEFAULT_NAMESPACE",
    "HubAccessError",
    "ModelRef",
    "alias_repo_id",
    "download",
    "list_cached",
    "parse_model_name",
    "push_folder_to_hub",
    "required_files",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "insloc-hub"
"""Namespace (user or organisation) of the official release on the Hub."""

NAMESPACE_ENV = "INSLOC_HUB_NAMESPACE"

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_FILES: tuple[str, ...] = (WEIGHTS_NAME, CONFIG_NAME)
"""Files a hub folder holds when its config.json has no ``"files"`` key."""

# Fetched along with the files config.json names, when the repo has them (small, and useful offline).
_OPTIONAL_FILES: tuple[str, ...] = ("README.md",)

CANONICAL_MODELS: tuple[str, ...] = (
    "insloc-r50-fpn-200ep",
    "insloc-r50-fpn-400ep",
    "insloc-r50-c4-200ep",
    "insloc-r50-c4-400ep",
)
"""The official release: ResNet-50 with FPN or C4 heads, pretrained 200 or 400 epochs."""

ALIASES: dict[str, str] = {
    "insloc-r50": "insloc-r50-fpn-200ep",
    "insloc-r50-fpn": "insloc-r50-fpn-200ep",
    "insloc-r50-c4": "insloc-r50-c4-200ep",
    **{name: name for name in CANONICAL_MODELS},
}
"""Short names -> canonical repo names; each resolves to ``f"{namespace}/{canonical}"``."""

_COMMIT_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_NAMESPACE_RE = _REPO_PART_RE


@dataclass(frozen=True)
class ModelRef:
    """What a model name points to: a local hub folder or a Hub repo at a revision.

    Example:
        >>> parse_model_name("insloc-r50@v1")
        ModelRef(kind='hub', path=None, repo_id='insloc-hub/insloc-r50-fpn-200ep', revision='v1', alias='insloc-r50')
    """

    kind: Literal["local", "hub"]
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    alias: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def __str__(self) -> str:
        if self.kind == "local":
            return str(self.path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)


# ----------------------------------------------------------------------------------------------
# Environment, read at call time
# ----------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_namespace(namespace: str | None) -> str:
    ns = namespace if namespace is not None else (os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE)
    ns = ns.strip().strip("/")
    if not _NAMESPACE_RE.fullmatch(ns) or "--" in ns or ".." in ns:
        raise ConfigError(
            f"Invalid Hub namespace {ns!r} (from {'namespace=' if namespace is not None else NAMESPACE_ENV}): "
            "expected a user or organisation name such as 'insloc-hub'."
        )
    return ns


def _is_offline(local_files_only: bool | None = None) -> bool:
    """True if no network call may be made.

    ``local_files_only=True`` or ``HF_HUB_OFFLINE`` (read from the environment now, and as
    huggingface_hub read it at import time). ``local_files_only=False`` cannot override an
    offline environment.
    """
    if local_files_only:
        return True
    is_offline_mode = getattr(constants, "is_offline_mode", None)
    hf_offline = is_offline_mode() if callable(is_offline_mode) else getattr(constants, "HF_HUB_OFFLINE", False)
    return bool(hf_offline) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _resolve_endpoint(endpoint: str | None) -> str:
    """``endpoint=`` argument, else ``HF_ENDPOINT`` now, else what huggingface_hub read at import."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return value.rstrip("/")


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` argument, else ``HF_HUB_CACHE`` / ``HF_HOME`` now, else huggingface_hub's default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env_cache:
        return Path(os.path.expandvars(env_cache)).expanduser()
    env_home = os.environ.get("HF_HOME")
    if env_home:
        return Path(os.path.expandvars(env_home)).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _download_command(repo_id: str, revision: str | None) -> str:
    cmd = f"insloc-hub download {shlex.quote(repo_id)}"
    return f"{cmd} --revision {shlex.quote(revision or constants.DEFAULT_REVISION)}"


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def alias_repo_id(alias: str, namespace: str | None = None) -> str:
    """Repo id an alias resolves to.

    Example:
        >>> alias_repo_id("insloc-r50-c4")
        'insloc-hub/insloc-r50-c4-200ep'
        >>> alias_repo_id("insloc-r50", namespace="my-mirror")
        'my-mirror/insloc-r50-fpn-200ep'
    """
    key = alias.strip().lower()
    if key not in ALIASES:
        raise _unknown_name_error(alias)
    return f"{_resolve_namespace(namespace)}/{ALIASES[key]}"


def _known_aliases_text() -> str:
    return ", ".join(ALIASES)


def _unknown_name_error(name: str, reason: str | None = None) -> ModelNotFoundError:
    base = name.split("@", 1)[0]
    close = difflib.get_close_matches(base.lower(), list(ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    why = reason or "it is not a known alias, an existing local folder, or a Hub repo id ('owner/name')"
    return ModelNotFoundError(
        f"Unknown model {name!r}: {why}.{hint}\n"
        f"Known aliases: {_known_aliases_text()}.\n"
        "Also accepted: a local hub folder (with config.json and model.safetensors), 'owner/name' or "
        "'owner/name@revision' (branch, tag or commit sha)."
    )


def _looks_like_path(text: str) -> bool:
    return (
        text in (".", "..")
        or text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in text
        or text.endswith(("/", os.sep))
        or text.count("/") > 1
        or (len(text) > 1 and text[1] == ":")  # C:\...
    )


def _is_valid_repo_id(text: str) -> bool:
    if text.count("/") != 1:
        return False
    owner, name = text.split("/")
    if not (_REPO_PART_RE.fullmatch(owner) and _REPO_PART_RE.fullmatch(name)):
        return False
    return "--" not in text and ".." not in text and not text.endswith(".git")


def _validate_revision(revision: str) -> str:
    rev = revision.strip()
    if not rev or any(c.isspace() for c in rev) or rev.startswith("-") or ".." in rev or "@{" in rev:
        raise ConfigError(f"Invalid revision {revision!r}: expected a branch, a tag or a commit sha.")
    return rev


def _merge_revisions(at_revision: str | None, revision: str | None, name: str) -> str | None:
    if revision is not None:
        revision = _validate_revision(revision)
    if at_revision is None:
        return revision
    if revision is not None and revision != at_revision:
        raise ConfigError(
            f"Conflicting revisions for {name!r}: '@{at_revision}' in the name and revision={revision!r}. "
            "Give the revision only once."
        )
    return at_revision


def parse_model_name(
    name: str | os.PathLike[str],
    revision: str | None = None,
    namespace: str | None = None,
) -> ModelRef:
    """Classify a model name without touching the network.

    In order: an existing local folder; an alias (``insloc-r50``...) in ``namespace`` (argument,
    else ``$INSLOC_HUB_NAMESPACE``, else ``insloc-hub``); a repo id ``owner/name``. Any of the last
    two may end with ``@revision`` (branch, tag or commit sha); ``revision=`` is the same thing
    given apart, and giving two different revisions is an error.

    Raises:
        ModelNotFoundError: the name is none of the above (the message lists the aliases and
            suggests close matches), or names a folder that does not exist.
        ConfigError: conflicting or malformed revisions, a revision for a local folder, a bad namespace.

    Example:
        >>> parse_model_name("insloc-r50-c4").repo_id
        'insloc-hub/insloc-r50-c4-200ep'
        >>> parse_model_name("me/det@v2")
        ModelRef(kind='hub', path=None, repo_id='me/det', revision='v2', alias=None)
        >>> parse_model_name("me/det", revision="0123456789abcdef0123456789abcdef01234567").revision
        '0123456789abcdef0123456789abcdef01234567'
    """
    if isinstance(name, os.PathLike):
        return _local_ref(Path(name), revision, explicit_path=True)
    if not isinstance(name, str):
        raise ConfigError(f"A model name must be a string or a path, not {type(name).__name__}.")
    text = name.strip()
    if not text:
        raise _unknown_name_error(name, "the name is empty")

    candidate = Path(text).expanduser()
    if candidate.is_dir():
        return _local_ref(candidate, revision, explicit_path=False)
    if candidate.exists():
        raise ModelNotFoundError(
            f"{text!r} is a file, not a hub folder: pass the folder that holds config.json and {WEIGHTS_NAME}."
        )
    if _looks_like_path(text):
        raise ModelNotFoundError(
            f"Local folder {text!r} does not exist (resolved to {candidate.resolve()}). "
            f"Known aliases: {_known_aliases_text()}."
        )

    base, sep, at_revision = text.partition("@")
    if sep and not at_revision:
        raise ConfigError(f"Missing revision after '@' in {text!r}: use 'owner/name@branch-tag-or-sha'.")
    rev = _merge_revisions(_validate_revision(at_revision) if sep else None, revision, text)

    key = base.lower()
    if key in ALIASES:
        return ModelRef(kind="hub", repo_id=f"{_resolve_namespace(namespace)}/{ALIASES[key]}", revision=rev, alias=key)
    if _is_valid_repo_id(base):
        return ModelRef(kind="hub", repo_id=base, revision=rev)
    if "/" in base:
        raise _unknown_name_error(text, f"{base!r} is not a valid repo id ('owner/name') nor an existing folder")
    raise _unknown_name_error(text)


def _local_ref(path: Path, revision: str | None, *, explicit_path: bool) -> ModelRef:
    path = path.expanduser()
    if revision is not None:
        raise ConfigError(
            f"revision={revision!r} was given for the local folder {str(path)!r}; revisions only apply to Hub repos."
        )
    if explicit_path and not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ModelNotFoundError(f"Local hub folder {str(path)!r} {what}.")
    return ModelRef(kind="local", path=path.resolve())


# ----------------------------------------------------------------------------------------------
# The hub folder contract
# ----------------------------------------------------------------------------------------------


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # bad bytes or absurd nesting too
        raise ConfigError(f"{config_path} is not valid JSON ({type(err).__name__}: {err}).") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path} must hold a JSON object, not {type(data).__name__}.")
    return data


def required_files(config: dict[str, Any], *, source: str = CONFIG_NAME) -> list[str]:
    """Relative file names a hub folder must hold: config's ``"files"`` (+ config.json).

    Example:
        >>> required_files({"files": ["model.safetensors", "config.json", "extra/labels.txt"]})
        ['config.json', 'extra/labels.txt', 'model.safetensors']
        >>> required_files({})
        ['config.json', 'model.safetensors']
    """
    files = config.get("files", list(DEFAULT_FILES))
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ConfigError(f'"files" in {source} must be a list of relative file names, got {files!r}.')
    for f in files:
        parts = PurePosixPath(f).parts
        if f.startswith(("/", "\\")) or "\\" in f or ".." in parts or (len(f) > 1 and f[1] == ":"):
            raise ConfigError(f'"files" in {source} must hold relative paths inside the folder, got {f!r}.')
    return sorted(set(files) | {CONFIG_NAME})


def _missing_files(folder: Path, files: list[str]) -> list[str]:
    # is_file() follows symlinks: a dangling snapshot link (its blob deleted) counts as missing.
    return [f for f in files if not (folder / f).is_file()]


def _check_local_folder(folder: Path) -> list[str]:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{folder} is not a hub folder: it has no {CONFIG_NAME}. A hub folder holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (written by `insloc-train` or `save_pretrained`)."
        )
    files = required_files(_read_config(config_path), source=str(config_path))
    missing = _missing_files(folder, files)
    if missing:
        raise ModelNotFoundError(
            f"Hub folder {folder} is incomplete: {', '.join(missing)} listed in {CONFIG_NAME} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Copy the missing files or re-export the folder."
        )
    return files


# ----------------------------------------------------------------------------------------------
# Error translation
# ----------------------------------------------------------------------------------------------


def _hf_error(name: str) -> type[BaseException]:
    cls = getattr(_hf_errors, name, None) or getattr(huggingface_hub.utils, name, None)
    return cls if isinstance(cls, type) else _Never


class _Never(Exception):
    """Placeholder for an error class the installed huggingface_hub does not have."""


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, _hf_error("OfflineModeIsEnabled")]
    for module_name in ("httpx2", "httpx"):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, "TransportError", None), type):
            types.append(module.TransportError)
    requests = sys.modules.get("requests")
    if requests is not None:
        types.extend([requests.ConnectionError, requests.Timeout])
    return tuple(types)


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _translate_error(
    exc: BaseException,
    ref: ModelRef,
    *,
    endpoint: str,
    cache_dir: Path,
    offline: bool,
    filename: str | None = None,
    action: Literal["read", "write"] = "read",
) -> ModelNotFoundError:
    """Map a huggingface_hub exception to a ModelNotFoundError that says what to do."""
    repo_id = str(ref.repo_id)
    revision = ref.revision or constants.DEFAULT_REVISION
    where = f"'{repo_id}' (revision '{revision}')"
    fetch = _download_command(repo_id, ref.revision)
    alias_note = f" (alias {ref.alias!r} in namespace '{repo_id.split('/')[0]}')" if ref.alias else ""
    token_hint = (
        "If the repo is private or gated, log in with `hf auth login` or set HF_TOKEN "
        "(or pass token=...) with a token that can read it."
    )

    if isinstance(exc, _hf_error("IncompleteSnapshotError")):
        snapshot = Path(getattr(exc, "snapshot_path", "") or cache_dir)
        return _incomplete_snapshot_error(ref, snapshot, (filename or "").split(", "))
    for err in _cause_chain(exc):
        code = _status_code(err)
        if code in (401, 403) and not isinstance(err, _hf_error("RepositoryNotFoundError")):
            reason = "rejected the token (HTTP 401)" if code == 401 else "denied access (HTTP 403)"
            return HubAccessError(
                f"The Hub at {endpoint} {reason} for {where}. Check HF_TOKEN / `hf auth login` (or token=): "
                f"the token must be valid and allowed to {action} {repo_id!r}."
            )
    if isinstance(exc, _hf_error("GatedRepoError")):
        return HubAccessError(
            f"{repo_id!r} is a gated repo: accept its conditions at {endpoint}/{repo_id} and use a token "
            "of that account (HF_TOKEN or `hf auth login`)."
        )
    if isinstance(exc, _hf_error("RepositoryNotFoundError")):
        return ModelNotFoundError(
            f"Repo {repo_id!r}{alias_note} was not found on {endpoint}. Check the name (known aliases: "
            f"{_known_aliases_text()}); set the namespace with namespace= or {NAMESPACE_ENV}. {token_hint}"
        )
    if isinstance(exc, _hf_error("RevisionNotFoundError")):
        return ModelNotFoundError(
            f"Revision '{revision}' does not exist in {repo_id!r} on {endpoint}: use an existing branch, "
            f"tag or commit sha (see {endpoint}/{repo_id}/tree/main)."
        )
    if isinstance(exc, _hf_error("RemoteEntryNotFoundError")) or (
        isinstance(exc, _hf_error("EntryNotFoundError")) and not isinstance(exc, FileNotFoundError)
    ):
        missing = filename or "a file"
        if missing == CONFIG_NAME:
            return ModelNotFoundError(
                f"{where} on {endpoint} has no {CONFIG_NAME}: it is not an insloc hub folder. Push one "
                "with `push_folder_to_hub` / `insloc-hub push`."
            )
        return ModelNotFoundError(
            f'{where} on {endpoint} lacks {missing}, which its {CONFIG_NAME} lists in "files". The repo '
            "is incomplete at this revision: push the missing file or use another revision."
        )
    if action == "write":
        if isinstance(exc, _connection_error_types()):
            return ModelNotFoundError(
                f"Could not reach the Hub at {endpoint} to write {where}. Check the network connection and "
                f"HF_ENDPOINT, then push again. (original error: {_first_line(_cause_chain(exc)[-1])})"
            )
        return ModelNotFoundError(
            f"The Hub at {endpoint} refused the write to {where} (HTTP {_status_code(exc)}): {_first_line(exc)}."
        )
    if isinstance(exc, (_hf_error("LocalEntryNotFoundError"), *_connection_error_types())):
        if offline:
            return ModelNotFoundError(
                f"Model {where} is not in the local cache ({cache_dir}) and network access is disabled "
                f"(local_files_only=True or HF_HUB_OFFLINE=1). Fetch it once with network access:\n    {fetch}"
            )
        return ModelNotFoundError(
            f"Could not reach the Hub at {endpoint} to fetch {where}, and it is not in the local cache "
            f"({cache_dir}). Check the network connection and HF_ENDPOINT, then run:\n    {fetch}\n"
            f"(original error: {_first_line(_cause_chain(exc)[-1])})"
        )
    if isinstance(exc, _hf_error("HfHubHTTPError")):
        return ModelNotFoundError(
            f"The Hub at {endpoint} failed while fetching {where} (HTTP {_status_code(exc)}): "
            f"{_first_line(exc)}. Retry later, or run `{fetch}`."
        )
    return ModelNotFoundError(f"Could not resolve {where} from {endpoint}: {type(exc).__name__}: {exc}")


def _incomplete_snapshot_error(ref: ModelRef, snapshot: Path, missing: list[str]) -> ModelNotFoundError:
    missing = [m for m in missing if m] or ["some files"]
    repo_id = str(ref.repo_id)
    return ModelNotFoundError(
        f"The cached snapshot of '{repo_id}' (revision '{ref.revision or constants.DEFAULT_REVISION}') at "
        f"{snapshot} is incomplete: {', '.join(missing)} listed in {CONFIG_NAME} "
        f"{'is' if len(missing) == 1 else 'are'} missing, and the Hub may not be used (local_files_only=True "
        "or HF_HUB_OFFLINE=1) or cannot be reached. Complete it with network access:\n"
        f"    {_download_command(repo_id, ref.revision)}"
    )


def _translatable_errors() -> tuple[type[BaseException], ...]:
    names = (
        "HfHubHTTPError",
        "EntryNotFoundError",
        "LocalEntryNotFoundError",
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "GatedRepoError",
        "OfflineModeIsEnabled",
    )
    return tuple(_hf_error(n) for n in names) + _connection_error_types()


# ----------------------------------------------------------------------------------------------
# Resolve and download
# ----------------------------------------------------------------------------------------------


def resolve_model_dir(
    name: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    namespace: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """Local folder holding a complete hub folder for ``name`` (fetched into the HF cache if needed).

    For a Hub repo: ``config.json`` is fetched first, then the files its ``"files"`` list names
    (plus README.md when the repo has one), all pinned to the commit ``config.json`` came from, so
    a branch moving in between cannot mix two revisions. The returned folder is the cache snapshot
    ``.../models--owner--name/snapshots/<commit sha>``.

    With a commit sha whose files are cached, no network call is made. With ``local_files_only=True``
    or ``HF_HUB_OFFLINE=1`` the network is never used; branch names resolve through the cache's refs.

    Raises:
        ModelNotFoundError: unknown name; repo, revision or file missing on the Hub; not cached while
            offline (the message gives the ``insloc-hub download`` command); a partial snapshot or
            local folder (a file named in config.json missing); unreachable Hub. HTTP 401/403 raise
            :class:`HubAccessError`, a subclass.
        ConfigError: malformed names, revisions, or ``config.json``.

    Example:
        >>> path = resolve_model_dir("insloc-r50")  # doctest: +SKIP
        >>> sorted(p.name for p in path.iterdir())  # doctest: +SKIP
        ['README.md', 'config.json', 'model.safetensors']
        >>> resolve_model_dir("me/det@3f2a...", local_files_only=True)  # doctest: +SKIP
    """
    ref = parse_model_name(name, revision=revision, namespace=namespace)
    if ref.kind == "local":
        assert ref.path is not None
        _check_local_folder(ref.path)
        return ref.path
    return _fetch(
        ref,
        cache_dir=_resolve_cache_dir(cache_dir),
        offline=_is_offline(local_files_only),
        token=token,
        endpoint=_resolve_endpoint(endpoint),
    )


def download(
    name: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    namespace: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """Fetch a model into the cache now, so it later resolves offline. Backs ``insloc-hub download``.

    Same files and checks as :func:`resolve_model_dir`, but never from the cache alone: a branch or
    tag is re-resolved on the Hub and missing files are fetched; offline mode (``HF_HUB_OFFLINE``)
    is an error. A local folder is only checked and returned.

    Example:
        >>> download("insloc-r50-c4", revision="main")  # doctest: +SKIP
        PosixPath('/home/me/.cache/huggingface/hub/models--insloc-hub--insloc-r50-c4-200ep/snapshots/...')
    """
    ref = parse_model_name(name, revision=revision, namespace=namespace)
    if ref.kind == "local":
        assert ref.path is not None
        _check_local_folder(ref.path)
        return ref.path
    if _is_offline(None):
        raise ModelNotFoundError(
            f"Cannot download {ref}: offline mode is enabled (HF_HUB_OFFLINE). Unset HF_HUB_OFFLINE and retry."
        )
    return _fetch(
        ref,
        cache_dir=_resolve_cache_dir(cache_dir),
        offline=False,
        token=token,
        endpoint=_resolve_endpoint(endpoint),
    )


def _fetch(ref: ModelRef, *, cache_dir: Path, offline: bool, token: str | bool | None, endpoint: str) -> Path:
    assert ref.repo_id is not None
    common: dict[str, Any] = {
        "repo_type": "model",
        "cache_dir": str(cache_dir),
        "local_files_only": offline,
        "token": token,
        "endpoint": endpoint,
    }
    context = {"endpoint": endpoint, "cache_dir": cache_dir, "offline": offline}
    try:
        config_path = Path(hf_hub_download(ref.repo_id, CONFIG_NAME, revision=ref.revision, **common))
    except _translatable_errors() as err:
        raise _translate_error(err, ref, filename=CONFIG_NAME, **context) from err

    # hf_hub_download returns .../snapshots/<commit sha>/config.json: pin everything else to that commit.
    snapshot = config_path.parent
    commit = snapshot.name
    files = required_files(_read_config(config_path), source=f"{CONFIG_NAME} of {ref}")
    if not _COMMIT_SHA_RE.fullmatch(commit):  # pragma: no cover - cache layout changed
        raise ModelNotFoundError(f"Unexpected Hugging Face cache layout: {config_path}")

    patterns = [glob.escape(f) for f in (*files, *_OPTIONAL_FILES)]
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=commit, allow_patterns=patterns, **common))
    except _translatable_errors() as err:
        missing = _missing_files(snapshot, files)
        unreachable = isinstance(err, _connection_error_types()) or type(err) is _hf_error("LocalEntryNotFoundError")
        if missing and unreachable and not any(_status_code(e) in (401, 403) for e in _cause_chain(err)):
            raise _incomplete_snapshot_error(ref, snapshot, missing) from err
        raise _translate_error(err, ref, filename=", ".join(missing) or None, **context) from err

    missing = _missing_files(folder, files)
    if missing:
        if offline:
            raise _incomplete_snapshot_error(ref, folder, missing)
        where = f"'{ref.repo_id}' (revision '{ref.revision or constants.DEFAULT_REVISION}', commit {commit})"
        raise ModelNotFoundError(
            f"{where} on {endpoint} lacks {', '.join(missing)}, listed in its {CONFIG_NAME}. Push the "
            "missing file(s) or use another revision."
        )
    logger.debug("Resolved %s to %s", ref, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------


def push_folder_to_hub(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    namespace: str | None = None,
) -> str:
    """Upload a hub folder to a Hub repo (created if needed) and return the new commit sha.

    ``repo_id`` may be ``owner/name``, ``owner/name@branch`` or an alias (``namespace`` applies).
    A ``revision`` branch that does not exist yet is created from ``main`` first. With
    ``create_pr=True`` the files go to a new pull request against ``main`` (its ref is
    ``refs/pr/N``). Unchanged files are not re-uploaded; if nothing changed, the current head sha
    is returned.

    Raises:
        ModelNotFoundError: the folder is not a complete hub folder; the repo cannot be created or
            written (:class:`HubAccessError` for HTTP 401/403).
        ConfigError: malformed repo id or revision, or ``create_pr`` combined with a branch.

    Example:
        >>> sha = push_folder_to_hub("runs/pretrain/hub", "me/insloc-r50-mine")  # doctest: +SKIP
        >>> sha = push_folder_to_hub("runs/ft/hub", "me/insloc-r50-mine", revision="coco-ft")  # doctest: +SKIP
        >>> resolve_model_dir("me/insloc-r50-mine", revision=sha)  # doctest: +SKIP
    """
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"Cannot push {str(folder)!r}: no such folder.")
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / required).is_file():
            raise ModelNotFoundError(
                f"Cannot push {folder}: it has no {required}. A hub folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (see `save_pretrained` / `insloc-train`)."
            )
    # only the hub folder travels: never checkpoints, logs or half-written saves lying beside it
    upload_files = set(_check_local_folder(folder))
    if (folder / "README.md").is_file():
        upload_files.add("README.md")

    text = repo_id.strip()
    base, sep, at_revision = text.partition("@")
    revision = _merge_revisions(_validate_revision(at_revision) if sep else None, revision, text)
    key = base.lower()
    if key in ALIASES:
        target = f"{_resolve_namespace(namespace)}/{ALIASES[key]}"
    elif _is_valid_repo_id(base):
        target = base
    else:
        raise ConfigError(f"Cannot push to {repo_id!r}: expected a repo id 'owner/name' or an alias.")
    if revision is not None and _COMMIT_SHA_RE.fullmatch(revision):
        raise ConfigError(f"Cannot push to commit {revision}: pass a branch name as revision.")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ConfigError(
            f"create_pr=True opens a pull request against '{constants.DEFAULT_REVISION}'; "
            f"do not combine it with revision={revision!r}."
        )
    if _is_offline(None):
        raise ModelNotFoundError(f"Cannot push to {target!r}: offline mode is enabled (HF_HUB_OFFLINE).")

    hub_endpoint = _resolve_endpoint(endpoint)
    api = HfApi(endpoint=hub_endpoint, token=token)
    ref = ModelRef(kind="hub", repo_id=target, revision=revision)
    try:
        api.create_repo(target, repo_type="model", private=private, exist_ok=True)
        if revision not in (None, constants.DEFAULT_REVISION) and not str(revision).startswith("refs/"):
            api.create_branch(target, branch=str(revision), repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=target,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with insloc-hub",
            create_pr=create_pr,
            allow_patterns=sorted(upload_files),
        )
    except _translatable_errors() as err:
        translated = _translate_error(
            err, ref, endpoint=hub_endpoint, cache_dir=Path("."), offline=False, action="write"
        )
        raise type(translated)(f"Push of {folder} to {target!r} failed. {translated}") from err
    oid = getattr(info, "oid", None)
    if not isinstance(oid, str):  # pragma: no cover - defensive
        raise InsLocError(f"The Hub did not return a commit sha for the push to {target!r}: {info!r}")
    logger.info("Pushed %s to %s@%s (commit %s)", folder, target, revision or "main", oid)
    return oid


# ----------------------------------------------------------------------------------------------
# Cache listing
# ----------------------------------------------------------------------------------------------


def _is_insloc_config(config: dict[str, Any]) -> bool:
    for key in ("library_name", "model_type", "library"):
        value = config.get(key)
        if isinstance(value, str) and "insloc" in value.lower():
            return True
    return "insloc" in config


def list_cached(cache_dir: str | os.PathLike[str] | None = None, namespace: str | None = None) -> list[dict]:
    """Insloc models in the Hugging Face cache, one dict per repo, sorted by repo id.

    A cached model repo counts as insloc if it is in the alias namespace (``namespace`` argument,
    else ``$INSLOC_HUB_NAMESPACE``, else ``insloc-hub``) or one of its cached ``config.json``
    says so (``"library_name": "insloc-hub"``). Each dict::

        {"repo_id": "insloc-hub/insloc-r50-fpn-200ep", "path": "...", "size": 94371840,
         "size_on_disk": 94371840,
         "revisions": [{"commit": "3f2a...", "refs": ["main"], "size": 94371840,
                        "files": ["config.json", "model.safetensors"], "path": ".../snapshots/3f2a..."}]}

    Returns an empty list when the cache folder does not exist.

    Example:
        >>> [m["repo_id"] for m in list_cached()]  # doctest: +SKIP
        ['insloc-hub/insloc-r50-fpn-200ep']
    """
    root = _resolve_cache_dir(cache_dir)
    if not root.is_dir():
        return []
    try:
        info = scan_cache_dir(root)
    except _hf_error("CacheNotFound"):
        return []
    ns = _resolve_namespace(namespace)
    out: list[dict] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        is_insloc = repo.repo_id.split("/")[0] == ns
        if not is_insloc:
            for rev in revisions:
                config_path = Path(rev.snapshot_path) / CONFIG_NAME
                try:
                    if config_path.is_file() and _is_insloc_config(_read_config(config_path)):
                        is_insloc = True
                        break
                except (ConfigError, OSError):
                    continue
        if not is_insloc:
            continue
        out.append(
            {
                "repo_id": repo.repo_id,
                "path": str(repo.repo_path),
                "size": repo.size_on_disk,
                "size_on_disk": repo.size_on_disk,  # huggingface_hub's name for the same number
                "revisions": [
                    {
                        "commit": rev.commit_hash,
                        "refs": sorted(rev.refs),
                        "size": rev.size_on_disk,
                        "files": sorted(Path(f.file_path).relative_to(rev.snapshot_path).as_posix() for f in rev.files),
                        "path": str(rev.snapshot_path),
                    }
                    for rev in revisions
                ],
            }
        )
    return sorted(out, key=lambda m: m["repo_id"])
