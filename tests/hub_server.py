"""A Hub-compatible HTTP server for tests: the endpoints `huggingface_hub` uses to create repos, upload and commit
files, read repo info and download files, kept in memory. Start it with `HubServer(tokens={...}).start()` and give
client processes `server.client_env()`; the real `huggingface_hub` client then talks to it over real HTTP.

Uploads take the path a real checkpoint takes. The preupload endpoint answers `lfs` for what the Hub stores in LFS
(a `.gitattributes` LFS pattern such as `*.safetensors`, a NUL byte in the first 512 bytes as in a PNG, or more than
10 MiB) and `regular` for the rest (JSON, README). LFS files go through the LFS batch API
(`POST /{repo}.git/info/lfs/objects/batch`) to a separate storage server, as S3 is on the Hub: one signed PUT per
object, or, above `multipart_threshold`, one signed PUT per `chunk_size` part and a completion POST; the storage
checks the size and sha256 of what it receives. A commit refuses an `lfsFile` entry whose object was not uploaded
to the repo, and a base64 `file` entry that should have gone LFS, as the Hub does. Downloads of LFS files redirect
to the storage (`X-Linked-Etag`, `X-Linked-Size`), so they reload as they do from the Hub's CDN.

Only the tokens given to the server are accepted: any other one is answered 401 "Invalid credentials in
Authorization header" on every endpoint, as the Hub does.

This server speaks LFS, not Xet: `huggingface_hub` uploads through Xet whenever `hf_xet` is installed, so clients
need `HF_HUB_DISABLE_XET=1` (in `client_env()`); a Xet token request is answered 501 saying so.

Fault injection:
- `server.drop_commits = n` closes the connection on the next n commit requests without answering, as a network
  failure halfway through a push would.
- `server.fail_upload(oid, part=..., status=...)` refuses the next PUT of one LFS object (or of one of its parts)
  after its body arrived, as the storage does when a signed URL expired during a slow upload (403).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import math
import os
import re
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

USER = "me"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
MiB = 1024 * 1024
LFS_SIZE = 10 * MiB  # above this a file goes LFS whatever it holds, as on the Hub
GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in ("*.bin", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.zip")
)
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_oid(data: bytes) -> str:
    """The git blob id of `data`, what the Hub reports as a file's `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The LFS pointer git stores in place of `data`."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        hashlib.sha256(data).hexdigest().encode(),
        len(data),
    )


def lfs_patterns(gitattributes: bytes) -> list[str]:
    lines = (line.split() for line in gitattributes.decode(errors="replace").splitlines())
    return [words[0] for words in lines if len(words) > 1 and "filter=lfs" in words[1:]]


def goes_lfs(path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
    """The Hub's rule: an LFS pattern of `.gitattributes`, binary content (a NUL byte in the first 512 bytes) or
    more than 10 MiB. Empty files stay regular (the client commits them as regular whatever the answer)."""
    if size == 0:
        return False
    name = path.rsplit("/", 1)[-1]
    matched = any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)
    return matched or b"\0" in sample[:512] or size > LFS_SIZE


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, frozenset[str]] = {}  # per commit: the paths stored as LFS pointers
        self.objects: set[str] = set()  # sha256 of the LFS objects uploaded to this repo
        self.branches: dict[str, str] = {}
        self.log: list[str] = []
        self.commit({".gitattributes": GITATTRIBUTES}, "main", "initial commit")

    def commit(self, files: dict[str, bytes], branch: str, message: str, lfs: Iterable[str] = ()) -> str:
        digest = hashlib.sha1(message.encode() + str(len(self.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = files
        self.lfs[sha] = frozenset(lfs)
        self.branches[branch] = sha
        self.log.append(sha)
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubServer:
    """In-memory Hub with its LFS storage.

    `repos` maps "org/name" to [`Repo`]; `requests` records (method, path, headers) of each call to the Hub and
    `storage_requests` those to the storage; `objects` maps sha256 to the content of each complete LFS object;
    `uploads` records each PUT the storage answered as (repo, sha256, part number or None, status).
    """

    def __init__(self, tokens: Iterable[str]):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.storage_requests: list[tuple[str, str, dict]] = []
        self.objects: dict[str, bytes] = {}
        self.uploads: list[tuple[str, str, int | None, int]] = []
        self.drop_commits = 0
        self.multipart_threshold = 10 * MiB  # objects above this are uploaded in parts
        self.chunk_size = 5 * MiB  # S3's smallest part
        self.lock = threading.Lock()
        self._pending: dict[tuple[str, str], int] = {}  # (repo, sha256) announced to the batch API -> size
        self._parts: dict[tuple[str, str], dict[int, bytes]] = {}  # multipart uploads in progress
        self._failures: dict[tuple[str, int | None], list[int]] = {}
        self._secret = os.urandom(16)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._storage = ThreadingHTTPServer(("127.0.0.1", 0), _make_storage_handler(self))
        for httpd in (self._httpd, self._storage):
            httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self._storage.server_address[1]}"

    def start(self) -> HubServer:
        for httpd in (self._httpd, self._storage):
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for httpd in (self._httpd, self._storage):
            httpd.shutdown()
            httpd.server_close()

    def client_env(self) -> dict[str, str]:
        """The environment a client process needs to talk to this server (its token apart)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content at `revision`, LFS files resolved to their content."""
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def lfs_files(self, repo_id: str, revision: str = "main") -> set[str]:
        """The paths that are LFS pointers at `revision`: each arrived as an `lfsFile` of an uploaded object."""
        repo = self.repos[repo_id]
        return set(repo.lfs[repo.resolve(revision)])

    def publish(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """Create `repo_id` holding `files` in one commit on main, LFS where a push would put them."""
        repo = self.repos[repo_id] = Repo(private=private)
        patterns = lfs_patterns(GITATTRIBUTES)
        lfs = {p for p, data in files.items() if goes_lfs(p, len(data), data, patterns)}
        for path in lfs:
            oid = hashlib.sha256(files[path]).hexdigest()
            self.objects[oid] = files[path]
            repo.objects.add(oid)
        repo.commit({**repo.commits[repo.branches["main"]], **files}, "main", "upload", lfs)
        return repo

    def fail_upload(self, oid: str, part: int | None = None, status: int = 403, times: int = 1) -> None:
        """Refuse the next `times` PUTs of LFS object `oid` (of its part `part`, numbered from 1, when it goes
        multipart) with `status` once their body arrived. 403 is what the storage answers when the signed URL
        expired during a slow upload; the client does not retry it. 5xx it retries, with backoff."""
        self._failures[(oid, part)] = [status] * times

    def _sign(self, method: str, path: str) -> str:
        """A signed storage URL for one method on one path, as the Hub hands out for S3."""
        signature = hmac.new(self._secret, f"{method} {path}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{self.storage_url}{path}?X-Amz-Signature={signature}"

    def _signature_ok(self, method: str, raw_path: str) -> bool:
        url = urlparse(raw_path)
        given = parse_qs(url.query).get("X-Amz-Signature", [""])[0]
        expected = urlparse(self._sign(method, url.path)).query.split("=", 1)[1]
        return hmac.compare_digest(given, expected)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

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

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return bytes(out)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


def _make_handler(hub: HubServer):
    class Handler(_Handler):
        # ------------------------------------------------------------------ helpers
        def _error(self, status: int, code: str, message: str, head: bool = False):
            body = json.dumps({"error": message}).encode()
            self._send(
                status,
                body,
                {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
                head,
            )

        def _token(self) -> str | bool | None:
            """The request's token if the server knows it, None when none was sent, False for any other."""
            auth = self.headers.get("Authorization")
            if not auth:
                return None
            token = auth.removeprefix("Bearer ").strip()
            return token if token in hub.tokens else False

        def _authorized(self) -> bool:
            return bool(self._token())

        def _refuse_unknown_token(self, head: bool = False) -> bool:
            """Answer 401 to a token the server does not know, on any endpoint, as the Hub does."""
            if self._token() is False:
                self._error(401, "Unauthorized", INVALID_TOKEN, head)
                return True
            return False

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
            if self._refuse_unknown_token(head):
                return
            if path == "/api/whoami-v2":
                if not self._authorized():
                    return self._error(401, "Unauthorized", INVALID_TOKEN)
                return self._json(200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})  # fmt: skip
            if re.fullmatch(rf"/api/\w+s/{REPO}/xet-(read|write)-token/.*", path):
                return self._error(
                    501, "NotImplemented", "this test Hub speaks LFS, not Xet: set HF_HUB_DISABLE_XET=1"
                )
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

        @staticmethod
        def _entry(repo: Repo, sha: str, path: str) -> dict:
            """A file's metadata as the Hub lists it: the git oid of what git stores, and the LFS object's."""
            data = repo.commits[sha][path]
            if path not in repo.lfs[sha]:
                return {"oid": git_oid(data), "size": len(data)}
            pointer = lfs_pointer(data)
            lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            return {"oid": git_oid(pointer), "size": len(data), "lfs": lfs}

        def _info(self, repo_id: str, rev: str):
            if (found := self._snapshot(repo_id, rev)) is None:
                return
            repo, sha = found
            siblings = []
            for p in sorted(repo.commits[sha]):
                entry = self._entry(repo, sha, p)
                sibling = {"rfilename": p, "blobId": entry["oid"], "size": entry["size"]}
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
                siblings.append(sibling)
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "tags": [],
                             "siblings": siblings})  # fmt: skip

        def _tree(self, repo_id: str, rev: str, sub: str):
            if (found := self._snapshot(repo_id, rev)) is None:
                return
            repo, sha = found
            prefix = sub.rstrip("/") + "/" if sub else ""
            entries = [
                {"type": "file", "path": p, **self._entry(repo, sha, p)}
                for p in sorted(repo.commits[sha])
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
            entry = self._entry(repo, sha, file)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
            if "lfs" in entry:  # the Hub redirects LFS files to its CDN, which serves them without the token
                location = hub._sign("GET", f"/lfs/{repo_id}/{entry['lfs']['oid']}")
                headers.update({"Location": location, "X-Linked-Etag": f'"{entry["lfs"]["oid"]}"',
                                "X-Linked-Size": str(len(data))})  # fmt: skip
                return self._send(302, b"", headers, head)
            self._send(200, data, {**headers, "Content-Type": "application/octet-stream"}, head)

        def do_POST(self):
            path = urlparse(self.path).path
            body = self._body()
            hub.requests.append((self.command, path, dict(self.headers)))
            if self._refuse_unknown_token():
                return
            if path == "/api/validate-yaml":  # public on the Hub: no token needed
                return self._json(200, {"errors": [], "warnings": []})
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid username or password.")
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            m = re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path)
            if m:
                return self._preupload(m["repo"], m["rev"], json.loads(body))
            m = re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path)
            if m:
                return self._lfs_batch(m["repo"], json.loads(body))
            m = re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/verify", path)
            if m:
                return self._lfs_verify(m["repo"], json.loads(body))
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

        def _preupload(self, repo_id: str, rev: str, payload: dict):
            if (found := self._snapshot(repo_id, rev)) is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            patterns = lfs_patterns(files.get(".gitattributes", b""))
            answer = []
            for f in payload["files"]:
                lfs = goes_lfs(f["path"], f["size"], base64.b64decode(f["sample"]), patterns)
                remote = self._entry(repo, sha, f["path"]) if f["path"] in files else None
                oid = None if remote is None else remote["lfs"]["oid"] if "lfs" in remote else remote["oid"]
                answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                               "oid": oid})  # fmt: skip
            self._json(200, {"files": answer})

        def _lfs_batch(self, repo_id: str, payload: dict):
            repo = self._repo(repo_id)
            if repo is None:
                return
            if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
                return self._error(400, "BadRequest", "only sha256 uploads are supported")
            objects, multipart = [], False
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                if oid in repo.objects and len(hub.objects[oid]) == size:
                    objects.append({"oid": oid, "size": size})  # already stored: nothing to upload
                    continue
                with hub.lock:
                    hub._pending[(repo_id, oid)] = size
                    hub._parts.pop((repo_id, oid), None)
                where = f"/lfs/{repo_id}/{oid}"
                verify = {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}
                if size > hub.multipart_threshold and "multipart" in payload.get("transfers", ["basic"]):
                    multipart = True
                    header = {"chunk_size": str(hub.chunk_size)}
                    for n in range(1, math.ceil(size / hub.chunk_size) + 1):
                        header[f"{n:05d}"] = hub._sign("PUT", f"{where}/{n}")
                    upload = {"href": hub._sign("POST", where), "header": header}
                else:
                    upload = {"href": hub._sign("PUT", where)}
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"upload": upload, "verify": verify}})  # fmt: skip
            self._json(
                200,
                {"transfer": "multipart" if multipart else "basic", "objects": objects, "hash_algo": "sha256"},
                {"Content-Type": "application/vnd.git-lfs+json"},
            )

        def _lfs_verify(self, repo_id: str, payload: dict):
            repo = self._repo(repo_id)
            if repo is None:
                return
            oid, size = payload["oid"], payload["size"]
            if oid not in repo.objects or len(hub.objects[oid]) != size:
                return self._error(404, "ObjectNotFound", f"LFS object {oid} was not uploaded")
            self._json(200, {})

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
                files, lfs = dict(repo.commits[base]), set(repo.lfs[base])
                patterns = lfs_patterns(files.get(".gitattributes", b""))
                summary = "commit"
                for line in body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value.get("summary") or summary
                    elif key == "file":
                        data = base64.b64decode(value["content"])
                        if goes_lfs(value["path"], len(data), data, patterns):
                            return self._error(
                                400, "BadRequest", f"Your push was rejected because it contains binary files: "
                                f"{value['path']} must be stored with LFS"
                            )  # fmt: skip
                        files[value["path"]] = data
                        lfs.discard(value["path"])
                    elif key == "lfsFile":
                        oid, size = value["oid"], value["size"]
                        if value.get("algo", "sha256") != "sha256" or oid not in repo.objects:
                            return self._error(
                                400, "BadRequest", "Your push was rejected because an LFS pointer pointed to a file "
                                f"that does not exist: {value['path']}"
                            )  # fmt: skip
                        if len(hub.objects[oid]) != size:
                            return self._error(400, "BadRequest", f"wrong size for the LFS file {value['path']}")
                        files[value["path"]] = hub.objects[oid]
                        lfs.add(value["path"])
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                        lfs.discard(value["path"])
                    else:
                        return self._error(400, "BadRequest", f"unsupported commit operation {key}")
                sha = repo.commit(files, rev, summary, lfs)
            self._json(
                200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            )

    return Handler


def _make_storage_handler(hub: HubServer):
    """The LFS storage (S3 and the CDN on the Hub): signed URLs only, no Hub token."""

    class StorageHandler(_Handler):
        def _s3_error(self, status: int, code: str, message: str, head: bool = False):
            body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            self._send(status, body, {"Content-Type": "application/xml"}, head)

        def _route(self, body_first: bool) -> tuple[str, str, int | None, bytes] | None:
            """(repo, oid, part, body) of a request with a valid signature, or None after answering."""
            body = self._body() if body_first else b""
            hub.storage_requests.append((self.command, urlparse(self.path).path, dict(self.headers)))
            m = re.fullmatch(rf"/lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})(?:/(?P<part>\d+))?", urlparse(self.path).path)
            method = "GET" if self.command == "HEAD" else self.command
            if m is None or not hub._signature_ok(method, self.path):
                head = self.command == "HEAD"
                self._s3_error(403, "SignatureDoesNotMatch", "The request signature does not match", head)
                return None
            return m["repo"], m["oid"], int(m["part"]) if m["part"] else None, body

        def do_GET(self, head: bool = False):
            if (found := self._route(body_first=False)) is None:
                return
            _repo, oid, _part, _ = found
            data = hub.objects.get(oid)
            if data is None:
                return self._s3_error(404, "NoSuchKey", "The specified key does not exist.", head)
            self._send(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"'}, head)

        def do_HEAD(self):
            self.do_GET(head=True)

        def do_PUT(self):
            if (found := self._route(body_first=True)) is None:
                return
            repo_id, oid, part, body = found
            with hub.lock:
                failures = hub._failures.get((oid, part))
                status = failures.pop(0) if failures else 200
                size = hub._pending.get((repo_id, oid))
                hub.uploads.append((repo_id, oid, part, status))
            if status != 200:
                return self._s3_error(status, "AccessDenied", "Request has expired")
            if size is None:
                return self._s3_error(403, "AccessDenied", "no upload of this object was announced")
            if part is None:  # basic transfer: the whole object in one PUT
                if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                    return self._s3_error(400, "BadDigest", "The sha256 or size does not match what was received")
                return self._store(repo_id, oid, body)
            parts = math.ceil(size / hub.chunk_size)
            expected = min(hub.chunk_size, size - (part - 1) * hub.chunk_size)
            if not 1 <= part <= parts or len(body) != expected:
                return self._s3_error(400, "InvalidPart", f"part {part} of {parts} has {len(body)} bytes")
            with hub.lock:
                hub._parts.setdefault((repo_id, oid), {})[part] = body
            self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

        def do_POST(self):
            """Completion of a multipart upload: the parts, each with the ETag its PUT answered."""
            if (found := self._route(body_first=True)) is None:
                return
            repo_id, oid, _part, body = found
            payload = json.loads(body)
            with hub.lock:
                size = hub._pending.get((repo_id, oid))
                stored = hub._parts.get((repo_id, oid), {})
            numbers = [p["partNumber"] for p in payload.get("parts", [])]
            if (
                size is None
                or payload.get("oid") != oid
                or numbers != list(range(1, math.ceil(size / hub.chunk_size) + 1))
            ):
                return self._s3_error(400, "InvalidPart", "the parts listed are not the parts of this object")
            for p in payload["parts"]:
                if (
                    p["partNumber"] not in stored
                    or p["etag"].strip('"') != hashlib.md5(stored[p["partNumber"]]).hexdigest()
                ):
                    return self._s3_error(400, "InvalidPart", f"part {p['partNumber']} was not uploaded")
            data = b"".join(stored[n] for n in numbers)
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                return self._s3_error(400, "BadDigest", "The sha256 or size does not match what was received")
            self._store(repo_id, oid, data)

        def _store(self, repo_id: str, oid: str, data: bytes):
            with hub.lock:
                hub.objects[oid] = data
                hub.repos[repo_id].objects.add(oid)
                hub._pending.pop((repo_id, oid), None)
                hub._parts.pop((repo_id, oid), None)
            self._send(200, b"", {"ETag": f'"{oid}"'})

    return StorageHandler
