"""Hub transport: a model name -> a local hub folder; hub folders -> the Hub. Model-agnostic.

Names: an alias (``insloc-r50``, in ``namespace=`` / ``$INSLOC_HUB_NAMESPACE`` / ``insloc-hub``), a repo
id ``owner/name``, either with ``@revision``, or a local folder. huggingface_hub owns the transport,
the cache and their settings (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_TOKEN``);
insloc-hub adds the aliases, pins every file to the commit ``config.json`` came from, checks the
folder against ``config.json``'s ``"files"``, and turns huggingface_hub's documented exceptions into
:class:`~insloc_hub.errors.ModelNotFoundError` / :class:`HubAccessError` messages that say what to do.
"""

from __future__ import annotations

import difflib
import glob
import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import httpx2  # huggingface_hub 2.4's HTTP client: raised as is when a push cannot connect
from huggingface_hub import HfApi, constants, hf_hub_download, is_offline_mode, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from insloc_hub.errors import ConfigError, HubAccessError, ModelNotFoundError

__all__ = [
    "ALIASES", "CANONICAL_MODELS", "CONFIG_NAME", "DEFAULT_FILES", "DEFAULT_NAMESPACE", "HubAccessError", "ModelRef",
    "WEIGHTS_NAME", "alias_repo_id", "check_local_folder", "download", "list_cached", "parse_model_name",
    "push_folder_to_hub", "push_target", "read_json_object", "required_files", "resolve_model_dir",
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

    def __str__(self) -> str:
        if self.kind == "local":
            return str(self.path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)


def is_hex_digest(text: object, length: int) -> bool:
    """``text`` is ``length`` lowercase hex digits (a git commit id: 40; a sha256: 64)."""
    return isinstance(text, str) and len(text) == length and all(c in "0123456789abcdef" for c in text)


def _is_repo_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1


def _namespace(namespace: str | None) -> str:
    ns = (namespace if namespace is not None else os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE).strip("/ ")
    if not _is_repo_id(f"{ns}/x"):
        source = "namespace=" if namespace is not None else NAMESPACE_ENV
        raise ConfigError(f"Invalid Hub namespace {ns!r} (from {source}): expected a user or organisation name "
                          "such as 'insloc-hub'.")
    return ns


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
    return f"{_namespace(namespace)}/{ALIASES[key]}"


def _unknown_name_error(name: str, reason: str | None = None) -> ModelNotFoundError:
    close = difflib.get_close_matches(name.split("@", 1)[0].lower(), list(ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    why = reason or "it is not a known alias, an existing local folder, or a Hub repo id ('owner/name')"
    return ModelNotFoundError(
        f"Unknown model {name!r}: {why}.{hint}\nKnown aliases: {', '.join(ALIASES)}.\n"
        "Also accepted: a local hub folder (with config.json and model.safetensors), 'owner/name' or "
        "'owner/name@revision' (branch, tag or commit sha)."
    )


def _split_revision(name: str, revision: str | None) -> tuple[str, str | None]:
    """``"repo@rev"`` and ``revision=`` -> (repo, revision); giving two different revisions is an error."""
    base, sep, at_revision = name.partition("@")
    for rev in (at_revision if sep else None, revision):
        if rev is not None and (not rev.strip() or any(c.isspace() for c in rev)):
            raise ConfigError(f"Invalid revision {rev!r} for {name!r}: expected a branch, a tag or a commit sha.")
    if sep and revision is not None and revision != at_revision:
        raise ConfigError(f"Conflicting revisions for {name!r}: '@{at_revision}' in the name and "
                          f"revision={revision!r}. Give the revision only once.")
    return base, at_revision if sep else revision


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
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError(f"A model name must be a string or a path, not {type(name).__name__}.")
    text = os.fspath(name).strip()
    if not text:
        raise _unknown_name_error(text, "the name is empty")
    path = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/") or text.count("/") > 1
    if isinstance(name, os.PathLike) or path.is_dir() or looks_like_path:
        if revision is not None:
            raise ConfigError(f"revision={revision!r} was given for the local folder {text!r}; revisions only "
                              "apply to Hub repos.")
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else f"does not exist (resolved to {path.resolve()})"
            raise ModelNotFoundError(f"Local hub folder {text!r} {what}. Known aliases: {', '.join(ALIASES)}.")
        return ModelRef(kind="local", path=path.resolve())
    if path.is_file():
        raise ModelNotFoundError(f"{text!r} is a file, not a hub folder: pass the folder that holds config.json "
                                 f"and {WEIGHTS_NAME}.")
    base, rev = _split_revision(text, revision)
    if base.lower() in ALIASES:
        return ModelRef(kind="hub", repo_id=alias_repo_id(base, namespace), revision=rev, alias=base.lower())
    if _is_repo_id(base):
        return ModelRef(kind="hub", repo_id=base, revision=rev)
    reason = f"{base!r} is not a valid repo id ('owner/name') nor an existing folder" if "/" in base else None
    raise _unknown_name_error(text, reason)


#: config.json larger than this is refused before it is parsed
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_json_object(path: Path) -> dict[str, Any]:
    """A config.json's object; ConfigError for a huge file, bad bytes, bad or absurdly nested JSON, a non-object."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {size:,} bytes, over the limit of {MAX_CONFIG_BYTES:,} for a config.json")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON and UTF-8 errors
        raise ConfigError(f"{path} is not valid JSON ({type(err).__name__}: {err}).") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}.")
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


def _check_complete(folder: Path, files: list[str], what: str, advice: str) -> None:
    missing = _missing_files(folder, files)
    if missing:
        raise ModelNotFoundError(f"{what} is incomplete: {', '.join(missing)} listed in {CONFIG_NAME} "
                                 f"{'is' if len(missing) == 1 else 'are'} missing{advice}")


def check_local_folder(folder: Path) -> list[str]:
    """The files a local hub folder lists; ModelNotFoundError if config.json or a listed file is missing."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{folder} is not a hub folder: it has no {CONFIG_NAME}. A hub folder holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (written by `insloc-train` or `save_pretrained`)."
        )
    files = required_files(read_json_object(config_path), source=str(config_path))
    _check_complete(folder, files, f"Hub folder {folder}", ". Copy the missing files or re-export the folder.")
    return files


_FETCH = "Fetch it with network access:\n    {fetch}"
_TOKEN = ("If the repo is private or gated, log in with `hf auth login` or set HF_TOKEN (or pass token=) with a "
          "token that can read it.")

# First matching row wins, so subclasses come before their bases. Placeholders: see _translate_error.
_ERROR_TABLE: tuple[tuple[type[BaseException], type[ModelNotFoundError], str], ...] = (
    (GatedRepoError, HubAccessError,
     "{repo_id!r} is a gated repo: accept its conditions at {endpoint}/{repo_id} and use a token of that account "
     "(HF_TOKEN or `hf auth login`)."),
    (RepositoryNotFoundError, ModelNotFoundError,
     "Repo {repo_id!r}{alias} was not found on {endpoint}. Check the name (known aliases: {aliases}); set the "
     "namespace with namespace= or " + NAMESPACE_ENV + ". " + _TOKEN),
    (RevisionNotFoundError, ModelNotFoundError,
     "Revision '{revision}' does not exist in {repo_id!r} on {endpoint}: use an existing branch, tag or commit sha "
     "(see {endpoint}/{repo_id}/tree/main)."),
    (RemoteEntryNotFoundError, ModelNotFoundError,
     "{where} on {endpoint} has no {detail}: it is not a complete insloc hub folder at this revision. Push one "
     "with `insloc-hub push` or use another revision."),
    (LocalEntryNotFoundError, ModelNotFoundError,  # also IncompleteSnapshotError, its subclass
     "{where} is not complete in the local cache ({detail} missing) and the Hub at {endpoint} may not be used "
     "(local_files_only=True or HF_HUB_OFFLINE=1) or cannot be reached. " + _FETCH + "{convert}"),
    (OfflineModeIsEnabled, ModelNotFoundError,
     "Cannot {action} {where}: offline mode is enabled (HF_HUB_OFFLINE=1). Unset it and retry."),
    (httpx2.TransportError, ModelNotFoundError,
     "Could not reach the Hub at {endpoint} to {action} {where} ({first_line}). Check the network connection "
     "and HF_ENDPOINT, then retry.{convert}"),
    (HfHubHTTPError, ModelNotFoundError,
     "The Hub at {endpoint} answered HTTP {status} to the {action} of {where}: {first_line}. Retry later."),
)


def _status_code(exc: BaseException) -> int | None:
    """HTTP status of ``exc`` or of what caused it (huggingface_hub may wrap a 401 in a cache miss)."""
    while exc is not None:
        code = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(code, int):
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def _translate_error(
    exc: BaseException, ref: ModelRef, *, endpoint: str | None, detail: str = "", action: str = "fetch"
) -> ModelNotFoundError:
    """The first row of ``_ERROR_TABLE`` that ``exc`` matches, as an actionable error (401/403 first)."""
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    revision = ref.revision or constants.DEFAULT_REVISION
    where = f"'{ref.repo_id}' (revision '{revision}')"
    status = _status_code(exc)
    if status in (401, 403) and not isinstance(exc, RepositoryNotFoundError):
        reason = "rejected the token (HTTP 401)" if status == 401 else "denied access (HTTP 403)"
        return HubAccessError(f"The Hub at {endpoint} {reason} for {where}. Check HF_TOKEN / `hf auth login` (or "
                              f"token=): the token must be valid and allowed to {action} {ref.repo_id!r}.")
    convert = ""
    if ref.alias:  # the official release also comes as checkpoints that convert without any Hub
        convert = ("\nWithout the Hub, convert the official release's checkpoint instead:\n"
                   "    insloc-hub convert official <checkpoint.pth> <output folder>")
    text = str(exc).strip()
    values = dict(
        repo_id=ref.repo_id, revision=revision, where=where, endpoint=endpoint, detail=detail or "a listed file",
        alias=f" (alias {ref.alias!r} in namespace '{str(ref.repo_id).split('/')[0]}')" if ref.alias else "",
        aliases=", ".join(ALIASES), action=action, status=status, convert=convert,
        first_line=text.splitlines()[0] if text else type(exc).__name__,
        fetch=f"insloc-hub download {shlex.quote(str(ref.repo_id))} --revision {shlex.quote(revision)}",
    )
    for error_type, our_type, template in _ERROR_TABLE:
        if isinstance(exc, error_type):
            return our_type(template.format(**values))
    return ModelNotFoundError(f"Could not {action} {where} from {endpoint}: {type(exc).__name__}: {exc}")


_HUB_ERRORS = tuple(row[0] for row in _ERROR_TABLE)


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
        check_local_folder(ref.path)
        return ref.path
    kwargs: dict[str, Any] = dict(cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token,
                                  endpoint=endpoint)
    files: list[str] = []
    snapshot: Path | None = None
    try:
        config_path = Path(hf_hub_download(str(ref.repo_id), CONFIG_NAME, revision=ref.revision, **kwargs))
        # .../snapshots/<commit sha>/config.json: every other file is pinned to that commit
        snapshot = config_path.parent
        files = required_files(read_json_object(config_path), source=f"{CONFIG_NAME} of {ref}")
        patterns = [glob.escape(f) for f in (*files, *_OPTIONAL_FILES)]
        folder = Path(snapshot_download(str(ref.repo_id), revision=snapshot.name, allow_patterns=patterns, **kwargs))
    except _HUB_ERRORS as err:
        detail = ", ".join(_missing_files(snapshot, files)) if snapshot else CONFIG_NAME
        raise _translate_error(err, ref, endpoint=endpoint, detail=detail) from err
    fetch = f"insloc-hub download {shlex.quote(str(ref.repo_id))} --revision {snapshot.name}"
    _check_complete(folder, files, f"'{ref.repo_id}' at commit {snapshot.name}",
                    f" from {folder}. If the Hub has the file, fetch it with network access:\n    {fetch}\n"
                    "If it lacks it, push the missing file or use another revision.")
    logger.debug("Resolved %s to %s", ref, folder)
    return folder


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

    :func:`resolve_model_dir` with the network required: offline mode (``HF_HUB_OFFLINE``) is an
    error. A local folder is only checked and returned.

    Example:
        >>> download("insloc-r50-c4", revision="main")  # doctest: +SKIP
        PosixPath('/home/me/.cache/huggingface/hub/models--insloc-hub--insloc-r50-c4-200ep/snapshots/...')
    """
    if is_offline_mode() and parse_model_name(name, revision=revision, namespace=namespace).kind == "hub":
        raise ModelNotFoundError(f"Cannot download {name}: offline mode is enabled (HF_HUB_OFFLINE). Unset "
                                 "HF_HUB_OFFLINE and retry.")
    return resolve_model_dir(name, revision=revision, cache_dir=cache_dir, local_files_only=False,
                             namespace=namespace, token=token, endpoint=endpoint)


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
    # only the hub folder travels: never checkpoints, logs or half-written saves lying beside it
    upload_files = set(check_local_folder(folder)) | {f for f in _OPTIONAL_FILES if (folder / f).is_file()}
    target, revision = push_target(repo_id, revision, namespace)
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ConfigError(f"create_pr=True opens a pull request against '{constants.DEFAULT_REVISION}'; "
                          f"do not combine it with revision={revision!r}.")

    api = HfApi(endpoint=endpoint, token=token)
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
    except _HUB_ERRORS as err:
        ref = ModelRef(kind="hub", repo_id=target, revision=revision)
        translated = _translate_error(err, ref, endpoint=endpoint, action="write")
        raise type(translated)(f"Push of {folder} to {target!r} failed. {translated}") from err
    logger.info("Pushed %s to %s@%s (commit %s)", folder, target, revision or "main", info.oid)
    return info.oid


def push_target(repo_id: str, revision: str | None = None, namespace: str | None = None) -> tuple[str, str | None]:
    """``(owner/name, branch)`` a push of ``repo_id`` (``owner/name[@branch]`` or an alias) goes to.

    Example:
        >>> push_target("insloc-r50@v1", namespace="me")
        ('me/insloc-r50-fpn-200ep', 'v1')
    """
    base, revision = _split_revision(repo_id.strip(), revision)
    if base.lower() in ALIASES:
        base = alias_repo_id(base, namespace)
    elif not _is_repo_id(base):
        raise ConfigError(f"Cannot push to {repo_id!r}: expected a repo id 'owner/name' or an alias.")
    if is_hex_digest(revision, 40):
        raise ConfigError(f"Cannot push to commit {revision}: pass a branch name as revision.")
    return base, revision


def list_cached(cache_dir: str | os.PathLike[str] | None = None, namespace: str | None = None) -> list[dict]:
    """Insloc models in the Hugging Face cache (``scan_cache_dir``), one dict per repo, sorted by repo id.

    A cached model repo counts if it is in the alias namespace or a cached ``config.json`` says
    ``"library": "insloc-hub"`` (or ``library_name``). Each dict: ``repo_id``, ``path``, ``size_on_disk``, ``revisions``
    (newest first: ``commit``, ``refs``, ``size_on_disk``, ``files``, ``path``). No cache folder: ``[]``.

    Raises:
        ConfigError: ``cache_dir`` exists but is not a folder.
    """
    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"cache folder {str(root)!r} is a file; pass the Hugging Face cache folder (HF_HUB_CACHE)")
    if not root.is_dir():
        return []
    ns = _namespace(namespace)
    out: list[dict] = []
    for repo in sorted(scan_cache_dir(root).repos, key=lambda r: r.repo_id):
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        if repo.repo_type == "model" and (repo.repo_id.split("/")[0] == ns or any(_is_insloc(r) for r in revisions)):
            out.append({"repo_id": repo.repo_id, "path": str(repo.repo_path), "size_on_disk": repo.size_on_disk,
                        "revisions": [{"commit": r.commit_hash, "refs": sorted(r.refs), "size_on_disk": r.size_on_disk,
                                       "files": sorted(Path(f.file_path).relative_to(r.snapshot_path).as_posix()
                                                       for f in r.files),
                                       "path": str(r.snapshot_path)} for r in revisions]})
    return out


def _is_insloc(revision: Any) -> bool:
    try:
        config = read_json_object(Path(revision.snapshot_path) / CONFIG_NAME)
    except ConfigError:
        return False
    return "insloc-hub" in (config.get("library"), config.get("library_name"))
