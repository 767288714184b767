"""An HTTP server on loopback that serves update sets, for the keepup2date tests."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator

import pytest

__all__ = ["SetServer", "publish", "server"]


def read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class SetServer:
    """An HTTP server on 127.0.0.1 serving a folder; it can hold the download of one file
    (``hold``) until ``release`` is set, trickle one (``trickle``) a byte at a time, cut
    one (``cut``) half way, closing the connection, and records the request lines it got."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.requests: list[str] = []
        self.hold: str | None = None
        self.trickle: str | None = None
        self.cut: str | None = None
        self.holding = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=server.root, **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                server.requests.append(self.requestline)
                if self.path.startswith("http://"):  # a proxy request: serve the path part
                    self.path = "/" + self.path.split("/", 3)[3]
                if server.hold and self.path.endswith(server.hold):
                    server.holding.set()
                    server.release.wait(30)
                if server.trickle and self.path.endswith(server.trickle):
                    self.send_slowly(read(os.path.join(server.root, self.path.lstrip("/"))))
                    return
                if server.cut and self.path.endswith(server.cut):
                    self.send_half(read(os.path.join(server.root, self.path.lstrip("/"))))
                    return
                super().do_GET()

            def send_half(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True

            def send_slowly(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for offset in range(len(data)):
                    if server.release.wait(0.05):  # pacing a slow server, until the test ends
                        return
                    try:
                        self.wfile.write(data[offset:offset + 1])
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path) -> Iterator[SetServer]:
    root = tmp_path / "www"
    root.mkdir()
    instance = SetServer(str(root))
    yield instance
    instance.close()


def publish(server: SetServer, update_set: str, name: str) -> str:
    """Copy an update set under the server's folder; its URL."""
    shutil.copytree(update_set, os.path.join(server.root, name))
    return server.url(name)
