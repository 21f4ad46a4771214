"""A small in-process Hugging Face Hub for tests: the HTTP API `huggingface_hub` uses to create a model repo, upload a
folder (regular files inline in the commit, binary files through Git LFS), read repo info and download files. It
binds to 127.0.0.1 only, keeps everything in memory, bounds request bodies, and records every request so a test can
assert that the client used nothing it does not implement.

As on the Hub:
- LFS objects up to `multipart_chunk_bytes` upload in one PUT (basic transfer), larger ones in parts (the Hub's
  multipart transfer: part URLs, then a completion request), so a real-size checkpoint of a few hundred MB uploads
  although no request body may exceed `MAX_BODY_BYTES`;
- LFS objects belong to a repository: pushing the same weights to a second repository uploads them again;
- `create_repo` of an existing repository answers 409 with the repository's URL, which
  `create_repo(exist_ok=True)` reads.

Point a client at it with `HF_ENDPOINT=hub.endpoint` (set before `huggingface_hub` is imported, i.e. in a
subprocess), or pass `endpoint=hub.endpoint` to `HfApi`. Xet storage is not implemented: clients with `hf_xet`
installed must run with `HF_HUB_DISABLE_XET=1` (huggingface_hub then uploads through LFS, as without `hf_xet`), or the
hub must be created with `lfs=False` (every file is then committed as a regular git blob, which the Hub API allows).

Example:
```python
>>> with MiniHub(token="hf_test", user="tester") as hub:
...     env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}
...     subprocess.run([sys.executable, "upload.py"], env={**os.environ, **env}, check=True)
...     assert hub.unhandled == []
```
"""

import base64
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY_BYTES = 64 * 1024 * 1024
# The Hub stores binary files (and anything over 10 MB) in LFS; text files are regular git blobs.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# By default, LFS objects larger than this are uploaded in parts of this size (the Hub's multipart transfer), each
# part one request within MAX_BODY_BYTES; smaller ones in one PUT (basic transfer).
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
# Where the LFS batch answer sends a repository's uploads of one object (the Hub's presigned storage URLs).
_LFS_OBJECT = rf"/{_REPO}/lfs-objects/(?P<oid>[0-9a-f]{{64}})"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def oid(self) -> str:
        # What the Hub reports for a path: the LFS sha256 for LFS files, the git blob id otherwise.
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_oid(self.content)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[tuple[str, dict[str, StoredFile]]] = field(default_factory=list)  # (oid, snapshot), oldest first
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, uploaded to this repo
    lfs_parts: dict[str, dict[int, bytes]] = field(default_factory=dict)  # sha256 -> part number -> a multipart part

    @property
    def head(self) -> tuple[str, dict[str, StoredFile]]:
        return self.commits[-1]

    def snapshot(self, revision: str) -> tuple[str, dict[str, StoredFile]] | None:
        if revision == "main":
            return self.head
        return next((commit for commit in self.commits if commit[0] == revision), None)


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.details = details or {}  # more fields of the JSON error body


def _front_matter(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, flags=re.DOTALL)
    if not match:
        return {}
    metadata = yaml.safe_load(match.group(1))
    if not isinstance(metadata, dict):
        raise HubError(400, "README.md metadata must be a YAML mapping")
    return metadata


class MiniHub:
    r"""
    In-memory Hub serving `create_repo`, `upload_folder`/`create_commit`, `model_info` and `hf_hub_download`.

    Args:
        token (`str`): the only accepted access token; writes and private reads need `Authorization: Bearer <token>`.
        user (`str`): namespace of repos created without an organisation.
        lfs (`bool`): store binary or large files in LFS (the Hub's behaviour) or every file as a regular blob.
        multipart_chunk_bytes (`int`): LFS objects larger than this upload in parts of this size (at most
            `MAX_BODY_BYTES`).
    """

    def __init__(self, token: str = "hf_test_token", user: str = "tester", lfs: bool = True,
                 multipart_chunk_bytes: int = MULTIPART_CHUNK_BYTES):
        if not 0 < multipart_chunk_bytes <= MAX_BODY_BYTES:
            raise ValueError(f"multipart_chunk_bytes must lie in (0, {MAX_BODY_BYTES}], got {multipart_chunk_bytes}")
        self.token, self.user, self.lfs = token, user, lfs
        self.multipart_chunk_bytes = multipart_chunk_bytes
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle ---------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "MiniHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mini-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)

    def __enter__(self) -> "MiniHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ----- helpers used by the routes ------------------------------------------------------------------------
    def _authorized(self, headers) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def _require_write(self, headers) -> None:
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header", "Unauthorized")

    def _repo(self, repo_id: str, headers) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(headers)):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, StoredFile]]:
        snapshot = repo.snapshot(unquote(revision))
        if snapshot is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return snapshot

    def _should_use_lfs(self, size: int, sample: bytes) -> bool:
        return self.lfs and (size >= LFS_SIZE_THRESHOLD or b"\0" in sample)

    # ----- routes ------------------------------------------------------------------------------------------
    def create_repo(self, request) -> tuple[int, dict]:
        self._require_write(request.headers)
        payload = request.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test hub only hosts model repos")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            # The Hub's answer; huggingface_hub's `create_repo(exist_ok=True)` returns this body's `url`.
            raise HubError(409, "You already created this model repo", "RepoExists", {"url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.commits.append((hashlib.sha1(f"init {repo_id}".encode()).hexdigest(), {}))
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def validate_yaml(self, request) -> tuple[int, dict]:
        try:
            _front_matter(request.json()["content"])
        except (yaml.YAMLError, HubError) as error:
            return 400, {"errors": [{"message": str(error)}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def agent_harnesses(self, request) -> tuple[int, dict]:
        # huggingface_hub's best-effort agent detection reads this registry; this hub knows no harness.
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def model_info(self, request, repo: str, revision: str = "main") -> tuple[int, dict]:
        stored = self._repo(repo, request.headers)
        oid, files = self._snapshot(stored, revision)
        metadata = _front_matter(files["README.md"].content.decode()) if "README.md" in files else {}
        siblings = [
            {"rfilename": path, "size": file.size, "blobId": file.oid}
            for path, file in sorted(files.items())
        ]
        return 200, {
            "id": repo, "modelId": repo, "sha": oid, "private": stored.private, "siblings": siblings,
            "tags": metadata.get("tags", []), "library_name": metadata.get("library_name"),
            "pipeline_tag": metadata.get("pipeline_tag"), "cardData": metadata or None,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }

    def tree(self, request, repo: str, revision: str, path: str = "") -> tuple[int, list]:
        stored = self._repo(repo, request.headers)
        _, files = self._snapshot(stored, revision)
        prefix = unquote(path).strip("/")
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        under = {p: f for p, f in files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise HubError(404, f"Entry {prefix} not found", "EntryNotFound")
        entries, folders = [], set()
        for file_path, file in sorted(under.items()):
            relative = file_path[len(prefix) + 1:] if prefix else file_path
            parts = relative.split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add("/".join(filter(None, [prefix, *parts[:depth]])))
            if recursive or len(parts) == 1:
                entry = {"type": "file", "path": file_path, "size": file.size, "oid": git_blob_oid(file.content)}
                if file.lfs:
                    entry["lfs"] = {"oid": file.oid, "size": file.size, "pointerSize": 134}
                entries.append(entry)
        entries += [{"type": "directory", "path": folder, "size": 0, "oid": hashlib.sha1(folder.encode()).hexdigest()}
                    for folder in sorted(folders)]
        return 200, entries

    def preupload(self, request, repo: str, revision: str) -> tuple[int, dict]:
        self._require_write(request.headers)
        stored = self._repo(repo, request.headers)
        oid, files = self._snapshot(stored, revision)
        answers = []
        for entry in request.json()["files"]:
            sample = base64.b64decode(entry["sample"])
            existing = files.get(entry["path"])
            answers.append({
                "path": entry["path"],
                "uploadMode": "lfs" if self._should_use_lfs(entry["size"], sample) else "regular",
                "shouldIgnore": False,
                "oid": existing.oid if existing else None,
            })
        return 200, {"files": answers, "commitOid": oid}

    def commit(self, request, repo: str, revision: str) -> tuple[int, dict]:
        self._require_write(request.headers)
        stored = self._repo(repo, request.headers)
        parent, files = self._snapshot(stored, revision)
        if unquote(revision) != "main":
            raise HubError(400, "this test hub only commits to main")
        files = dict(files)
        summary = ""
        for line in request.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
                if value.get("parentCommit") not in (None, parent):
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = stored.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(content, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        listing = "".join(f"{path}:{file.oid}\n" for path, file in sorted(files.items()))
        oid = hashlib.sha1(f"{parent}\n{summary}\n{listing}".encode()).hexdigest()
        stored.commits.append((oid, files))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}",
                     "pullRequestUrl": None}

    def lfs_batch(self, request, repo: str) -> tuple[int, dict]:
        self._require_write(request.headers)
        stored = self._repo(repo, request.headers)
        payload = request.json()
        transfers = payload.get("transfers", ["basic"])
        if payload.get("operation") != "upload" or "basic" not in transfers:
            raise HubError(400, "this test hub only accepts basic and multipart LFS uploads")
        objects, multipart = [], False
        for entry in payload["objects"]:
            oid, size = entry["oid"], entry["size"]
            answer = {"oid": oid, "size": size}
            if oid not in stored.lfs_objects:  # already stored objects get no actions (nothing to upload)
                base = f"{self.endpoint}/{repo}/lfs-objects/{oid}"
                if size > self.multipart_chunk_bytes:
                    if "multipart" not in transfers:
                        raise HubError(400, f"LFS object {oid} of {size} bytes needs the multipart transfer")
                    # As the Hub answers: the upload href completes the upload; the header holds the chunk size
                    # and one (presigned, so unauthenticated) URL per part, numbered from 1.
                    parts = {str(number): f"{base}/parts/{number}"
                             for number in range(1, math.ceil(size / self.multipart_chunk_bytes) + 1)}
                    upload = {"href": f"{base}/complete/{size}",
                              "header": {"chunk_size": str(self.multipart_chunk_bytes), **parts}}
                    multipart = True
                else:
                    upload = {"href": f"{base}/{size}"}
                answer["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify"}}
            objects.append(answer)
        return 200, {"transfer": "multipart" if multipart else "basic", "objects": objects}

    @staticmethod
    def _store_lfs_object(stored: Repo, oid: str, size: str, content: bytes) -> None:
        if len(content) != int(size) or hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        stored.lfs_objects[oid] = content

    def lfs_upload(self, request, repo: str, oid: str, size: str) -> tuple[int, dict]:
        self._store_lfs_object(self._upload_target(repo), oid, size, request.body)
        return 200, {}

    def lfs_upload_part(self, request, repo: str, oid: str, number: str) -> tuple[int, bytes, dict]:
        part = request.body
        if len(part) > self.multipart_chunk_bytes:
            raise HubError(400, f"part {number} of {oid} is larger than the chunk size {self.multipart_chunk_bytes}")
        self._upload_target(repo).lfs_parts.setdefault(oid, {})[int(number)] = part
        # As S3 answers a part upload: the part's ETag, which the client sends back in the completion request.
        return 200, b"", {"ETag": f'"{hashlib.md5(part).hexdigest()}"'}

    def lfs_complete(self, request, repo: str, oid: str, size: str) -> tuple[int, dict]:
        stored = self._upload_target(repo)
        payload = request.json()
        uploaded = stored.lfs_parts.pop(oid, {})
        listed = [(part["partNumber"], part["etag"]) for part in payload.get("parts", [])]
        if payload.get("oid") != oid or [number for number, _ in listed] != sorted(uploaded):
            raise HubError(400, f"completion of {oid} lists parts {listed}, uploaded were {sorted(uploaded)}")
        for number, etag in listed:
            if etag.strip('"') != hashlib.md5(uploaded[number]).hexdigest():
                raise HubError(400, f"part {number} of {oid}: etag {etag} does not match the uploaded part")
        self._store_lfs_object(stored, oid, size, b"".join(uploaded[number] for number, _ in listed))
        return 200, {}

    def lfs_verify(self, request, repo: str, oid: str) -> tuple[int, dict]:
        self._require_write(request.headers)
        payload = request.json()
        content = self._repo(repo, request.headers).lfs_objects.get(oid)
        if content is None or len(content) != payload["size"]:
            raise HubError(404, f"LFS object {oid} not found")
        return 200, {}

    def _upload_target(self, repo: str) -> Repo:
        # Upload URLs stand for presigned storage URLs: no Authorization header, only a repository that exists.
        stored = self.repos.get(repo)
        if stored is None:
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return stored

    def resolve(self, request, repo: str, revision: str, path: str) -> tuple[int, bytes, dict]:
        stored = self._repo(repo, request.headers)
        oid, files = self._snapshot(stored, revision)
        file = files.get(unquote(path))
        if file is None:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_oid(file.content)}"', "Accept-Ranges": "bytes"}
        if file.lfs:
            headers.update({"X-Linked-Etag": f'"{file.oid}"', "X-Linked-Size": str(file.size)})
        content = file.content
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{file.size - 1}/{file.size}"
            content, status = content[start:], 206
        return status, content, headers


@dataclass
class _Request:
    headers: object
    query: dict
    body: bytes

    def json(self):
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"invalid JSON body: {error}") from error


def _routes(hub: MiniHub) -> list[tuple[str, re.Pattern, object]]:
    return [
        ("POST", re.compile(r"^/api/repos/create$"), hub.create_repo),
        ("POST", re.compile(r"^/api/validate-yaml$"), hub.validate_yaml),
        ("GET", re.compile(r"^/api/agent-harnesses$"), hub.agent_harnesses),
        ("GET", re.compile(rf"^/api/models/{_REPO}$"), hub.model_info),
        ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<revision>[^/]+)$"), hub.model_info),
        ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?$"), hub.tree),
        ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/]+)$"), hub.preupload),
        ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/]+)$"), hub.commit),
        ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), hub.lfs_batch),
        ("PUT", re.compile(rf"^{_LFS_OBJECT}/(?P<size>\d+)$"), hub.lfs_upload),
        ("PUT", re.compile(rf"^{_LFS_OBJECT}/parts/(?P<number>\d+)$"), hub.lfs_upload_part),
        ("POST", re.compile(rf"^{_LFS_OBJECT}/complete/(?P<size>\d+)$"), hub.lfs_complete),
        ("POST", re.compile(rf"^{_LFS_OBJECT}/verify$"), hub.lfs_verify),
        ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), hub.resolve),
    ]


def _handler_for(hub: MiniHub):
    routes = _routes(hub)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # a stalled client cannot hold a thread forever

        def log_message(self, *args):  # keep test output clean; `hub.requests` records every request
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY_BYTES:
                        raise HubError(413, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise HubError(413, "request body too large")
            return self.rfile.read(length)

        def _send(self, status: int, body: bytes, headers: dict, with_body: bool = True) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            route_method = "GET" if method == "HEAD" else method
            with hub._lock:
                hub.requests.append((method, url.path))
            try:
                body = self._read_body()
                for allowed, pattern, handler in routes:
                    match = pattern.match(url.path)
                    if allowed == route_method and match:
                        request = _Request(self.headers, parse_qs(url.query), body)
                        with hub._lock:
                            result = handler(request, **{k: v for k, v in match.groupdict().items() if v is not None})
                        break
                else:
                    with hub._lock:
                        hub.unhandled.append((method, url.path))
                    raise HubError(404, f"{method} {url.path} is not implemented by the test hub")
            except HubError as error:
                headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
                if error.error_code:
                    headers["X-Error-Code"] = error.error_code
                body = json.dumps({"error": error.message, **error.details}).encode()
                self._send(error.status, body, headers, method != "HEAD")
                return
            if len(result) == 3:
                status, content, headers = result
                self._send(status, content, headers, with_body=method != "HEAD")
            else:
                status, payload = result
                self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method != "HEAD")

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

    return Handler


__all__ = ["MiniHub", "git_blob_oid"]
