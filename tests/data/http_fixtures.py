"""HTTP servers on 127.0.0.1: hostile ones for the download limits (a tarpit that trickles its body or its
headers, an endless body, a lying Content-Length, a server that never answers, one that never accepts, a
redirect to a local file), and a plain one that counts what it is asked for."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TRICKLE_PAUSE_S = 0.2
ENDLESS_CAP = 256 * 1024 * 1024  # a safety cap so a client without a size limit fails instead of hanging
CHUNK = b"\0" * 65536


class HostileHandler(BaseHTTPRequestHandler):
    """Paths: /trickle (a byte per pause, forever), /trickle-headers, /endless (no length, streams until the
    client goes), /huge-length (claims 10 GiB), /silent (reads the request, never answers), /to-file (a redirect
    to file:///etc/hostname), /image (``image`` bytes); anything else 404."""

    protocol_version = "HTTP/1.1"

    def __init__(self, *args, image: bytes, stop: threading.Event, **kwargs):
        self.image, self.stop = image, stop
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        route = {"/trickle": self.trickle, "/trickle-headers": self.trickle_headers, "/endless": self.endless,
                 "/huge-length": self.huge_length, "/silent": self.silent, "/to-file": self.to_file,
                 "/image": self.send_image}.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
            return
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what a limited client is expected to do

    def trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.flush()
        for byte in self.image:
            if self.stop.wait(TRICKLE_PAUSE_S):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def trickle_headers(self) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + b"X-Padding: " + b"a" * 10_000:
            if self.stop.wait(TRICKLE_PAUSE_S):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        while sent < ENDLESS_CAP and not self.stop.is_set():
            self.wfile.write(CHUNK)
            sent += len(CHUNK)

    def huge_length(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(10 << 30))
        self.end_headers()
        sent = 0
        while sent < ENDLESS_CAP and not self.stop.is_set():
            self.wfile.write(CHUNK)
            sent += len(CHUNK)

    def silent(self) -> None:
        self.stop.wait(60)

    def to_file(self) -> None:
        self.send_response(302)
        self.send_header("Location", "file:///etc/hostname")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_image(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, format, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@contextmanager
def hostile_server(image: bytes) -> Iterator[str]:
    """Run :class:`HostileHandler` on a free port; yields the base url (no trailing slash)."""
    stop = threading.Event()
    server = _Server(("127.0.0.1", 0), functools.partial(HostileHandler, image=image, stop=stop))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


@contextmanager
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full, so a new connection attempt hangs until the client's timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port), timeout=1)  # fills the queue of length 0
    try:
        yield port
    finally:
        queued.close()
        listener.close()


def elapsed(call, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result or the exception raised) of one call."""
    started = time.monotonic()
    try:
        result = call(*args, **kwargs)
    except Exception as exc:  # the tests look at which one
        result = exc
    return time.monotonic() - started, result


class _CountingHandler(SimpleHTTPRequestHandler):
    """Serves a folder; counts the GET requests of each path, waiting ``delay_s`` before each answer."""

    def __init__(self, *args, counts: Counter, lock: threading.Lock, delay_s: float, **kwargs):
        self.counts, self.lock, self.delay_s = counts, lock, delay_s
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        with self.lock:
            self.counts[self.path] += 1
        time.sleep(self.delay_s)
        super().do_GET()

    def log_message(self, format, *args) -> None:
        pass


@contextmanager
def counting_server(folder: Path, delay_s: float = 0.0) -> Iterator[tuple[str, Counter]]:
    """Serve ``folder`` on 127.0.0.1; yields the base url (no trailing slash) and the live request counts."""
    counts: Counter = Counter()
    handler = functools.partial(_CountingHandler, directory=str(folder), counts=counts, lock=threading.Lock(),
                                delay_s=delay_s)
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counts
    finally:
        server.shutdown()
        server.server_close()
