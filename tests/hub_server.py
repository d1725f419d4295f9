"""A small Hugging Face Hub-compatible HTTP server for offline tests (standard library only).

It binds a loopback address (127.0.0.1 by default) and speaks the subset of the Hub HTTP API that
``huggingface_hub`` 2.x and ``diffusers`` use to push and pull a repository:

=======  ==============================================================  ==============================
method   path                                                            used by
=======  ==============================================================  ==============================
GET      /api/whoami-v2                                                  whoami
POST     /api/repos/create                                               create_repo (409 when exists)
DELETE   /api/repos/delete                                               delete_repo
POST     /api/validate-yaml                                              create_commit with README.md
GET      /api/{type}s/{ns}/{name}[/revision/{rev}]                       model_info / repo_info
GET      /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]                    list_repo_tree (recursive)
POST     /api/{type}s/{ns}/{name}/paths-info/{rev}                       get_paths_info
POST     /api/{type}s/{ns}/{name}/preupload/{rev}                        preupload: always "regular"
POST     /api/{type}s/{ns}/{name}/commit/{branch}                        create_commit (NDJSON)
GET      /api/{type}s/{ns}/{name}/refs                                   list_repo_refs
GET      /api/{type}s/{ns}/{name}/commits/{rev}                          list_repo_commits
POST     /api/{type}s/{ns}/{name}/branch/{branch}                        create_branch
GET/HEAD /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}            hf_hub_download / snapshot
GET      /_hub_server/requests                                           the request log (not logged)
=======  ==============================================================  ==============================

``{type}`` is ``model``, ``dataset`` or ``space``. Every uploaded file is stored as a regular git
blob (the preupload answer is ``uploadMode: "regular"``), so no LFS or Xet transfer is ever
attempted, and no ``X-Xet-*`` header or ``xet-auth`` link is ever sent. Repositories keep a real
history: each commit has a 40-hex id, a parent and a full file snapshot, so any earlier revision
can be listed and downloaded. Files are stored content-addressed by their git blob id under
``root``; repository state is a JSON file per repository, rewritten atomically on each change, so a
server restarted on the same ``root`` serves the same repositories.

Errors carry the ``X-Error-Code`` header the client maps to exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``); a 404 on a file also carries ``X-Repo-Commit``.

Use as a context manager (e.g. in a pytest fixture)::

    with HubServer() as hub:               # temp root, free port on 127.0.0.1
        env = hub.client_env(hf_home)       # HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_DISABLE_XET...
        subprocess.run([...], env=env)
        hub.requests                        # [RecordedRequest(method, path, ...), ...]
        hub.read_files("user/name")         # {path: bytes} at main

or from a shell: ``python tests/hub_server.py --port 0 --root DIR`` prints
``HUB_SERVER_URL=http://127.0.0.1:PORT`` once it listens and serves until killed.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
INITIAL_GITATTRIBUTES = (
    b"# written by tests/hub_server.py when the repository was created\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1(b"blob <size>\\0" + data)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _now() -> str:
    """The current UTC time in the Hub's format, e.g. 2024-01-31T12:00:00.000Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header_safe(text: str) -> str:
    """Text fit for an HTTP header value (ASCII, no line breaks)."""
    return text.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")


def _parse_front_matter(text: str) -> dict[str, Any]:
    """Read ``library_name`` (scalar) and ``tags`` (block or flow list) from a README's YAML header."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return {}
    out: dict[str, Any] = {}
    key = None
    for line in lines[1:end]:
        item = re.match(r"^\s*-\s+(.*)$", line)
        if item and key == "tags":
            out.setdefault("tags", []).append(item.group(1).strip().strip("'\""))
            continue
        pair = re.match(r"^([A-Za-z_][\w-]*):\s*(.*)$", line)
        if not pair:
            continue
        key, value = pair.group(1), pair.group(2).strip()
        if key == "library_name" and value:
            out["library_name"] = value.strip("'\"")
        elif key == "tags" and value.startswith("["):
            out["tags"] = [t.strip().strip("'\"") for t in value.strip("[]").split(",") if t.strip()]
    return out


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra: dict = {}  # more fields for the JSON error body


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str  # URL path, percent-decoded
    query: str
    client: str  # peer address
    host: str  # Host header
    authorized: bool  # an Authorization header was present
    status: int  # status code answered
    handled: bool  # False when no route matched


class _Store:
    """Repositories with commit history; blobs content-addressed on disk, state as JSON per repo."""

    def __init__(self, root: str):
        self.root = root
        self.blob_dir = os.path.join(root, "blobs")
        self.repo_dir = os.path.join(root, "repos")
        os.makedirs(self.blob_dir, exist_ok=True)
        os.makedirs(self.repo_dir, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], dict] = {}
        for dirpath, _, names in os.walk(self.repo_dir):
            for name in names:
                if name.endswith(".json"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        repo = json.load(f)
                    self.repos[(repo["type"], repo["id"])] = repo

    # -- persistence ------------------------------------------------------------------------
    def _repo_file(self, repo: dict) -> str:
        return os.path.join(self.repo_dir, repo["type"], repo["id"] + ".json")

    def _save(self, repo: dict) -> None:
        path = self._repo_file(repo)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(repo, f)
        os.replace(tmp, path)

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = os.path.join(self.blob_dir, oid)
        if not os.path.exists(path):
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return oid

    def blob(self, oid: str) -> bytes:
        with open(os.path.join(self.blob_dir, oid), "rb") as f:
            return f.read()

    def blob_size(self, oid: str) -> int:
        return os.path.getsize(os.path.join(self.blob_dir, oid))

    # -- repositories -----------------------------------------------------------------------
    def get(self, repo_type: str, repo_id: str) -> dict:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool, author: str) -> dict:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = {"type": repo_type, "id": repo_id, "private": private, "created_at": _now(),
                    "refs": {}, "commits": {}, "_id": uuid.uuid4().hex[:24]}
            self.repos[(repo_type, repo_id)] = repo
            sha = self._new_commit(repo, None, {".gitattributes": self.put_blob(INITIAL_GITATTRIBUTES)},
                                   "initial commit", "", author)
            repo["refs"][DEFAULT_BRANCH] = sha
            self._save(repo)
            return repo

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            repo = self.get(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]
            os.remove(self._repo_file(repo))

    def resolve(self, repo: dict, rev: str) -> str:
        """Branch name, full sha or unique sha prefix (>= 7 chars) -> full commit sha."""
        if rev in repo["refs"]:
            return repo["refs"][rev]
        if rev in repo["commits"]:
            return rev
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            hits = [sha for sha in repo["commits"] if sha.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(self, repo, parent, files, title, message, author) -> str:
        date = _now()
        record = {"parents": [parent] if parent else [], "title": title, "message": message,
                  "author": author, "date": date, "files": dict(sorted(files.items()))}
        sha = hashlib.sha1(json.dumps([record, len(repo["commits"]), repo["id"]]).encode()).hexdigest()
        repo["commits"][sha] = {"id": sha, **record}
        return sha

    def commit(self, repo: dict, branch: str, ops: list[dict], title: str, message: str,
               parent_commit: str | None, author: str) -> str:
        """Apply file/deletedFile/deletedFolder operations on top of ``branch`` as one new commit."""
        with self.lock:
            if branch not in repo["refs"]:
                if _SHA_RE.fullmatch(branch):
                    raise HubError(400, "Invalid rev id: commits can only be made on a branch")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo["refs"][branch]
            if parent_commit and not head.startswith(parent_commit):
                raise HubError(412, f"A commit has happened since. Parent {parent_commit} is not head {head}")
            files = dict(repo["commits"][head]["files"])
            for op in ops:
                kind, path = op["key"], op["path"]
                if kind == "file":
                    files[path] = self.put_blob(op["data"])
                elif kind == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            sha = self._new_commit(repo, head, files, title, message, author)
            repo["refs"][branch] = sha
            self._save(repo)
            return sha

    def create_branch(self, repo: dict, branch: str, start: str | None) -> None:
        with self.lock:
            if branch in repo["refs"]:
                raise HubError(409, f"Reference {branch} already exists")
            repo["refs"][branch] = self.resolve(repo, start or DEFAULT_BRANCH)
            self._save(repo)

    def history(self, repo: dict, sha: str) -> list[dict]:
        """First-parent history from ``sha``, newest first."""
        out = []
        while sha:
            commit = repo["commits"][sha]
            out.append(commit)
            sha = commit["parents"][0] if commit["parents"] else None
        return out

    def last_commit_touching(self, repo: dict, sha: str, path: str) -> dict:
        """The newest commit (from ``sha`` back) that changed ``path`` (a file, or a folder prefix)."""
        def state(commit):
            if path in commit["files"]:
                return commit["files"][path]
            return tuple(sorted((p, o) for p, o in commit["files"].items() if p.startswith(path + "/")))

        history = self.history(repo, sha)
        for commit, older in zip(history, history[1:] + [None]):
            if older is None or state(commit) != state(older):
                return commit
        return history[-1]


def _tree_oid(entries: list[tuple[str, str]]) -> str:
    return hashlib.sha1(json.dumps(sorted(entries)).encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ddpm-from-scratch-test-hub/1.0"
    hub: HubServer  # set on the subclass made by HubServer

    def log_message(self, format, *args):  # noqa: A002 - signature from BaseHTTPRequestHandler
        if self.hub.verbose:
            super().log_message(format, *args)

    # -- plumbing ---------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict | None = None) -> None:
        self.status, self.answered = status, True
        self._record()  # before answering: a client's next request always finds this one logged
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", uuid.uuid4().hex)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _dispatch(self, method: str) -> None:
        self.status, self.handled, self.answered = 500, True, False
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        try:
            self.body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            if segments[:2] == ["_hub_server", "requests"]:
                self._json([dataclasses.asdict(r) for r in self.hub.requests])
                return
            self._route(method, segments)
        except HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = _header_safe(e.message)
            body = {"error": e.message, **e.extra}
            self._json(body, e.status, headers)
        except Exception as e:  # a server bug: answer 500 (if nothing was sent yet) and keep serving
            if not self.answered:
                self._json({"error": f"test hub server error: {type(e).__name__}: {e}"}, 500)
            if self.hub.verbose:
                raise

    def _record(self) -> None:
        split = urlsplit(self.path)
        if split.path != "/_hub_server/requests":
            self.hub._record(RecordedRequest(
                method=self.command, path=unquote(split.path), query=split.query,
                client=self.client_address[0], host=self.headers.get("Host", ""),
                authorized=bool(self.headers.get("Authorization")), status=self.status,
                handled=self.handled))

    # -- auth -------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _require_write(self) -> None:
        token = self._token()
        if token is None or (self.hub.token is not None and token != self.hub.token):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _can_read(self, repo: dict) -> None:
        if repo["private"]:
            token = self._token()
            if token is None or (self.hub.token is not None and token != self.hub.token):
                raise HubError(404, f"Repository {repo['id']} not found", "RepoNotFound")

    # -- routing ----------------------------------------------------------------------------
    def _route(self, method: str, seg: list[str]) -> None:
        store = self.hub.store
        if seg[:1] == ["api"]:
            if seg[1:] == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if seg[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if seg[1:] == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if seg[1:] == ["validate-yaml"] and method == "POST":
                return self._json({"errors": [], "warnings": []})
            if len(seg) >= 4 and seg[1] in REPO_TYPES:
                repo_type, repo_id, rest = REPO_TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
                with store.lock:
                    repo = store.get(repo_type, repo_id)
                    self._can_read(repo)
                    return self._repo_api(method, repo, rest)
        else:
            repo_type = "model"
            if seg[:1] and seg[0] in REPO_TYPES and seg[0] != "models":
                repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
            if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
                with store.lock:
                    repo = store.get(repo_type, f"{seg[0]}/{seg[1]}")
                    self._can_read(repo)
                    return self._resolve(repo, seg[3], "/".join(seg[4:]))
        self.handled = False
        raise HubError(404, f"test hub server: no route for {method} {'/'.join(seg)}")

    def _repo_api(self, method: str, repo: dict, rest: list[str]) -> None:
        action = rest[0] if rest else ""
        if method == "GET" and not rest:
            return self._info(repo, DEFAULT_BRANCH)
        if method == "GET" and action == "revision" and len(rest) >= 2:
            return self._info(repo, "/".join(rest[1:]))
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(repo, rest[1], "/".join(rest[2:]))
        if method == "POST" and action == "paths-info" and len(rest) >= 2:
            return self._paths_info(repo, "/".join(rest[1:]))
        if method == "POST" and action == "preupload" and len(rest) >= 2:
            return self._preupload(repo, "/".join(rest[1:]))
        if method == "POST" and action == "commit" and len(rest) >= 2:
            return self._commit(repo, "/".join(rest[1:]))
        if method == "GET" and action == "refs":
            return self._refs(repo)
        if method == "GET" and action == "commits" and len(rest) >= 2:
            return self._commits(repo, "/".join(rest[1:]))
        if method == "POST" and action == "branch" and len(rest) >= 2:
            self._require_write()
            start = self._json_body().get("startingPoint")
            self.hub.store.create_branch(repo, "/".join(rest[1:]), start)
            return self._json({})
        self.handled = False
        raise HubError(404, f"test hub server: no route for {method} api/.../{'/'.join(rest)}")

    # -- endpoints --------------------------------------------------------------------------
    def _whoami(self) -> None:
        self._require_write()
        user = self.hub.user
        self._json({"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                    "fullname": user, "email": None, "emailVerified": False, "canPay": False,
                    "isPro": False, "orgs": [], "periodEnd": None,
                    "auth": {"type": "access_token",
                             "accessToken": {"displayName": "test-token", "role": "write",
                                             "createdAt": _now()}}})

    def _create_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}; this server knows {sorted(URL_PREFIXES)}")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or (org and not _NAME_RE.fullmatch(org)):
            raise HubError(400, f"Invalid repo name {org}/{name}")
        repo_id = f"{org or self.hub.user}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        try:
            self.hub.store.create(repo_type, repo_id, private, self.hub.user)
        except HubError as e:
            e.extra["url"] = url
            raise
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        self.hub.store.delete(payload.get("type") or "model", repo_id)
        self._json({})

    def _info(self, repo: dict, rev: str) -> None:
        store = self.hub.store
        sha = store.resolve(repo, rev)
        commit = repo["commits"][sha]
        files = commit["files"]
        blobs = "blobs" in self.query and self.query["blobs"][0].lower() in ("1", "true")
        siblings = []
        for path, oid in files.items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=store.blob_size(oid), blobId=oid)
            siblings.append(sibling)
        card = _parse_front_matter(store.blob(files["README.md"]).decode("utf-8", "replace")) \
            if "README.md" in files else {}
        author = repo["id"].split("/")[0]
        info = {"_id": repo["_id"], "id": repo["id"], "author": author, "sha": sha,
                "lastModified": commit["date"], "createdAt": repo["created_at"],
                "private": repo["private"], "disabled": False, "gated": False, "downloads": 0,
                "likes": 0, "tags": card.get("tags", []), "siblings": siblings,
                "usedStorage": sum(store.blob_size(o) for o in files.values())}
        if repo["type"] == "model":
            info["modelId"] = repo["id"]
            if "library_name" in card:
                info["library_name"] = card["library_name"]
        if card:
            info["cardData"] = card
        self._json(info)

    def _entry(self, repo: dict, sha: str, path: str, expand: bool) -> dict:
        store = self.hub.store
        files = repo["commits"][sha]["files"]
        if path in files:
            entry = {"type": "file", "oid": files[path], "size": store.blob_size(files[path]), "path": path}
        else:
            inside = [(p, o) for p, o in files.items() if p.startswith(path + "/")]
            entry = {"type": "directory", "oid": _tree_oid(inside), "size": 0, "path": path}
        if expand:
            last = store.last_commit_touching(repo, sha, path)
            entry["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
        return entry

    def _tree(self, repo: dict, rev: str, path: str) -> None:
        sha = self.hub.store.resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        path = path.strip("/")
        prefix = path + "/" if path else ""
        below = [p for p in files if p.startswith(prefix)]
        if path and not below:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound",
                           {"X-Repo-Commit": sha})
        names: set[str] = set()
        for p in below:
            parts = p[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                names.add(prefix + "/".join(parts[:i]))
        self._json([self._entry(repo, sha, name, expand) for name in sorted(names)])

    def _paths_info(self, repo: dict, rev: str) -> None:
        sha = self.hub.store.resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        form = parse_qs(self.body.decode(), keep_blank_values=True)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = {k: v if isinstance(v, list) else [str(v)] for k, v in self._json_body().items()}
        expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files or any(p.startswith(path + "/") for p in files):
                out.append(self._entry(repo, sha, path, expand))
        self._json(out)

    def _preupload(self, repo: dict, rev: str) -> None:
        self._require_write()
        sha = self.hub.store.resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        payload = self._json_body()
        if not isinstance(payload.get("files"), list):
            raise HubError(400, "preupload expects a JSON body with a 'files' list")
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": files.get(f["path"])} for f in payload["files"]]
        self._json({"files": answer, "commitOid": sha})

    def _commit(self, repo: dict, branch: str) -> None:
        self._require_write()
        if self.query.get("create_pr", ["0"])[0] not in ("0", "", "false"):
            raise HubError(501, "test hub server: create_pr is not supported")
        header, ops = None, []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as e:
                raise HubError(400, f"Malformed NDJSON commit line: {line[:200]!r}") from e
            if key == "header":
                header = value
                continue
            if key not in ("file", "deletedFile", "deletedFolder"):
                raise HubError(400, f"test hub server: unsupported commit operation {key!r} "
                                    "(it answers uploadMode 'regular' for every file)")
            path = value.get("path", "")
            if (not path or path.startswith("/") or ".." in path.split("/")
                    or path.split("/")[0] == ".git"):
                raise HubError(400, f"Invalid path in repo: {path!r}")
            op = {"key": key, "path": path}
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}; expected base64")
                op["data"] = base64.b64decode(value["content"])
            ops.append(op)
        if header is None or not header.get("summary"):
            raise HubError(400, "A commit needs a header line with a non-empty summary")
        sha = self.hub.store.commit(repo, branch, ops, header["summary"], header.get("description", ""),
                                    header.get("parentCommit"), self.hub.user)
        url = f"{self.hub.url}/{URL_PREFIXES[repo['type']]}{repo['id']}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": "",
                    "pullRequestUrl": None})

    def _refs(self, repo: dict) -> None:
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo["refs"].items()]
        self._json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def _commits(self, repo: dict, rev: str) -> None:
        store = self.hub.store
        history = store.history(repo, store.resolve(repo, rev))
        self._json([{"id": c["id"], "title": c["title"], "message": c["message"],
                     "authors": [{"user": c["author"]}], "date": c["date"]} for c in history])

    def _resolve(self, repo: dict, rev: str, path: str) -> None:
        store = self.hub.store
        sha = store.resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        oid = files[path]
        data = store.blob(oid)
        name = path.rsplit("/", 1)[-1]
        ascii_name = _header_safe(name).replace('"', "")
        headers = {"ETag": f'"{oid}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\"",
                   "Cache-Control": "private, max-age=0, must-revalidate"}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, "application/octet-stream", headers)


class HubServer:
    """A Hub-compatible HTTP server on a loopback address, run in a background thread.

    ``root``: folder holding the repositories (a fresh temporary folder, removed on stop, when None).
    ``port``: 0 picks a free port. ``user``: the account name ``whoami`` answers and the namespace
    of repositories created without one. ``token``: when set, writes need exactly this bearer token;
    otherwise any bearer token is accepted (writes without one are refused with 401).
    """

    def __init__(self, root: str | None = None, port: int = 0, host: str = "127.0.0.1",
                 user: str = "user", token: str | None = None, verbose: bool = False):
        if not _is_loopback(host):
            raise ValueError(f"host must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
        self._own_root = root is None
        self.root = tempfile.mkdtemp(prefix="test-hub-") if root is None else os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.host, self.user, self.token, self.verbose = host, user, token, verbose
        self.store = _Store(self.root)
        self._requests: list[RecordedRequest] = []
        self._log_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to put in HF_ENDPOINT, e.g. http://127.0.0.1:8123."""
        return f"http://{self.host}:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> HubServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    # -- inspection -------------------------------------------------------------------------
    def _record(self, request: RecordedRequest) -> None:
        with self._log_lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (a copy), oldest first."""
        with self._log_lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._requests.clear()

    def read_files(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> dict:
        """{path: bytes} of a repository at a revision, read directly from the store."""
        with self.store.lock:
            repo = self.store.get(repo_type, repo_id)
            files = repo["commits"][self.store.resolve(repo, revision)]["files"]
            return {path: self.store.blob(oid) for path, oid in files.items()}

    def commits(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[dict]:
        """The first-parent history of a branch, newest first: dicts with id, title, files, ..."""
        with self.store.lock:
            repo = self.store.get(repo_type, repo_id)
            return self.store.history(repo, self.store.resolve(repo, revision))

    def client_env(self, hf_home: str, token: str | None = "hf_test_token_not_secret",
                   base: dict | None = None) -> dict:
        """An environment for a client subprocess that talks to this server only.

        HF_ENDPOINT / HF_HOME are read when huggingface_hub is imported, hence a subprocess.
        Removes any other HF_* variable and proxy settings; disables Xet, telemetry and offline mode.
        """
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.upper().startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env.update(HF_ENDPOINT=self.url, HF_HOME=hf_home, HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   HF_HUB_DISABLE_IMPLICIT_TOKEN="0", HF_HUB_OFFLINE="0", DO_NOT_TRACK="1",
                   NO_PROXY="127.0.0.1,localhost,::1", no_proxy="127.0.0.1,localhost,::1")
        if token is not None:
            env["HF_TOKEN"] = token
        return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A Hub-compatible HTTP server for offline tests.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--root", default=None, help="folder holding the repositories (default: a temp dir)")
    parser.add_argument("--user", default="user", help="account name whoami answers (default: user)")
    parser.add_argument("--token", default=None, help="require exactly this bearer token for writes")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    server = HubServer(root=args.root, port=args.port, user=args.user, token=args.token, verbose=args.verbose)
    print(f"HUB_SERVER_URL={server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
