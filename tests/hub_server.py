"""A loopback server speaking the parts of the Hugging Face Hub API that downloads use.

Tests build repos (files in memory, from a folder or a dict), serve them on a free
loopback port and point ``HF_ENDPOINT`` at it; ``huggingface_hub``, diffusers,
transformers and ``datasets`` then download through their real code paths. What is
implemented, checked against ``huggingface_hub``'s source (``hf_api.py``,
``file_download.py``, ``utils/_http.py``, ``_snapshot_download.py``):

- ``GET /api/{models,datasets}/<id>[/revision/<rev>]`` — repo info (``id``, ``sha``,
  ``siblings`` with sizes, ``gated``, ``private``, ``cardData``...), as ``repo_info``,
  ``model_info`` and ``dataset_info`` read it.
- ``GET /api/<type>s/<id>/tree/<rev>[/<path>]?recursive=`` — tree entries (``type``,
  ``path``, ``size``, ``oid``, ``lfs``) for ``list_repo_tree`` and ``HfFileSystem``;
  ``POST /api/<type>s/<id>/paths-info/<rev>`` for ``HfFileSystem.info``.
- ``HEAD``/``GET /[datasets/]<id>/resolve/<rev>/<path>`` — ``X-Repo-Commit``, ``ETag``
  (the git blob id, or the sha256 for LFS files), ``Content-Length``; LFS files
  (weights) answer ``302`` to a "CDN" address on another host name of this server
  (``localhost`` instead of ``127.0.0.1``) with ``X-Linked-Etag``/``X-Linked-Size``,
  as the Hub does, so the client takes the metadata from the redirect; byte ranges
  (``Range: bytes=N-``) answer ``206`` so interrupted downloads resume.
- Errors with the Hub's ``X-Error-Code`` header: ``RepoNotFound`` (401, as the Hub
  answers anonymous callers), ``GatedRepo`` (401 on files of a gated repo),
  ``RevisionNotFound`` and ``EntryNotFound`` (404).
- ``throttle_bps``: file bodies trickle at that rate, so progress can be watched.
- ``stall_s``: every request is held that long before any answer (a Hub that accepts
  connections and then says nothing); ``release_stalls()`` lets the held ones go.
- ``cut_after(path, nbytes)``: the next GET of that file sends ``nbytes`` and then
  closes the connection (an interrupted download); later GETs are whole.

Every request is logged in ``requests`` as ``(method, path, status)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

#: Files served the LFS way (redirect to the "CDN", sha256 ETag), like the Hub's .gitattributes.
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".parquet", ".msgpack", ".h5", ".onnx")


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 of ``data`` (the Hub's ``oid`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    """One revision of a repo: its commit sha and its files."""

    sha: str
    files: dict[str, bytes]

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        item = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if self.is_lfs(path):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return item

    def folders(self) -> set[str]:
        out = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out


@dataclass
class Repo:
    """A served repo: type (model/dataset), id, revisions by name, and whether it is gated."""

    repo_type: str
    repo_id: str
    revisions: dict[str, Commit] = field(default_factory=dict)
    gated: bool = False

    def commit(self, revision: str) -> Commit | None:
        if revision in self.revisions:
            return self.revisions[revision]
        for commit in self.revisions.values():  # a full commit sha works too
            if commit.sha == revision:
                return commit
        return None


def files_of(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` as ``{relative posix path: bytes}``."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def image_parquet(images: list, texts: list[str], compression: str = "snappy") -> bytes:
    """A Hub-style image dataset shard: PNG ``images`` (PIL) with their ``texts`` in an ``image``/``text``
    Parquet table carrying the ``datasets`` features, as ``datasets`` pushes it."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"{i}.png"}, "text": text})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())]))
    table = table.replace_schema_metadata({"huggingface": '{"info": {"features": {"image": {"_type": "Image"}, '
                                                          '"text": {"dtype": "string", "_type": "Value"}}}}'})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


class LocalHub:
    """The server. ``with LocalHub() as hub: hub.add_repo(...); os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._cuts: dict[str, int] = {}
        #: When set, file bodies are sent at about this many bytes per second (to watch progress).
        self.throttle_bps: float | None = None
        #: When set, every request waits this many seconds (or until ``release_stalls``) before an answer.
        self.stall_s: float | None = None
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repos -------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | str | Path, *, repo_type: str = "model",
                 revision: str = "main", gated: bool = False) -> Commit:
        """Serve ``files`` (a dict or a folder) as ``revision`` of ``repo_id``; returns the commit."""
        data = files if isinstance(files, dict) else files_of(files)
        digest = hashlib.sha1(json.dumps([repo_type, repo_id, revision]).encode())
        for path in sorted(data):
            digest.update(path.encode() + git_blob_id(data[path]).encode())
        commit = Commit(sha=digest.hexdigest(), files=dict(data))
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
        repo.revisions[revision] = commit
        repo.gated = repo.gated or gated
        return commit

    def release_stalls(self) -> None:
        """Let every held request answer now (and later ones at once)."""
        self.stall_s = None
        self._release.set()

    def hold(self) -> None:
        """Called by the handler before answering: waits while the hub stalls."""
        if self.stall_s:
            self._release.wait(self.stall_s)

    def cut_after(self, path: str, nbytes: int) -> None:
        """The next GET of a file whose repo path ends with ``path`` stops after ``nbytes`` bytes."""
        self._cuts[path] = nbytes

    # -- server --------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "start() the hub first"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self) -> "LocalHub":
        hub = self

        class Handler(_HubHandler):
            owner = hub

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a client that gave up: not news
                import sys

                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # no handler thread stays held
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def take_cut(self, path: str) -> int | None:
        with self._lock:
            for suffix in list(self._cuts):
                if path.endswith(suffix):
                    return self._cuts.pop(suffix)
        return None


class _HubHandler(BaseHTTPRequestHandler):
    owner: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)
        self.owner.log(self.command, self.path, status)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _repo(self, repo_type: str, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.owner.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}. "
                        "Please make sure you specified the correct `repo_id` and `repo_type`.", head)
        return repo

    def _commit(self, repo: Repo, revision: str, head: bool = False) -> Commit | None:
        commit = repo.commit(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return commit

    # -- routes --------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.owner.hold()
        self._route(head=True)

    def do_GET(self) -> None:
        self.owner.hold()
        self._route(head=False)

    def do_POST(self) -> None:
        self.owner.hold()
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        # /api/<type>s/<ns>/<name>/paths-info/<rev>
        if len(parts) >= 6 and parts[0] == "api" and parts[4] == "paths-info":
            repo = self._repo(parts[1][:-1], f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            commit = self._commit(repo, "/".join(parts[5:]))
            if commit is None:
                return
            form = parse_qs(raw.decode() or "")
            paths = form.get("paths", [])
            if not paths and raw.strip().startswith(b"{"):
                paths = json.loads(raw).get("paths", [])
            folders = commit.folders()
            out = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    out.append(commit.entry(path))
                elif path in folders or path == "":
                    out.append({"type": "directory", "path": path, "oid": git_blob_id(path.encode())})
            self._json(200, out)
            return
        self._error(404, "EntryNotFound", f"No route for POST {url.path}")

    def _route(self, head: bool) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        if parts and parts[0] == "cdn" and len(parts) >= 2:
            return self._serve_cdn(parts[1], head)
        if parts and parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            return self._api(parts[1][:-1], parts[2:], query, head)
        repo_type = "model"
        if parts and parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(repo_type, f"{parts[0]}/{parts[1]}", head)
            if repo is None:
                return
            return self._resolve(repo, parts[3], "/".join(parts[4:]), head)
        self._error(404, "EntryNotFound", f"No route for {url.path}", head)

    def _api(self, repo_type: str, parts: list[str], query: dict, head: bool) -> None:
        repo_id = "/".join(parts[:2])
        rest = parts[2:]
        repo = self._repo(repo_type, repo_id, head)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            commit = self._commit(repo, rest[1] if len(rest) > 1 else "main", head)
            if commit is None:
                return
            return self._json(200, self._info(repo, commit))
        if rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, rest[1], head)
            if commit is None:
                return
            prefix = "/".join(rest[2:]).strip("/")
            recursive = (query.get("recursive", ["false"])[0]).lower() == "true"
            return self._json(200, self._tree(commit, prefix, recursive))
        if rest[0] == "refs":
            return self._json(200, {"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c.sha}
                                                 for n, c in repo.revisions.items()],
                                    "converts": [], "tags": []})
        self._error(404, "EntryNotFound", f"No API route {'/'.join(rest)}", head)

    def _info(self, repo: Repo, commit: Commit) -> dict:
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(commit.files.items())],
        }
        if repo.repo_type == "model" and "model_index.json" in commit.files:
            info["library_name"] = "diffusers"
        return info

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        out = []
        base = prefix + "/" if prefix else ""
        for folder in sorted(commit.folders()):
            if folder.startswith(base) and (recursive or "/" not in folder[len(base):]):
                out.append({"type": "directory", "path": folder, "oid": git_blob_id(folder.encode())})
        for path in sorted(commit.files):
            if path.startswith(base) and (recursive or "/" not in path[len(base):]):
                out.append(commit.entry(path))
        return out

    def _resolve(self, repo: Repo, revision: str, path: str, head: bool) -> None:
        commit = self._commit(repo, revision, head)
        if commit is None:
            return
        if repo.gated and self.headers.get("Authorization") is None:
            return self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                               "access to it and be authenticated to access it. Please log in.", head)
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", head)
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if commit.is_lfs(path):
            digest = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data)),
                            "Location": f"{self.owner.cdn_url}/cdn/{digest}?repo={repo.repo_type}:{repo.repo_id}"
                                        f"&rev={commit.sha}&path={path}",
                            "ETag": f'"{git_blob_id(data)}"'})
            return self._send(302, b"", headers, content_type="text/plain", head=head)
        headers["ETag"] = f'"{commit.etag(path)}"'
        self._send_file(data, headers, head, path)

    def _serve_cdn(self, digest: str, head: bool) -> None:
        query = parse_qs(urlparse(self.path).query)
        repo_type, _, repo_id = query.get("repo", [":"])[0].partition(":")
        repo = self.owner.repos.get((repo_type, repo_id))
        commit = repo.commit(query.get("rev", [""])[0]) if repo else None
        path = query.get("path", [""])[0]
        if commit is None or path not in commit.files or hashlib.sha256(commit.files[path]).hexdigest() != digest:
            return self._send(403, b"<Error>AccessDenied</Error>", content_type="application/xml", head=head)
        self._send_file(commit.files[path], {"ETag": f'"{digest}"', "Accept-Ranges": "bytes"}, head, path)

    def _send_file(self, data: bytes, headers: dict[str, str], head: bool, path: str) -> None:
        status, total = 200, len(data)
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[6:].split(",")[0].partition("-")
            start = int(first or 0)
            end = min(int(last), total - 1) if last else total - 1
            if start >= total:
                return self._send(416, b"", {"Content-Range": f"bytes */{total}"}, head=head)
            data, status = data[start:end + 1], 206
            headers = dict(headers, **{"Content-Range": f"bytes {start}-{end}/{total}"})
        cut = None if head else self.owner.take_cut(path)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.owner.log(self.command, self.path, status)
        if head:
            return
        if cut is not None:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                import socket

                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.owner.throttle_bps:
            import time

            piece = 64 * 1024
            for i in range(0, len(data), piece):
                chunk = data[i:i + piece]
                self.wfile.write(chunk)
                self.wfile.flush()
                bps = self.owner.throttle_bps  # lifted mid-file: the rest comes at once
                if bps:
                    time.sleep(len(chunk) / bps)
            return
        self.wfile.write(data)


def point_clients_at(hub: LocalHub, monkeypatch) -> None:
    """Send this process's Hub clients to ``hub`` and turn offline mode off, for one test.

    ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read once at import by huggingface_hub,
    diffusers and datasets (the test session imported them offline), so besides the
    environment the copies they took are patched too. A subprocess started with the
    environment set needs none of this.
    """
    import huggingface_hub
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    assert huggingface_hub.constants is constants
    try:
        import diffusers.loaders.lora_base as lora_base
        import diffusers.utils.hub_utils as hub_utils

        monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_utils, "HF_HUB_OFFLINE", False)
    except ImportError:  # pragma: no cover - diffusers is a hard requirement
        pass
    try:
        import datasets.config as dconfig

        monkeypatch.setattr(dconfig, "HF_ENDPOINT", hub.url)
        monkeypatch.setattr(dconfig, "HUB_DATASETS_URL", hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(dconfig, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(dconfig, "HF_DATASETS_OFFLINE", False)
    except ImportError:  # pragma: no cover - datasets is a hard requirement
        pass
