"""A tiny Hugging Face Hub stand-in on 127.0.0.1 for huggingface_hub's
``hf_hub_download``: HEAD/GET on ``/{repo}/resolve/{revision}/{filename}`` with
the headers it reads (ETag / X-Linked-Etag, X-Repo-Commit, Content-Length /
X-Linked-Size) and Range support, plus ways to break a transfer."""

import hashlib
import http.server
import re
import socket
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """``files``: {"owner/name/filename": bytes}. ``cut``: None, "once" (the first
    GET sends half the body then drops the connection) or "always" (every GET
    drops the connection after at most half the body on the first one)."""

    def __init__(self, files):
        self.files = dict(files)
        self.cut = None
        self.requests = []  # (method, path, Range header or None)
        self._gets = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _lookup(self):
                m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.path)
                if not m:
                    return None
                return hub.files.get(f"{m['repo']}/{m['file']}")

            def _not_found(self):
                body = b'{"error":"Entry not found"}'
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _headers(self, data, status, start=0):
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(status)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()

            def _drop(self):
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, None))
                data = self._lookup()
                if data is None:
                    return self._not_found()
                self._headers(data, 200)

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                data = self._lookup()
                if data is None:
                    return self._not_found()
                hub._gets += 1
                start = 0
                if rng:
                    m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                    start = int(m.group(1)) if m else 0
                first_get = hub._gets == 1
                if hub.cut == "always" and not first_get:
                    return self._drop()  # nothing at all: the client has to give up
                self._headers(data, 206 if start else 200, start)
                body = data[start:]
                if hub.cut in ("once", "always") and first_get:
                    self.wfile.write(body[: len(body) // 2])
                    return self._drop()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def file_requests(self):
        """Requests for files (huggingface_hub may also call other /api routes)."""
        return [r for r in self.requests if "/resolve/" in r[1]]

    def gets(self):
        return [r for r in self.file_requests() if r[0] == "GET"]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def unused_port():
    """A port with nothing listening on it (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
