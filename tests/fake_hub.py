"""Test-only stand-in for the Hugging Face Hub's file API, served over loopback.

``fake_hub`` serves ONE model repo from memory on 127.0.0.1 (a random free port, a background
thread) and speaks just enough of the hub's HTTP protocol for huggingface_hub's
``HfApi.list_repo_files`` / ``list_repo_tree`` / ``model_info``, ``hf_hub_download`` and
``snapshot_download`` when they are given ``endpoint=hub.url``. Downloads land in the ordinary
cache layout (``models--org--name/{blobs,refs,snapshots/<commit>}``), so a later
``local_files_only=True`` call finds them.

Routes (everything else is a 404 with a JSON body):
    GET       /api/models/{repo}[/revision/{rev}]      model info: id, sha, siblings
    GET       /api/models/{repo}/tree/{rev}[/{path}]   tree listing (?recursive=, no pagination)
    HEAD|GET  /{repo}/resolve/{rev}/{file}             file metadata / bytes (Range: bytes=N-)

Not a hub: one repo, no auth, no Xet, no CDN redirects, no pagination, no uploads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files the hub would keep in git LFS: their ETag is the content's sha256 (not the git blob id)
# and the tree lists an "lfs" entry for them, as for real weights.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_MODELS = "/api/models/"
_DATE = "2024-01-01T00:00:00.000Z"


def _git_blob_id(data: bytes) -> str:
    """The git object id of a blob: sha1 over a "blob <size>\\0" header and the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def lfs_pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """What git stores for the path: the blob itself, or its LFS pointer file."""
        return _git_blob_id(self.lfs_pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What the hub sends as ETag, and what names the file in the cache's blobs/ folder."""
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    commits: dict[str, dict[str, _Blob]]
    refs: dict[str, str]  # branch "main" and tags -> commit

    def resolve(self, revision: str) -> str | None:
        """A branch, tag or full commit sha -> the commit sha, or None."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _build_repo(repo_id: str, revisions: dict[str, dict[str, bytes]], tags: dict[str, str]) -> _Repo:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    if not revisions:
        raise ValueError("revisions must hold at least one commit")
    for sha in revisions:
        if not _COMMIT.match(sha):
            raise ValueError(f"commit {sha!r} is not 40 lowercase hex characters")
    for tag, sha in tags.items():
        if sha not in revisions:
            raise ValueError(f"tag {tag!r} points to unknown commit {sha!r}")
    commits = {sha: {path: _Blob(bytes(data), path.endswith(LFS_SUFFIXES)) for path, data in files.items()}
               for sha, files in revisions.items()}
    return _Repo(repo_id, commits, {**tags, "main": next(iter(revisions))})


def _tree_entries(files: dict[str, _Blob], folder: str, recursive: bool) -> list[dict] | None:
    """The hub's tree listing of ``folder`` ("" = root): directories first, then files, each
    sorted; None if ``folder`` is not a directory of this commit."""
    prefix = f"{folder}/" if folder else ""
    below = sorted(p for p in files if p.startswith(prefix))
    if folder and not below:
        return None
    dirs: set[str] = set()
    listed: list[str] = []
    for path in below:
        parts = path[len(prefix):].split("/")
        depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
        dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        if recursive or len(parts) == 1:
            listed.append(path)
    entries = [{"type": "directory", "oid": _git_blob_id(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
    return entries + [_file_entry(path, files[path]) for path in listed]


def _file_entry(path: str, blob: _Blob) -> dict:
    entry: dict = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.lfs_pointer)}
    return entry


def _model_info(repo: _Repo, commit: str, with_blobs: bool) -> dict:
    """The fields of GET /api/models/{repo} that huggingface_hub's ModelInfo reads."""
    siblings = []
    for path, blob in sorted(repo.commits[commit].items()):
        sibling: dict = {"rfilename": path}
        if with_blobs:  # ?blobs=true (files_metadata=True)
            sibling.update(size=len(blob.data), blobId=blob.oid)
            if blob.lfs:
                sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.lfs_pointer)}
        siblings.append(sibling)
    return {"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "createdAt": _DATE, "lastModified": _DATE}


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=START-[END]`` (the only form huggingface_hub sends, to resume a download) ->
    (start, end exclusive); None for no header or one this server does not honour (-> 200)."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if match is None:
        return None
    start = int(match[1])
    end = min(int(match[2]) + 1, size) if match[2] else size
    return (start, end) if start < end else None


class _HubServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True

    def __init__(self, repo: _Repo, log: list[tuple[str, str]], lock: threading.Lock) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repo, self.log, self.lock = repo, log, lock

    def handle_error(self, request: object, client_address: object) -> None:  # type: ignore[override]
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is not news
            super().handle_error(request, client_address)


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may sit idle; bounds server_close()
    server: _HubServer

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: object) -> None:
        pass

    # --- routing -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        raw_path, _, query = self.path.partition("?")
        with self.server.lock:
            self.server.log.append((self.command, unquote(raw_path)))
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if raw_path.startswith(_API_MODELS):
            self._api_models(raw_path[len(_API_MODELS):], params)
        elif (match := _RESOLVE.match(raw_path)) is not None:
            self._resolve(match["repo"], unquote(match["rev"]), unquote(match["file"]))
        else:
            self._error(404, None, "Not Found")

    def _api_models(self, rest: str, params: dict[str, str]) -> None:
        repo = self.server.repo
        if rest != repo.repo_id and not rest.startswith(repo.repo_id + "/"):
            return self._error(404, "RepoNotFound", "Repository not found")
        tail = rest[len(repo.repo_id):].split("/", 3)  # "", "/revision/REV", "/tree/REV[/PATH]"
        kind = tail[1] if len(tail) > 1 else "info"
        if kind == "info" or (kind == "revision" and len(tail) == 3):
            commit = self._commit(unquote(tail[2]) if kind == "revision" else "main")
            if commit is not None:
                self._json(_model_info(repo, commit, params.get("blobs", "").lower() == "true"))
        elif kind == "tree" and len(tail) >= 3:
            commit = self._commit(unquote(tail[2]))
            if commit is not None:
                folder = unquote(tail[3]).strip("/") if len(tail) == 4 else ""
                recursive = params.get("recursive", "").lower() == "true"
                entries = _tree_entries(repo.commits[commit], folder, recursive)
                if entries is None:
                    return self._error(404, "EntryNotFound", f"{folder} does not exist on {commit}")
                self._json(entries)
        else:
            self._error(404, None, "Not Found")

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self.server.repo
        if repo_id != repo.repo_id:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = self._commit(revision)
        if commit is None:
            return
        blob = repo.commits[commit].get(filename)
        if blob is None:
            # With X-Repo-Commit, hf_hub_download records the miss under .no_exist/<commit>/.
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        self._send_blob(commit, blob)

    def _commit(self, revision: str) -> str | None:
        """The commit a revision names; answers the RevisionNotFound 404 itself when none."""
        commit = self.server.repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # --- responses -----------------------------------------------------------------------------

    def _send_blob(self, commit: str, blob: _Blob) -> None:
        # get_hf_file_metadata (the HEAD) needs X-Repo-Commit and an ETag; huggingface_hub prefers
        # X-Linked-Etag / X-Linked-Size, which the real hub sets on the redirect to LFS storage.
        # Here every file is answered in place (200), so the download url is this same url, and no
        # X-Xet-Hash header is sent, so the plain HTTP download path is used.
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{blob.etag}"', "X-Repo-Commit": commit,
                   "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(len(blob.data))})
        span = _byte_range(self.headers.get("Range"), len(blob.data)) if self.command == "GET" else None
        if span is None:
            return self._send(200, headers, blob.data)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(blob.data)}"
        self._send(206, headers, blob.data[start:end])

    def _json(self, payload: object) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        # hf_raise_for_status picks the exception class from X-Error-Code (RepoNotFound,
        # RevisionNotFound, EntryNotFound); a HEAD has no body, so the header is what counts.
        header_safe = message.encode("ascii", "backslashreplace").decode()  # http.server writes latin-1
        headers = {"Content-Type": "application/json", "X-Error-Message": header_safe, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # one request per connection: nothing idles at shutdown
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# --- public API ----------------------------------------------------------------------------------


@dataclass
class FakeHub:
    """A running fake hub: ``url`` is the endpoint to pass as ``endpoint=``; ``requests`` lists
    every (method, path) received, in order, with the path percent-decoded and without its query
    string (e.g. ``("GET", "/org/name/resolve/main/config.json")``)."""

    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fetched(self, method: str = "GET") -> list[str]:
        """Paths of the files requested with ``method`` through /resolve/, e.g. "config.json"."""
        with self._lock:
            paths = [path for m, path in self.requests if m == method]
        return [m["file"] for p in paths if (m := _RESOLVE.match(p)) is not None]


@contextlib.contextmanager
def _loopback_bypasses_proxy() -> Iterator[None]:
    """If proxy variables are set, add 127.0.0.1 to NO_PROXY for the duration, and drop
    huggingface_hub's shared HTTP client so the next one is built with that exclusion (httpx
    reads the proxy variables when a client is created). Without proxy variables: nothing."""
    if not any(urllib.request.getproxies().get(scheme) for scheme in ("http", "https", "all")):
        yield
        return
    from huggingface_hub.utils import close_session

    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    current = saved["no_proxy"] or saved["NO_PROXY"] or ""
    for name in saved:
        os.environ[name] = f"{current},127.0.0.1" if current else "127.0.0.1"
    close_session()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def fake_hub(repo_id: str, revisions: dict[str, dict[str, bytes]], tags: dict[str, str] | None = None
             ) -> Iterator["FakeHub"]:
    """revisions: commit sha (40 hex chars) -> {path in repo: file bytes}; the FIRST commit is what
    branch "main" points to; tags: tag name -> commit sha. Yields a FakeHub with .url (endpoint,
    e.g. "http://127.0.0.1:PORT") and .requests (a list of (method, path) received, thread-safe),
    so tests can assert what was fetched (for example that weights not in allow_patterns were not)."""
    repo = _build_repo(repo_id, revisions, tags or {})
    hub = FakeHub(url="")
    server = _HubServer(repo, hub.requests, hub._lock)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"fake-hub-{repo_id}", daemon=True)
    thread.start()
    try:
        with _loopback_bypasses_proxy():
            yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- self-check ----------------------------------------------------------------------------------


def _self_check() -> None:
    import tempfile
    from pathlib import Path

    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo_id, main, v1 = "test-org/tiny", "1" * 40, "2" * 40
    old = {"config.json": b'{"model_type": "llama", "v": 1}', "model.safetensors": bytes(range(256)) * 64,
           "tokenizer.json": b'{"version": "1.0"}', "README.md": b"# tiny v1\n", "extra.bin": b"\x00" * 4096}
    new = {**old, "config.json": b'{"model_type": "llama", "v": 2}', "model.safetensors": os.urandom(70_000),
           "README.md": b"# tiny\n"}
    wanted = ["config.json", "*.safetensors", "tokenizer.json"]
    with tempfile.TemporaryDirectory() as tmp, fake_hub(repo_id, {main: new, v1: old}, tags={"v1": v1}) as hub:
        cache = Path(tmp) / "hub"
        api = HfApi(endpoint=hub.url)
        for revision in (None, "main", main):
            assert sorted(api.list_repo_files(repo_id, revision=revision)) == sorted(new), revision
        for revision in ("v1", v1):
            assert sorted(api.list_repo_files(repo_id, revision=revision)) == sorted(old), revision
        print("list_repo_files at main / v1 / commit: ok")

        folder = Path(snapshot_download(repo_id, allow_patterns=wanted, cache_dir=cache, endpoint=hub.url))
        assert folder == cache / "models--test-org--tiny" / "snapshots" / main, folder
        got = sorted(p.name for p in folder.iterdir())
        assert got == ["config.json", "model.safetensors", "tokenizer.json"], got
        for name in got:
            assert (folder / name).read_bytes() == new[name], name
        assert sorted(hub.fetched("GET")) == got, hub.fetched("GET")
        assert not {"extra.bin", "README.md"} & set(hub.fetched("HEAD") + hub.fetched("GET"))
        assert (cache / "models--test-org--tiny" / "refs" / "main").read_text() == main
        weights_blob = hashlib.sha256(new["model.safetensors"]).hexdigest()  # LFS file: blob named by sha256
        assert (cache / "models--test-org--tiny" / "blobs" / weights_blob).read_bytes() == new["model.safetensors"]
        print("snapshot_download(allow_patterns):", got, "- GETs:", sorted(hub.fetched("GET")))

        offline = snapshot_download(repo_id, allow_patterns=wanted, cache_dir=cache, local_files_only=True)
        assert Path(offline) == folder, offline
        print("snapshot_download(local_files_only=True): same folder")

        for revision in ("v1", v1):  # each into a fresh cache, so both really go to the server
            own_cache = Path(tmp) / f"cache-{revision}"
            path = Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=own_cache,
                                        endpoint=hub.url))
            assert path == own_cache / "models--test-org--tiny" / "snapshots" / v1 / "config.json", path
            assert path.read_bytes() == old["config.json"]
        assert (Path(tmp) / "cache-v1" / "models--test-org--tiny" / "refs" / "v1").read_text() == v1
        assert ("GET", f"/{repo_id}/resolve/{v1}/config.json") in hub.requests
        print("hf_hub_download(config.json) at v1 and at the commit sha: ok")

        try:
            snapshot_download("test-org/missing", cache_dir=cache, endpoint=hub.url)
            raise AssertionError("unknown repo did not raise")
        except RepositoryNotFoundError:
            pass
        try:
            hf_hub_download("test-org/missing", "config.json", cache_dir=cache, endpoint=hub.url)
            raise AssertionError("unknown repo did not raise")
        except RepositoryNotFoundError:
            pass
        print("unknown repo -> RepositoryNotFoundError")
        try:
            snapshot_download(repo_id, revision="no-such-branch", cache_dir=cache, endpoint=hub.url)
            raise AssertionError("unknown revision did not raise")
        except RevisionNotFoundError:
            pass
        try:
            hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=cache, endpoint=hub.url)
            raise AssertionError("unknown revision did not raise")
        except RevisionNotFoundError:
            pass
        print("unknown revision -> RevisionNotFoundError")
        print(f"{len(hub.requests)} requests served")
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("fake-hub")]
    assert not leftover, leftover
    print("server thread stopped; all checks passed")


if __name__ == "__main__":
    _self_check()
