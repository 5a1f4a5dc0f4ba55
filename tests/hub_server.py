"""A stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub 2.x calls to download.

    GET  /api/models/{repo}[/revision/{rev}]      repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]    file listing (recursive)
    HEAD /{repo}/resolve/{rev}/{path}              X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}              the bytes (Range requests resume)

Errors carry the X-Error-Code header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def commit_hash(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


class HubServer:
    """HubServer() as hub: hub.add("owner/name", files); hub.url is the HF_ENDPOINT to use."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []  # Authorization headers received (to check a token is sent)
        self.connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self.ranges: list[tuple[str, int]] = []  # (path, first byte) of resumed downloads
        self.cut: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], revision: str = "main", gated: bool = False) -> str:
        """Publish `files` as a new commit of repo_id, pointed at by `revision`; return the commit."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        commit = commit_hash(repo_id, revision, str(len(repo.commits)))
        repo.commits[commit] = dict(files)
        repo.refs[revision] = commit
        return commit

    def downloaded(self, repo_id: str) -> list[str]:
        """Paths whose bytes were sent (GET on resolve) for repo_id."""
        prefix = f"/{repo_id}/resolve/"
        return [p[len(prefix):].split("/", 1)[1] for m, p in self.requests if m == "GET" and p.startswith(prefix)]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()  # the port refuses new connections from here on
        for connection in list(self.connections):  # and pooled keep-alive ones stop answering
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def setup(self):
            super().setup()
            hub.connections.add(self.connection)

        def finish(self):
            hub.connections.discard(self.connection)
            super().finish()

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if self.headers.get("Authorization"):
                hub.authorizations.append(self.headers["Authorization"])
            if m := _API.match(path):
                return self._api(*m.groups())
            if m := _RESOLVE.match(path):
                return self._resolve(*m.groups(), body=body)
            self._error(404, "EntryNotFound", "no such endpoint")

        def _repo(self, repo_id: str, revision: str):
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            commit = repo.commit_of(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo, commit

        def _api(self, repo_id, kind, revision, subpath):
            found = self._repo(repo_id, revision or "main")
            if not found:
                return
            repo, commit = found
            files = repo.commits[commit]
            if kind == "tree":  # recursive listing; this server's repos have no folders to list apart
                entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in files.items() if not subpath or p.startswith(subpath.rstrip("/") + "/")]
                return self._json(entries)
            # Gated repos' info is public on the Hub; their files are not.
            self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                        "gated": "manual" if repo.gated else False, "siblings": [{"rfilename": p} for p in files]})

        def _resolve(self, repo_id, revision, filename, body):
            found = self._repo(repo_id, revision)
            if not found:
                return
            repo, commit = found
            if repo.gated:  # nobody is on this server's access list
                code = 403 if self.headers.get("Authorization") else 401
                return self._error(code, "GatedRepo", f"Access to model {repo_id} is restricted.")
            data = repo.commits[commit].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist")
            start = 0
            if m := re.match(r"bytes=(\d+)-$", self.headers.get("Range", "")):
                start = int(m.group(1))
                hub.ranges.append((filename, start))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if body and filename in hub.cut and not start:  # a dropped connection mid-file
                self.wfile.write(data[:hub.cut.pop(filename)])
                self.wfile.flush()
                self.close_connection = True
                return
            if body:
                self.wfile.write(data[start:])

        def _json(self, value):
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str):
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
