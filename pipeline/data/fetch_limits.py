"""Bounds on one download: a connect timeout, a deadline for the whole request, a maximum response size, and
the URL schemes that may be opened at all.

img2dataset's ``timeout`` is urllib's, which applies to each socket operation: a server that sends a byte
now and then keeps a request alive forever, and ``response.read()`` holds a whole body in memory however
large it grows. :func:`limited_opener` builds a urllib opener that enforces, for each ``urlopen`` call
(redirects included):

* connecting (TCP, and the TLS handshake for https) within ``connect_timeout_s`` per network operation;
* the status line, headers and body complete within ``deadline_s`` of the call: before every read the
  socket's timeout is set to the time left, so trickling cannot stretch it;
* at most ``max_bytes`` received (a larger Content-Length is refused before the body is read);
* only ``schemes`` opened: http and https by default, and urllib's own handlers for ftp, file or data when
  explicitly allowed (the limits above then do not apply to them).

A request that breaks a limit raises an ``OSError`` whose message starts with the reason it is counted
under (``download_deadline: ...``), which is what img2dataset records as the row's error message. Name
resolution (DNS) happens before the connection and is bounded by the system resolver, not by these limits.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from pipeline.data.reasons import CONNECT_TIMEOUT, DOWNLOAD_DEADLINE, RESPONSE_TOO_LARGE, URL_SCHEME_NOT_ALLOWED

HTTP_SCHEMES = ("http", "https")
OTHER_SCHEME_HANDLERS = {"ftp": urllib.request.FTPHandler, "file": urllib.request.FileHandler,
                         "data": urllib.request.DataHandler}
LIMIT_REASONS = (CONNECT_TIMEOUT, DOWNLOAD_DEADLINE, RESPONSE_TOO_LARGE, URL_SCHEME_NOT_ALLOWED)


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout_s: float = 5.0
    deadline_s: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    schemes: tuple[str, ...] = HTTP_SCHEMES


class FetchLimitError(OSError):
    """A request stopped by a limit; ``reason`` is its counter name and starts the message."""

    reason = ""

    def __init__(self, detail: str):
        super().__init__(f"{self.reason}: {detail}")


class ConnectTimeout(FetchLimitError):
    reason = CONNECT_TIMEOUT


class DeadlineExceeded(FetchLimitError):
    reason = DOWNLOAD_DEADLINE


class ResponseTooLarge(FetchLimitError):
    reason = RESPONSE_TOO_LARGE


class SchemeNotAllowed(FetchLimitError):
    reason = URL_SCHEME_NOT_ALLOWED


def limited_opener(limits: FetchLimits) -> urllib.request.OpenerDirector:
    """An opener for ``urllib.request.install_opener`` that enforces ``limits`` (see the module docstring)."""
    opener = _LimitedOpener(limits)
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler(), _RefuseOtherSchemes(), urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()]
    if "http" in limits.schemes:
        handlers.append(_LimitedHTTPHandler())
    if "https" in limits.schemes:
        handlers.append(_LimitedHTTPSHandler())
    handlers += [OTHER_SCHEME_HANDLERS[scheme]() for scheme in limits.schemes if scheme in OTHER_SCHEME_HANDLERS]
    for handler in handlers:
        opener.add_handler(handler)
    return opener


class _Clock:
    """One request's deadline and byte budget, shared by its connections (one per redirect hop)."""

    def __init__(self, limits: FetchLimits):
        self.limits = limits
        self.expires = time.monotonic() + limits.deadline_s
        self.received = 0

    def time_left(self) -> float:
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the response was not complete within {self.limits.deadline_s:g} s")
        return left

    def count(self, received: int) -> None:
        self.received += received
        if self.received > self.limits.max_bytes:
            raise ResponseTooLarge(f"more than {self.limits.max_bytes} bytes received")


_request = threading.local()  # the clock of the urlopen call running on this thread


class _LimitedOpener(urllib.request.OpenerDirector):
    def __init__(self, limits: FetchLimits):
        super().__init__()
        self.limits = limits

    def open(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_request, "clock", None) is not None:  # a redirect of the request already running
            return super().open(*args, **kwargs)
        _request.clock = _Clock(self.limits)
        try:
            return super().open(*args, **kwargs)
        finally:
            _request.clock = None


class _RefuseOtherSchemes(urllib.request.BaseHandler):
    handler_order = 1000  # after every real handler, in place of urllib's UnknownHandler

    def unknown_open(self, req: urllib.request.Request) -> Any:
        raise SchemeNotAllowed(f"{req.type}:// is not an allowed url scheme")


class _LimitedResponse(http.client.HTTPResponse):
    """Reads through a socket whose timeout is the request's time left; refuses a too-large Content-Length."""

    def __init__(self, sock: socket.socket, *args: Any, clock: _Clock, **kwargs: Any):
        super().__init__(_LimitedSocket(sock, clock), *args, **kwargs)
        self.clock = clock

    def begin(self) -> None:
        super().begin()
        if self.length is not None and self.length > self.clock.limits.max_bytes:
            raise ResponseTooLarge(f"Content-Length {self.length} > {self.clock.limits.max_bytes} bytes")


class _LimitedSocket:
    """What ``HTTPResponse`` asks of its socket (``makefile``), with every read bounded by the clock."""

    def __init__(self, sock: socket.socket, clock: _Clock):
        self.sock, self.clock = sock, clock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_LimitedReader(self.sock.makefile(mode, buffering=0), self.sock, self.clock))


class _LimitedReader(io.RawIOBase):
    def __init__(self, raw: io.RawIOBase, sock: socket.socket, clock: _Clock):
        super().__init__()
        self.raw, self.sock, self.clock = raw, sock, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.sock.settimeout(self.clock.time_left())
        try:
            received = self.raw.readinto(buffer)
        except TimeoutError:
            raise DeadlineExceeded(f"the response was not complete within {self.clock.limits.deadline_s:g} s") \
                from None
        self.clock.count(received or 0)
        return received

    def close(self) -> None:
        self.raw.close()
        super().close()


class _LimitedConnection:
    """Mixed into http.client's connection classes: connects within the connect timeout (and the deadline)."""

    def __init__(self, *args: Any, clock: _Clock, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.response_class = functools.partial(_LimitedResponse, clock=clock)

    def connect(self) -> None:
        self.timeout = min(self.clock.limits.connect_timeout_s, self.clock.time_left())
        try:
            super().connect()
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {self.host}:{self.port} within {self.timeout:g} s") from None


class _LimitedHTTPConnection(_LimitedConnection, http.client.HTTPConnection):
    pass


class _LimitedHTTPSConnection(_LimitedConnection, http.client.HTTPSConnection):
    pass


class _LimitedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_LimitedHTTPConnection, clock=_request.clock), req)


class _LimitedHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(functools.partial(_LimitedHTTPSConnection, clock=_request.clock), req, **kwargs)
