"""The download limits against real misbehaving servers on 127.0.0.1, through ``urllib.request.urlopen`` as
img2dataset calls it (its fetch is ``urlopen(request, timeout=timeout)`` then ``read()``)."""

from __future__ import annotations

import urllib.request

import pytest

from pipeline.data.datacomp_source import download_problem
from pipeline.data.fetch_limits import (
    ConnectTimeout,
    DeadlineExceeded,
    FetchLimits,
    ResponseTooLarge,
    SchemeNotAllowed,
    limited_opener,
)
from tests.data.http_fixtures import elapsed, hostile_server, unaccepting_port
from tests.data.shard_fixtures import jpeg

LIMITS = FetchLimits(connect_timeout_s=0.5, deadline_s=1.0, max_bytes=1 << 20)
IMAGE = jpeg(1, (64, 64))


@pytest.fixture
def limited():
    """img2dataset's ``urlopen`` goes through the limited opener while a test runs."""
    urllib.request.install_opener(limited_opener(LIMITS))
    yield
    urllib.request.install_opener(None)


def fetch(url: str) -> bytes:
    """What img2dataset's ``download_image`` does with a url (its timeout is the per-read one)."""
    request = urllib.request.Request(url, headers={"User-Agent": "test"})
    with urllib.request.urlopen(request, timeout=LIMITS.deadline_s) as response:
        return response.read()


@pytest.fixture(scope="module")
def server():
    with hostile_server(IMAGE) as url:
        yield url


def test_a_good_image_downloads_whole(limited, server):
    assert fetch(f"{server}/image") == IMAGE


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers", "/silent"])
def test_a_tarpit_is_cut_at_the_deadline(limited, server, path):
    seconds, result = elapsed(fetch, f"{server}{path}")
    assert isinstance(result, DeadlineExceeded), result
    assert LIMITS.deadline_s - 0.1 < seconds < LIMITS.deadline_s + 1.0  # slack for a loaded machine
    assert download_problem("failed_to_download", str(result)) == "download_deadline"


@pytest.mark.parametrize("path", ["/endless", "/huge-length"])
def test_a_body_over_the_size_limit_is_abandoned_while_streaming(limited, server, path):
    seconds, result = elapsed(fetch, f"{server}{path}")
    assert isinstance(result, ResponseTooLarge), result
    assert seconds < LIMITS.deadline_s
    assert download_problem("failed_to_download", str(result)) == "response_too_large"


def test_a_connection_that_is_never_accepted_times_out(limited):
    with unaccepting_port() as port:
        seconds, result = elapsed(fetch, f"http://127.0.0.1:{port}/image")
    assert isinstance(getattr(result, "reason", None), ConnectTimeout), result
    assert LIMITS.connect_timeout_s - 0.1 < seconds < LIMITS.connect_timeout_s + 1.0
    assert download_problem("failed_to_download", str(result)) == "connect_timeout"


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/x.jpg", "data:image/jpeg;base64,AAAA"])
def test_other_schemes_are_refused_unless_allowed(limited, url):
    _, result = elapsed(fetch, url)
    assert isinstance(result, SchemeNotAllowed), result
    assert download_problem("failed_to_download", str(result)) == "url_scheme_not_allowed"


def test_an_explicitly_allowed_scheme_is_opened(tmp_path):
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    opener = limited_opener(FetchLimits(schemes=("http", "https", "file")))
    with opener.open((tmp_path / "a.jpg").as_uri()) as response:
        assert response.read() == IMAGE


def test_the_deadline_spans_the_whole_request_not_each_read(server):
    """A trickle that delivers a byte well within every per-read timeout is still cut at the deadline."""
    opener = limited_opener(FetchLimits(deadline_s=1.5))
    seconds, result = elapsed(lambda: opener.open(f"{server}/trickle", timeout=30).read())
    assert isinstance(result, DeadlineExceeded) and seconds < 2.0
