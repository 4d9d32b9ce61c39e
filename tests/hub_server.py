"""The Hub routes insloc-hub calls, served on 127.0.0.1 for tests (FastAPI + uvicorn, in memory).

Only what ``push_folder_to_hub`` and ``resolve_model_dir`` make huggingface_hub 2.x send: create a
repo or branch, preupload (every file ``"regular"``, so neither LFS nor Xet; a known blob sha1 is
skipped), commit (NDJSON; ``create_pr=1`` opens ``refs/pr/N``), revision info, tree listing, and
``HEAD/GET .../resolve/{rev}/{path}`` with ``ETag`` and ``X-Repo-Commit``. Errors carry the
``X-Error-Code`` huggingface_hub maps to its exceptions. ``tokens`` maps a token to ``"read"`` or
``"write"``: an unknown token gets 401, writing without a token 401, with a read token 403.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

__all__ = ["HubServer", "git_blob_sha1"]


def git_blob_sha1(content: bytes) -> str:
    """Git's blob id of ``content`` (what the Hub calls the ``oid`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubHTTPError(Exception):
    """Raised inside handlers; turned into a Hub-style error response."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # "main", other branches, "refs/pr/N" -> commit oid


class HubServer:
    """The routes above on 127.0.0.1 and a random free port, served by uvicorn from a background thread."""

    def __init__(self, *, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens if tokens is not None else {"test-token": "write"})
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD /path" of every request, for "no network call happened"
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.app = self._build_app()

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:53127`` (what HF_ENDPOINT should be)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test Hub server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]  # port 0: the system chose a free one
        return self

    def stop(self) -> None:
        """Stop serving: afterwards every connection to :attr:`endpoint` is refused."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def branch_head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].refs[branch]

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[self._resolve(repo, revision)])

    def _resolve(self, repo: Repo, revision: str) -> str:
        """Revision (branch, refs/heads/..., refs/pr/N or commit sha) -> commit oid."""
        rev = revision.removeprefix("refs/heads/")
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo: Repo, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(f"{next(self._counter)}-{time.time()}".encode()).hexdigest()
        repo.commits[oid] = files
        return oid

    def _role(self, request: Request, write: bool) -> str | None:
        """The token's role (None without a token); 401 for an unknown token, or no token to write."""
        header = request.headers.get("authorization", "")
        role = self.tokens.get(header.removeprefix("Bearer ").strip()) if header else None
        if header and role is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        if write and role is None:
            raise HubHTTPError(401, "You must be authenticated to write to a repo")
        return role

    def _repo(self, request: Request, repo_id: str, *, write: bool = False) -> Repo:
        role = self._role(request, write)
        if repo_id not in self.repos:
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if write and role != "write":
            raise HubHTTPError(403, "You don't have the rights to write to this repo (read-only token)")
        return self.repos[repo_id]

    def _build_app(self) -> FastAPI:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        hub = self

        @app.middleware("http")
        async def record(request: Request, call_next):
            hub.requests.append(f"{request.method} {request.url.path}")
            return await call_next(request)

        @app.exception_handler(HubHTTPError)
        async def hub_error(request: Request, err: HubHTTPError) -> Response:
            headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
            headers.update({k.replace("_", "-"): v for k, v in err.extra.items() if k != "url"})
            if request.method == "HEAD":
                return Response(status_code=err.status, headers=headers)
            body = {"error": err.message, **({"url": err.extra["url"]} if "url" in err.extra else {})}
            return JSONResponse(body, status_code=err.status, headers=headers)

        @app.post("/api/validate-yaml")
        async def validate_yaml():
            return {"errors": [], "warnings": []}

        @app.post("/api/repos/create")
        async def create_repo(request: Request):
            body = await request.json()
            repo_id = f"{body.get('organization') or 'test-user'}/{body['name']}"
            with hub._lock:
                if hub._role(request, write=True) != "write":
                    raise HubHTTPError(403, "You don't have the rights to create this repo (read-only token)")
                if repo_id in hub.repos:
                    raise HubHTTPError(409, "You already created this model repo", url=f"{hub.endpoint}/{repo_id}")
                hub.repos[repo_id] = repo = Repo()
                repo.refs["main"] = hub._commit(repo, {".gitattributes": b"*.safetensors filter=lfs\n"})
            return {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id}

        @app.post("/api/models/{owner}/{name}/branch/{branch:path}")
        async def create_branch(request: Request, owner: str, name: str, branch: str):
            with hub._lock:
                repo = hub._repo(request, f"{owner}/{name}", write=True)
                if branch in repo.refs:
                    raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
                repo.refs[branch] = repo.refs["main"]
            return {}

        @app.post("/api/models/{owner}/{name}/preupload/{revision:path}")
        async def preupload(request: Request, owner: str, name: str, revision: str):
            body = await request.json()
            with hub._lock:
                repo = hub._repo(request, f"{owner}/{name}", write=True)
                existing = repo.commits[hub._resolve(repo, revision)]
                oids = {path: git_blob_sha1(content) for path, content in existing.items()}
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oids.get(f["path"])}
                     for f in body.get("files", [])]
            return {"files": files}

        @app.post("/api/models/{owner}/{name}/commit/{revision:path}")
        async def commit(request: Request, owner: str, name: str, revision: str):
            items = [json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()]
            create_pr = request.query_params.get("create_pr") in ("1", "true")
            with hub._lock:
                repo = hub._repo(request, f"{owner}/{name}", write=True)
                files = dict(repo.commits[hub._resolve(repo, revision)])
                for item in items[1:]:  # after the header: {"key": "file", "value": {"path", "content"}} each
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                oid = hub._commit(repo, files)
                ref = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo.refs) + 1}" if create_pr else revision
                repo.refs[ref.removeprefix("refs/heads/")] = oid
            pr_url = f"{hub.endpoint}/{owner}/{name}/discussions/{ref.split('/')[-1]}" if create_pr else None
            return {"success": True, "commitOid": oid, "commitUrl": f"{hub.endpoint}/{owner}/{name}/commit/{oid}",
                    "pullRequestUrl": pr_url}

        @app.get("/api/models/{owner}/{name}/revision/{revision:path}")
        async def repo_info(request: Request, owner: str, name: str, revision: str):
            with hub._lock:
                repo = hub._repo(request, f"{owner}/{name}")
                oid = hub._resolve(repo, revision)
                return {"id": f"{owner}/{name}", "sha": oid, "siblings": [{"rfilename": p} for p in repo.commits[oid]]}

        @app.get("/api/models/{owner}/{name}/tree/{rest:path}")
        async def tree(request: Request, owner: str, name: str, rest: str):
            revision, _ = _split_revision(request, "/tree/")
            with hub._lock:
                repo = hub._repo(request, f"{owner}/{name}")
                files = repo.commits[hub._resolve(repo, revision)]
                return [{"type": "file", "oid": git_blob_sha1(c), "size": len(c), "path": p}
                        for p, c in sorted(files.items())]

        @app.api_route("/{owner}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
        async def resolve(request: Request, owner: str, name: str, rest: str):
            revision, path = _split_revision(request, "/resolve/")
            with hub._lock:
                repo = hub._repo(request, f"{owner}/{name}")
                oid = hub._resolve(repo, revision)
                content = repo.commits[oid].get(path)
            if content is None:
                raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", X_Repo_Commit=oid)
            headers = {"ETag": f'"{git_blob_sha1(content)}"', "X-Repo-Commit": oid, "Content-Length": str(len(content))}
            body = b"" if request.method == "HEAD" else content
            return Response(body, headers=headers, media_type="application/octet-stream")

        return app


def _split_revision(request: Request, marker: str) -> tuple[str, str]:
    """(revision, path) from the raw URL: the revision is one %-encoded segment after ``marker``."""
    raw = request.scope["raw_path"].decode("latin-1").split("?", 1)[0]
    revision, _, path = raw.partition(marker)[2].partition("/")
    return unquote(revision), unquote(path)
