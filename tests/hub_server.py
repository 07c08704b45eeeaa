"""A loopback stand-in for the Hugging Face Hub API, for offline tests of pushing and loading.

It answers, on 127.0.0.1 only, the requests `huggingface_hub` makes to create a repository, commit files and download
them:

* `GET /api/whoami-v2`, `POST /api/repos/create`, `POST /api/validate-yaml` (checks the card's YAML block);
* `POST /api/models/{repo}/preupload/{revision}` and `POST /api/models/{repo}/commit/{revision}` (NDJSON);
* `GET /api/models/{repo}[/revision/{revision}]` and `HEAD`/`GET /{repo}/resolve/{revision}/{path}`;
* `GET /api/agent-harnesses`, answered 404 (an optional registry `huggingface_hub` uses for its user agent).

Files live in memory. Every request is recorded; any other request is answered 404 and listed in `unexpected`, so a
test can assert that nothing else was asked.

The preupload answer puts every file in `"regular"` upload mode: the content then travels base64-encoded inside the
commit (what the real Hub does for small text files). The real Hub sends large and binary files through LFS/Xet
storage instead; that transfer is `huggingface_hub`'s own business and is not emulated here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

USER = "hosfl-tester"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


class LoopbackHub:
    """In-memory Hub on `http://127.0.0.1:<free port>`; use as a context manager.

    Attributes:
        repos (`dict[str, dict[str, bytes]]`): files of each repository (`"user/name"`) at the head of `main`.
        commits (`dict[str, list[dict]]`): the commits of each repository (header and paths), in order.
        requests (`list[tuple[str, str]]`): `(method, path)` of every request.
        unexpected (`list[tuple[str, str]]`): requests this stand-in does not implement.
    """

    def __init__(self, user: str = USER):
        self.user = user
        self.repos: dict[str, dict[str, bytes]] = {}
        self.heads: dict[str, str] = {}
        self.commits: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.timeout = 5
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` (an empty dict if it does not exist)."""
        return dict(self.repos.get(repo_id, {}))


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ---------------------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _not_found(self, message: str, code: str = "RepoNotFound", head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(404, body, {"Content-Type": "application/json", "X-Error-Code": code}, head=head)

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        hub = self.hub
        with hub._lock:
            hub.requests.append((method, path))
        body = self._body() if method == "POST" else b""
        for pattern, verb, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if match and verb == method:
                with hub._lock:
                    return handler(self, body, **match.groupdict())
        with hub._lock:
            hub.unexpected.append((method, path))
        self._not_found(f"{method} {path} is not implemented by the loopback hub", code="NotImplemented")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    # ---------------------------------------------------------------------------------------------- endpoints
    def agent_harnesses(self, body: bytes) -> None:
        # huggingface_hub fetches a registry of AI agent harnesses to tag its user agent; "none" is a valid answer
        # (and keeps it from caching one under HF_HOME).
        self._not_found("no agent harness registry on the loopback hub", code="EntryNotFound")

    def whoami(self, body: bytes) -> None:
        self._json(200, {"type": "user", "name": self.hub.user, "fullname": "HO-SFL tester", "orgs": []})

    def create_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self.hub.repos[repo_id] = {}
        self.hub.commits[repo_id] = []
        self.hub.heads[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, body: bytes, repo: str, revision: str) -> None:
        if repo not in self.hub.repos:
            return self._not_found(f"Repository {repo} not found")
        files = json.loads(body)["files"]
        self._json(
            200,
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                ]
            },
        )

    def commit(self, body: bytes, repo: str, revision: str) -> None:
        if repo not in self.hub.repos:
            return self._not_found(f"Repository {repo} not found")
        if revision != "main":
            return self._json(400, {"error": f"the loopback hub only has a main branch, not {revision}"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = self.hub.repos[repo]
        paths = []
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key != "header":
                return self._json(400, {"error": f"commit operation {key!r} is not supported by the loopback hub"})
        oid = hashlib.sha1(body).hexdigest()
        self.hub.heads[repo] = oid
        self.hub.commits[repo].append({"summary": header.get("summary"), "paths": paths, "oid": oid})
        url = f"http://{self.headers['Host']}/{repo}/commit/{oid}"
        self._json(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

    def model_info(self, body: bytes, repo: str, revision: str | None = None) -> None:
        if repo not in self.hub.repos:
            return self._not_found(f"Repository {repo} not found")
        siblings = [{"rfilename": p} for p in sorted(self.hub.repos[repo])]
        self._json(200, {"id": repo, "modelId": repo, "sha": self.hub.heads[repo], "siblings": siblings, "tags": []})

    def resolve(self, body: bytes, repo: str, revision: str, path: str) -> None:
        head = self.command == "HEAD"
        if repo not in self.hub.repos:
            return self._not_found(f"Repository {repo} not found", head=head)
        content = self.hub.repos[repo].get(path)
        if content is None:
            return self._not_found(f"Entry {path} not found", code="EntryNotFound", head=head)
        headers = {
            "X-Repo-Commit": self.hub.heads[repo],
            "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, content, headers, head=head)


_ROUTES = [
    (r"/api/agent-harnesses", "GET", _Handler.agent_harnesses),
    (r"/api/whoami-v2", "GET", _Handler.whoami),
    (r"/api/repos/create", "POST", _Handler.create_repo),
    (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
    (rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", "POST", _Handler.preupload),
    (rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", "POST", _Handler.commit),
    (rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?", "GET", _Handler.model_info),
    (rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "HEAD", _Handler.resolve),
    (rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "GET", _Handler.resolve),
]
