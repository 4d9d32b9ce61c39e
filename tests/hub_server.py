"""A small, real Hugging Face Hub server for tests (FastAPI + uvicorn on 127.0.0.1).

This is a TEST server: it implements only the Hub routes that huggingface_hub (2.x) calls for
creating repos, committing (preupload + NDJSON commit), branches, tags, pull requests, repo info,
tree listings and file downloads (``resolve``), with the headers the client relies on. It is not a
Hub: no git, no LFS/Xet storage, no rate limits; everything lives in a temp folder and dies with it.

What the client needs, and how this server answers (read against huggingface_hub 2.4):

- ``POST /api/{type}s/{repo}/preupload/{rev}`` answers ``"uploadMode": "regular"`` for every file,
  so files travel base64-encoded inside the commit payload: no LFS batch API, no Xet CAS. With
  ``hf_xet`` installed, ``HfApi.upload_folder`` takes its "pipelined" path, which only opens a Xet
  upload for files the server calls ``"lfs"``; for ``"regular"`` files it never touches Xet.
  ``"oid"`` is the git blob sha1 of the file already at that path, so unchanged files are skipped.
- ``POST /api/{type}s/{repo}/commit/{rev}`` reads the NDJSON body: ``header``, ``file``
  (base64), ``deletedFile``, ``deletedFolder`` and ``lfsFile`` (only for content the server holds).
- ``HEAD/GET /{repo}/resolve/{rev}/{path}`` answers small files with 200, ``ETag`` = git blob sha1
  and ``X-Repo-Commit``. Files of ``lfs_threshold`` bytes or more are answered like LFS files on the
  real Hub: a 302 to a "CDN" on another host name (``localhost`` instead of ``127.0.0.1``, same
  port) with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``; the client does not follow it for
  HEAD, and downloads from it without the Authorization header. No ``X-Xet-*`` headers are ever
  sent, so downloads never go through hf_xet.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the
  client maps them to its exception classes; ``EntryNotFound`` carries ``X-Repo-Commit``.
- Tokens: ``tokens`` maps a token to ``"read"`` or ``"write"``. A token the server does not know
  gets 401 "Invalid credentials in Authorization header"; writing needs a write token (401 without
  a token, 403 with a read token); private repos look missing (404) without a token.

Each commit is an immutable snapshot (path -> blob) with a 40-hex sha; branches (``main`` and
created ones), tags and ``refs/pr/N`` point at commits; revisions may be any of those names or a
commit sha (or a unique prefix of at least 7 characters).

Use::

    with HubServer(tmp_path) as hub:
        api = HfApi(endpoint=hub.endpoint, token="test-token")
        ...
    # or the pytest fixtures ``hub_server`` / ``hub_env`` from tests/conftest.py
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

__all__ = ["HubServer", "RecordedRequest", "git_blob_sha1", "run_hub_server"]

logger = logging.getLogger(__name__)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"
USER = "test-user"


def git_blob_sha1(content: bytes) -> str:
    """Git's blob id of ``content`` (what the Hub calls the ``oid`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubHTTPError(Exception):
    """Raised inside handlers; turned into a Hub-style error response."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


@dataclass
class Commit:
    oid: str
    parents: list[str]
    title: str
    description: str
    files: dict[str, str]  # path -> blob sha1
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, dict[str, Any]] = field(default_factory=dict)  # num -> {"title", "oid" (head), ...}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received (for assertions such as "no network call happened")."""

    method: str
    path: str
    query: str
    host: str
    authorization: bool


class HubServer:
    """A Hub on 127.0.0.1 and a random free port, served by uvicorn from a background thread.

    Args:
        root: folder for blobs and commit records (a temp folder if None).
        tokens: token -> "read" | "write". Default ``{"test-token": "write"}``.
        lfs_threshold: files of at least this many bytes are served like LFS files (302 to a CDN host).
        cdn_host: host name of that CDN (must reach this machine under another name than 127.0.0.1).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        tokens: dict[str, str] | None = None,
        lfs_threshold: int = 1024,
        cdn_host: str = "localhost",
    ) -> None:
        if root is None:
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="hub-server-")
            root = self._tmp.name
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens if tokens is not None else {"test-token": "write"})
        self.lfs_threshold = lfs_threshold
        self.cdn_host = cdn_host
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._sha256_to_blob: dict[str, str] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port: int | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:53127`` (what HF_ENDPOINT should be)."""
        if self.port is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://{self.cdn_host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> HubServer:
        if self.running:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        self.port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"hub-server-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test Hub server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: afterwards every connection to :attr:`endpoint` is refused."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()

    # ------------------------------------------------------------------ inspection helpers for tests
    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def branch_head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self.repos[(repo_type, repo_id)].branches[branch]

    def files_at(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            commit = repo.commits[self._resolve(repo, revision)]
            return {p: self._read_blob(oid) for p, oid in commit.files.items()}

    # ------------------------------------------------------------------ storage
    def _store_blob(self, content: bytes) -> str:
        oid = git_blob_sha1(content)
        path = self.blob_dir / oid
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
        self._sha256_to_blob[hashlib.sha256(content).hexdigest()] = oid
        return oid

    def _read_blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def _blob_size(self, oid: str) -> int:
        return (self.blob_dir / oid).stat().st_size

    def _blob_sha256(self, oid: str) -> str:
        return hashlib.sha256(self._read_blob(oid)).hexdigest()

    def _is_lfs(self, oid: str) -> bool:
        return self._blob_size(oid) >= self.lfs_threshold

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, str], title: str, description: str
    ) -> Commit:
        payload = json.dumps(
            {"parent": parent, "files": files, "title": title, "n": next(self._counter), "t": time.time()},
            sort_keys=True,
        ).encode()
        commit = Commit(
            oid=hashlib.sha1(payload).hexdigest(),
            parents=[parent] if parent else [],
            title=title,
            description=description,
            files=dict(files),
            date=_now(),
        )
        repo.commits[commit.oid] = commit
        self._persist(repo, commit)
        return commit

    def _persist(self, repo: Repo, commit: Commit | None = None) -> None:
        folder = self.root / "repos" / f"{repo.repo_type}s" / repo.repo_id
        (folder / "commits").mkdir(parents=True, exist_ok=True)
        if commit is not None:
            (folder / "commits" / f"{commit.oid}.json").write_text(json.dumps(commit.__dict__, indent=1))
        refs = {"branches": repo.branches, "tags": repo.tags, "prs": {n: p["oid"] for n, p in repo.prs.items()}}
        (folder / "refs.json").write_text(json.dumps(refs, indent=1))

    def _resolve(self, repo: Repo, revision: str) -> str:
        """Revision (branch, tag, refs/..., commit sha or prefix) -> commit oid."""
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
        elif rev.startswith("refs/tags/"):
            tag = rev[len("refs/tags/") :]
            if tag in repo.tags:
                return repo.tags[tag]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in repo.prs:
            return repo.prs[int(m.group(1))]["oid"]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if _SHA_RE.fullmatch(rev) and rev in repo.commits:
            return rev
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ------------------------------------------------------------------ auth
    def _role(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if not header:
            return None
        token = header[7:].strip() if header.lower().startswith("bearer ") else header.strip()
        role = self.tokens.get(token)
        if role is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return role

    def _repo(self, request: Request, kind: str, repo_id: str, *, write: bool = False) -> Repo:
        repo_type = REPO_TYPES.get(kind)
        if repo_type is None:
            raise HubHTTPError(404, f"Unknown repo type {kind!r}")
        role = self._role(request)
        if write and role is None:
            raise HubHTTPError(401, "You must be authenticated to write to a repo")
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and role is None):
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if write and role != "write":
            raise HubHTTPError(403, "You don't have the rights to write to this repo (read-only token)")
        return repo

    # ------------------------------------------------------------------ responses
    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _tree_entry(self, path: str, oid: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": oid, "size": self._blob_size(oid), "path": path}
        if self._is_lfs(oid):
            entry["lfs"] = {"oid": self._blob_sha256(oid), "size": self._blob_size(oid), "pointerSize": 134}
        return entry

    def _info(self, repo: Repo, oid: str, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[oid]
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=self._blob_size(blob), blobId=blob)
                if self._is_lfs(blob):
                    sibling["lfs"] = {
                        "sha256": self._blob_sha256(blob),
                        "size": self._blob_size(blob),
                        "pointerSize": 134,
                    }
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(self._blob_size(b) for b in commit.files.values()),
        }

    # ------------------------------------------------------------------ app
    def _build_app(self) -> FastAPI:  # noqa: C901 - one place that lists every route
        app = FastAPI(title="insloc-hub test Hub", docs_url=None, redoc_url=None, openapi_url=None)
        hub = self

        @app.middleware("http")
        async def record(request: Request, call_next):
            with hub._lock:
                hub.requests.append(
                    RecordedRequest(
                        method=request.method,
                        path=request.url.path,
                        query=request.url.query,
                        host=request.headers.get("host", ""),
                        authorization="authorization" in request.headers,
                    )
                )
            return await call_next(request)

        @app.exception_handler(HubHTTPError)
        async def hub_error(request: Request, err: HubHTTPError) -> Response:
            return _error_response(err, head=request.method == "HEAD")

        # ---- account / misc
        @app.get("/api/whoami-v2")
        async def whoami(request: Request):
            role = hub._role(request)
            if role is None:
                raise HubHTTPError(401, "Invalid credentials in Authorization header")
            return {
                "type": "user",
                "id": "0" * 24,
                "name": USER,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            }

        @app.get("/api/agent-harnesses")
        async def agent_harnesses():
            return {"standardEnvVars": [], "harnesses": {}}

        @app.post("/api/validate-yaml")
        async def validate_yaml():
            return {"errors": [], "warnings": []}

        # ---- repos
        @app.post("/api/repos/create")
        async def create_repo(request: Request):
            role = hub._role(request)
            if role is None:
                raise HubHTTPError(401, "You must be authenticated to create a repo")
            if role != "write":
                raise HubHTTPError(403, "You don't have the rights to create a repo (read-only token)")
            body = await request.json()
            repo_type = body.get("type") or "model"
            name, owner = body.get("name"), body.get("organization") or USER
            if (
                repo_type not in _URL_PREFIX
                or not name
                or not _NAME_RE.fullmatch(name)
                or not _NAME_RE.fullmatch(owner)
            ):
                raise HubHTTPError(400, f"Invalid repo name {owner}/{name}")
            repo_id = f"{owner}/{name}"
            private = body.get("private")
            if private is None:
                private = body.get("visibility") == "private"
            with hub._lock:
                if (repo_type, repo_id) in hub.repos:
                    existing = hub.repos[(repo_type, repo_id)]
                    # The real Hub answers 409 with the url; create_repo(exist_ok=True) reads it.
                    raise HubHTTPError(
                        409, "You already created this model repo", body={"url": hub._repo_url(existing)}
                    )
                repo = Repo(repo_type=repo_type, repo_id=repo_id, private=bool(private), created_at=_now())
                gitattributes = hub._store_blob(_GITATTRIBUTES)
                commit = hub._new_commit(repo, None, {".gitattributes": gitattributes}, "initial commit", "")
                repo.branches["main"] = commit.oid
                hub.repos[(repo_type, repo_id)] = repo
                hub._persist(repo)
            return {"url": hub._repo_url(repo), "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

        @app.delete("/api/repos/delete")
        async def delete_repo(request: Request):
            body = await request.json()
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            with hub._lock:
                hub._repo(request, f"{repo_type}s", repo_id, write=True)
                del hub.repos[(repo_type, repo_id)]
            return {}

        @app.get("/api/{kind}/{owner}/{name}")
        async def repo_info(request: Request, kind: str, owner: str, name: str):
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                return hub._info(
                    repo, repo.branches["main"], request.query_params.get("blobs") in ("1", "true", "True")
                )

        @app.get("/api/{kind}/{owner}/{name}/revision/{revision:path}")
        async def repo_info_at(request: Request, kind: str, owner: str, name: str, revision: str):
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                oid = hub._resolve(repo, revision)
                return hub._info(repo, oid, request.query_params.get("blobs") in ("1", "true", "True"))

        @app.get("/api/{kind}/{owner}/{name}/tree/{rest:path}")
        async def tree(request: Request, kind: str, owner: str, name: str, rest: str):
            revision, path = _split_revision(request, "/tree/")
            recursive = request.query_params.get("recursive", "false").lower() in ("1", "true")
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                commit = repo.commits[hub._resolve(repo, revision)]
                prefix = f"{path.strip('/')}/" if path.strip("/") else ""
                if prefix and not any(p.startswith(prefix) for p in commit.files):
                    raise HubHTTPError(404, f"{path} does not exist on {revision}", "EntryNotFound")
                files, folders = [], set()
                for p, oid in sorted(commit.files.items()):
                    if not p.startswith(prefix):
                        continue
                    parts = p[len(prefix) :].split("/")
                    if len(parts) == 1 or recursive:
                        files.append(hub._tree_entry(p, oid))
                    depth = len(parts) if recursive else min(len(parts), 2)
                    folders.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
                dirs = [
                    {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(folders)
                ]
                return dirs + files

        @app.post("/api/{kind}/{owner}/{name}/paths-info/{revision:path}")
        async def paths_info(request: Request, kind: str, owner: str, name: str, revision: str):
            form = await request.form()
            paths = form.getlist("paths")
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                commit = repo.commits[hub._resolve(repo, revision)]
                return [hub._tree_entry(p, commit.files[p]) for p in paths if p in commit.files]

        @app.get("/api/{kind}/{owner}/{name}/refs")
        async def refs(request: Request, kind: str, owner: str, name: str):
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                return {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                        for b, o in sorted(repo.branches.items())
                    ],
                    "tags": [
                        {"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in sorted(repo.tags.items())
                    ],
                    "converts": [],
                    "pullRequests": [
                        {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": pr["oid"]}
                        for n, pr in sorted(repo.prs.items())
                    ],
                }

        @app.get("/api/{kind}/{owner}/{name}/commits/{revision:path}")
        async def commits(request: Request, kind: str, owner: str, name: str, revision: str):
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                oid: str | None = hub._resolve(repo, revision)
                out = []
                while oid:
                    c = repo.commits[oid]
                    out.append(
                        {
                            "id": c.oid,
                            "title": c.title,
                            "message": c.description,
                            "authors": [{"user": USER}],
                            "date": c.date,
                        }
                    )
                    oid = c.parents[0] if c.parents else None
                return out

        @app.post("/api/{kind}/{owner}/{name}/branch/{branch:path}")
        async def create_branch(request: Request, kind: str, owner: str, name: str, branch: str):
            body = await _json_or_empty(request)
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}", write=True)
                if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or ".." in branch:
                    raise HubHTTPError(400, f"Invalid reference for a branch: {branch}")
                if branch in repo.branches:
                    raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
                start = body.get("startingPoint") or "main"
                repo.branches[branch] = hub._resolve(repo, start)
                hub._persist(repo)
            return {}

        @app.delete("/api/{kind}/{owner}/{name}/branch/{branch:path}")
        async def delete_branch(request: Request, kind: str, owner: str, name: str, branch: str):
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}", write=True)
                if branch not in repo.branches or branch == "main":
                    raise HubHTTPError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
                del repo.branches[branch]
                hub._persist(repo)
            return {}

        @app.post("/api/{kind}/{owner}/{name}/tag/{revision:path}")
        async def create_tag(request: Request, kind: str, owner: str, name: str, revision: str):
            body = await _json_or_empty(request)
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}", write=True)
                tag = body.get("tag")
                if not tag or not re.fullmatch(r"[A-Za-z0-9._/-]+", tag):
                    raise HubHTTPError(400, f"Invalid tag {tag!r}")
                if tag in repo.tags:
                    raise HubHTTPError(409, f"Tag {tag} already exists")
                repo.tags[tag] = hub._resolve(repo, revision)
                hub._persist(repo)
            return {}

        @app.post("/api/{kind}/{owner}/{name}/discussions")
        async def create_discussion(request: Request, kind: str, owner: str, name: str):
            body = await _json_or_empty(request)
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}", write=True)
                if not body.get("pullRequest"):
                    raise HubHTTPError(400, "This test Hub only supports pull requests, not discussions")
                num = max(repo.prs, default=0) + 1
                repo.prs[num] = {
                    "title": body.get("title") or f"PR {num}",
                    "oid": repo.branches["main"],
                    "createdAt": _now(),
                }
                hub._persist(repo)
            return {"num": num, "url": f"{hub._repo_url(repo)}/discussions/{num}", "pullRequest": True}

        @app.get("/api/{kind}/{owner}/{name}/discussions/{num}")
        async def discussion(request: Request, kind: str, owner: str, name: str, num: int):
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}")
                if num not in repo.prs:
                    raise HubHTTPError(404, f"Discussion {num} not found")
                pr = repo.prs[num]
                return {
                    "num": num,
                    "title": pr["title"],
                    "status": "draft",
                    "isPullRequest": True,
                    "createdAt": pr["createdAt"],
                    "author": {"name": USER},
                    "repo": {"name": repo.repo_id, "type": repo.repo_type},
                    "events": [],
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                    "diff": "",
                }

        @app.post("/api/{kind}/{owner}/{name}/preupload/{revision:path}")
        async def preupload(request: Request, kind: str, owner: str, name: str, revision: str):
            body = await request.json()
            create_pr = request.query_params.get("create_pr") in ("1", "true")
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}", write=True)
                head = hub._resolve(repo, revision)
                if not create_pr and not _is_writable_ref(repo, revision):
                    raise HubHTTPError(400, f"Invalid rev id: {revision} is not a branch")
                existing = repo.commits[head].files
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
                    for f in body.get("files", [])
                ]
            return {"files": files, "commitOid": head}

        @app.post("/api/{kind}/{owner}/{name}/commit/{revision:path}")
        async def commit(request: Request, kind: str, owner: str, name: str, revision: str):
            raw = await request.body()
            create_pr = request.query_params.get("create_pr") in ("1", "true")
            try:
                items = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise HubHTTPError(400, f"Malformed NDJSON commit payload: {err}") from err
            if not items or items[0].get("key") != "header":
                raise HubHTTPError(400, "The commit payload must start with a header line")
            header = items[0].get("value") or {}
            with hub._lock:
                repo = hub._repo(request, kind, f"{owner}/{name}", write=True)
                head = hub._resolve(repo, revision)
                if not create_pr and not _is_writable_ref(repo, revision):
                    raise HubHTTPError(400, f"Invalid rev id: {revision} is not a branch")
                parent_commit = header.get("parentCommit")
                if parent_commit and parent_commit != head:
                    raise HubHTTPError(412, f"A commit has happened since {parent_commit}: the head is now {head}")
                files = dict(repo.commits[head].files)
                for item in items[1:]:
                    key, value = item.get("key"), item.get("value") or {}
                    path = _check_path(value.get("path", ""), folder=key == "deletedFolder")
                    if key == "file":
                        encoding = value.get("encoding", "base64")
                        content = value.get("content", "")
                        data = base64.b64decode(content) if encoding == "base64" else content.encode()
                        files[path] = hub._store_blob(data)
                    elif key == "lfsFile":
                        blob = hub._sha256_to_blob.get(value.get("oid", ""))
                        if blob is None:
                            raise HubHTTPError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                        files[path] = blob
                    elif key == "deletedFile":
                        if path not in files:
                            raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                        del files[path]
                    elif key == "deletedFolder":
                        prefix = path.rstrip("/") + "/"
                        doomed = [p for p in files if p.startswith(prefix)]
                        if not doomed:
                            raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                        for p in doomed:
                            del files[p]
                    else:
                        raise HubHTTPError(400, f"Unsupported commit operation {key!r}")
                new = hub._new_commit(
                    repo, head, files, header.get("summary") or "commit", header.get("description") or ""
                )
                pr_url = None
                if create_pr:
                    num = max(repo.prs, default=0) + 1
                    repo.prs[num] = {"title": new.title, "oid": new.oid, "createdAt": _now()}
                    pr_url = f"{hub._repo_url(repo)}/discussions/{num}"
                else:
                    _move_ref(repo, revision, new.oid)
                hub._persist(repo)
            return {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{hub._repo_url(repo)}/commit/{new.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }

        # ---- files
        @app.api_route("/{owner}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
        async def resolve_model(request: Request, owner: str, name: str, rest: str):
            return hub._serve_file(request, "models", f"{owner}/{name}")

        @app.api_route("/{kind}/{owner}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
        async def resolve_other(request: Request, kind: str, owner: str, name: str, rest: str):
            return hub._serve_file(request, kind, f"{owner}/{name}")

        @app.api_route("/_cdn/{sha256}", methods=["GET", "HEAD"])
        async def cdn(request: Request, sha256: str):
            with hub._lock:
                blob = hub._sha256_to_blob.get(sha256)
            if blob is None:
                raise HubHTTPError(404, "No such object")
            return _file_response(request, hub._read_blob(blob), {"ETag": f'"{sha256}"'})

        return app

    def _serve_file(self, request: Request, kind: str, repo_id: str) -> Response:
        revision, path = _split_revision(request, "/resolve/")
        with self._lock:
            repo = self._repo(request, kind, repo_id)
            oid = self._resolve(repo, revision)
            commit = repo.commits[oid]
            blob = commit.files.get(path)
            if blob is None:
                raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
            headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
            if self._is_lfs(blob):
                sha256, size = self._blob_sha256(blob), self._blob_size(blob)
                headers.update(
                    {
                        "ETag": f'"{blob}"',
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(size),
                        "Location": f"{self.cdn_endpoint}/_cdn/{sha256}",
                    }
                )
                return Response(status_code=302, headers=headers)
            headers["ETag"] = f'"{blob}"'
            return _file_response(request, self._read_blob(blob), headers)


# ---------------------------------------------------------------------- helpers
def _error_response(err: HubHTTPError, head: bool = False) -> Response:
    headers = {"X-Error-Message": err.message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    if head:
        return Response(status_code=err.status, headers=headers)
    return JSONResponse({"error": err.message, **err.body}, status_code=err.status, headers=headers)


def _file_response(request: Request, content: bytes, headers: dict[str, str]) -> Response:
    headers = {"Content-Type": "application/octet-stream", **headers}
    status, body = 200, content
    range_header = request.headers.get("range", "")
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
    if m:
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else len(content) - 1
        if start >= len(content):
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(content)}"})
        body = content[start : end + 1]
        status = 206
        headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(content)}"
    headers["Content-Length"] = str(len(body))
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return Response(content=body, status_code=status, headers=headers)


def _split_revision(request: Request, marker: str) -> tuple[str, str]:
    """(revision, path) from the raw URL: the revision is one %-encoded segment after ``marker``."""
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    raw = raw_path.decode("latin-1").split("?", 1)[0]
    _, _, tail = raw.partition(marker)
    revision, _, path = tail.partition("/")
    return unquote(revision), unquote(path)


def _check_path(path: str, folder: bool = False) -> str:
    clean = path.rstrip("/") if folder else path
    parts = PurePosixPath(clean).parts
    if not clean or clean.startswith("/") or ".." in parts or (parts and parts[0] == ".git") or "\\" in clean:
        raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
    return clean


def _is_writable_ref(repo: Repo, revision: str) -> bool:
    rev = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
    m = re.fullmatch(r"refs/pr/(\d+)", rev)
    return rev in repo.branches or bool(m and int(m.group(1)) in repo.prs)


def _move_ref(repo: Repo, revision: str, oid: str) -> None:
    rev = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
    m = re.fullmatch(r"refs/pr/(\d+)", rev)
    if m:
        repo.prs[int(m.group(1))]["oid"] = oid
    else:
        repo.branches[rev] = oid


async def _json_or_empty(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise HubHTTPError(400, f"Malformed JSON body: {err}") from err
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def run_hub_server(root: str | Path | None = None, **kwargs: Any) -> Iterator[HubServer]:
    """Context manager: a started :class:`HubServer`, stopped on exit."""
    server = HubServer(root, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
