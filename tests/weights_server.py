"""A local weights server for the tests (127.0.0.1 only): files with ``Range`` support, a connection cut midway on
demand, and the Hugging Face Hub's resolve URLs (``/ORG/REPO/resolve/REVISION/FILE`` with ``ETag``,
``X-Repo-Commit`` and ``Content-Length``). Every request is recorded (method, path, ``Range``)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: the commit the fake Hub answers for every revision (40 hex digits, as the Hub's)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        srv = self.server
        path = self.path.split("?")[0]
        srv.requests.append({"method": self.command, "path": path, "range": self.headers.get("Range")})
        data = srv.files.get(path)
        hub = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if data is None and hub and (hub.group(1), hub.group(3)) in srv.hub:
            data = srv.hub[(hub.group(1), hub.group(3))]
        if data is None or (hub and srv.hub_revisions and hub.group(2) not in srv.hub_revisions):
            self.send_response(404)
            if hub:  # as the Hub says what is missing
                known = (hub.group(1), hub.group(3)) in srv.hub
                self.send_header("X-Error-Code", "RevisionNotFound" if known else "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        wanted = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if wanted and not srv.ignore_range:
            start = int(wanted.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if hub:
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not body:
            return
        cut = srv.cut_next
        if cut is not None:  # send part of the body, then drop the connection
            srv.cut_next = None
            self.wfile.write(data[start : start + cut])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data[start:])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.hub: dict[tuple[str, str], bytes] = {}
        self.hub_revisions: set[str] = set()
        self.requests: list[dict] = []
        self.cut_next: int | None = None
        self.ignore_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def weights_server() -> Iterator[_Server]:
    """A running server (``.files[path] = bytes``, ``.hub[(repo, file)] = bytes``, ``.cut_next``, ``.requests``)."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
