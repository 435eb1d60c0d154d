"""A Hub-compatible HTTP server for tests: the endpoints `huggingface_hub` uses to create repos, commit files,
read repo info and download files, kept in memory. Start it with `HubServer().start()` and point `HF_ENDPOINT`
at `server.url`; the real `huggingface_hub` client then talks to it over real HTTP.

Fault injection: `server.drop_commits = n` closes the connection on the next n commit requests without
answering, as a network failure halfway through a push would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

USER = "me"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.log: list[str] = []
        self.commit(
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "main", "initial commit"
        )

    def commit(self, files: dict[str, bytes], branch: str, message: str) -> str:
        digest = hashlib.sha1(message.encode() + str(len(self.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        self.log.append(sha)
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubServer:
    """In-memory Hub. `repos` maps "org/name" to [`Repo`]; `requests` records (method, path, headers) of each call."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.drop_commits = 0
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        # ------------------------------------------------------------------ helpers
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header(
                "Content-Length",
                str(len(body)) if "Content-Length" not in (headers or {}) else headers["Content-Length"],
            )
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict | None = None):
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str, head: bool = False):
            body = json.dumps({"error": message}).encode()
            self._send(
                status,
                body,
                {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
                head,
            )

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            return auth.startswith("Bearer ") and len(auth) > len("Bearer ")

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                return None
            return repo

        # ------------------------------------------------------------------ routes
        def do_HEAD(self):
            self._get(head=True)

        def do_GET(self):
            self._get(head=False)

        def _get(self, head: bool):
            path = urlparse(self.path).path
            hub.requests.append((self.command, path, dict(self.headers)))
            if path == "/api/whoami-v2":
                if not self._authorized():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return self._json(200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})  # fmt: skip
            m = re.fullmatch(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", path)
            if m:
                return self._info(m["repo"], m["rev"] or "main")
            m = re.fullmatch(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
            if m:
                return self._tree(m["repo"], m["rev"], m["sub"] or "")
            m = re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if m:
                return self._resolve(m["repo"], m["rev"], unquote(m["file"]), head)
            self._error(404, "NotFound", f"no route {path}", head)

        def _snapshot(self, repo_id: str, rev: str, head: bool = False) -> tuple[Repo, str] | None:
            """The repo and the commit a revision names, or None after answering 404."""
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return None
            return repo, sha

        def _info(self, repo_id: str, rev: str):
            if (found := self._snapshot(repo_id, rev)) is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "tags": [],
                             "siblings": [{"rfilename": p} for p in sorted(files)]})  # fmt: skip

        def _tree(self, repo_id: str, rev: str, sub: str):
            if (found := self._snapshot(repo_id, rev)) is None:
                return
            repo, sha = found
            prefix = sub.rstrip("/") + "/" if sub else ""
            entries = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(repo.commits[sha].items())
                if p.startswith(prefix)
            ]
            self._json(200, entries)

        def _resolve(self, repo_id: str, rev: str, file: str, head: bool):
            if (found := self._snapshot(repo_id, rev, head)) is None:
                return
            repo, sha = found
            data = repo.commits[sha].get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist at {rev}", head)
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            self._send(
                200, data, {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"}, head
            )

        def do_POST(self):
            path = urlparse(self.path).path
            body = self._body()
            hub.requests.append((self.command, path, dict(self.headers)))
            if path == "/api/validate-yaml":  # public on the Hub: no token needed
                return self._json(200, {"errors": [], "warnings": []})
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            m = re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path)
            if m:
                if self._repo(m["repo"]) is None:
                    return
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})  # fmt: skip
            m = re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path)
            if m:
                return self._commit(m["repo"], unquote(m["rev"]), body)
            m = re.fullmatch(rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", path)
            if m:
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                branch = unquote(m["branch"])
                if branch in repo.branches:
                    return self._error(409, "Conflict", f"Branch {branch} already exists")
                repo.branches[branch] = repo.branches["main"]
                return self._json(200, {})
            self._error(404, "NotFound", f"no route {path}")

        def _create(self, payload: dict):
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = Repo(
                    private=payload.get("visibility") == "private" or bool(payload.get("private"))
                )
            self._json(200, {"url": url, "name": repo_id})

        def _commit(self, repo_id: str, rev: str, body: bytes):
            with hub.lock:
                if hub.drop_commits > 0:
                    hub.drop_commits -= 1
                    self.close_connection = True
                    self.connection.shutdown(2)  # the network fails: no answer at all
                    return
            repo = self._repo(repo_id)
            if repo is None:
                return
            with hub.lock:
                base = repo.resolve(rev)
                if base is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = dict(repo.commits[base])
                summary = "commit"
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "header":
                        summary = value.get("summary") or summary
                    elif item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return self._error(400, "BadRequest", f"unsupported commit operation {item['key']}")
                sha = repo.commit(files, rev, summary)
            self._json(
                200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            )

    return Handler
