"""A real img2dataset download from HTTP servers on 127.0.0.1: the stage's own server for relative urls, a
misbehaving one (404s, a 500, a slow url, a non-image), and hostile ones (a tarpit, an endless body, a
lying Content-Length, a server that never answers) that must not hold the download past its deadline."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.data.manifest import Manifest
from pipeline.data.reasons import is_documented
from pipeline.data.settings import DataCompShardSettings
from stages import shard_datacomp
from tests.data.http_fixtures import hostile_server
from tests.data.shard_fixtures import jpeg, stage_context

SLOW_S = 4.0


class MisbehavingHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        if self.path.startswith("/error"):
            self.send_error(500)
        elif self.path.startswith("/slow"):
            time.sleep(SLOW_S)
            self.send_error(404)
        elif self.path.startswith("/page"):
            body = b"<html><body>an html page, not an image</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, format, *args) -> None:
        pass


@contextmanager
def misbehaving_server(folder: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(MisbehavingHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def uid(n: int) -> str:
    return hashlib.md5(f"dl{n}".encode()).hexdigest()


@pytest.mark.slow
def test_download_counts_http_failures_and_shards_the_rest(tmp_path):
    demo = tmp_path / "datacomp"
    (demo / "images").mkdir(parents=True)
    rows, expected = [], Counter()

    def add(n: int, url: str, outcome: str, text: str | None = None, row_uid: str | None = None) -> None:
        rows.append({"uid": row_uid or uid(n), "url": url, "text": f"a demo caption {n}" if text is None else text,
                     "clip_score": n / 100})
        expected[outcome] += 1

    for n in range(12):
        (demo / "images" / f"{uid(n)}.jpg").write_bytes(jpeg(n, (64, 64)))
        add(n, f"images/{uid(n)}.jpg", "kept")
    with misbehaving_server(demo) as bad:
        add(20, f"{bad}/missing/a.jpg", "http_404")
        add(21, f"{bad}/missing/b.jpg", "http_404")
        add(22, f"{bad}/error.jpg", "http_500")
        add(23, f"{bad}/slow.jpg", "download_deadline")
        add(24, f"{bad}/page.jpg", "not_an_image")
        add(25, f"images/{uid(0)}.jpg", "duplicate_uid", row_uid=uid(0))
        add(26, f"images/{uid(1)}.jpg", "empty_caption", text="")
        add(27, f"images/{uid(2)}.jpg", "not_in_uid_subset")
        pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), demo / "metadata.parquet")
        subset = np.array(sorted((int(r["uid"][:16], 16), int(r["uid"][16:], 16))
                                 for r in rows if r["uid"] != uid(27)), dtype="u8,u8")
        np.save(tmp_path / "subset.npy", subset)

        ctx = stage_context(tmp_path, "shard_datacomp", {"demo_data": tmp_path})
        settings = DataCompShardSettings(
            source="@demo_data/datacomp", serve_local=True, uid_subset=str(tmp_path / "subset.npy"),
            samples_per_shard=5, download_shard_size=10, timeout_s=1.0, thread_count=4, workers=1,
            extra_columns=["clip_score"])
        started = time.monotonic()
        outputs = shard_datacomp.run(settings, ctx)
        elapsed = time.monotonic() - started

    directory = ctx.out_dir / "train"
    manifest = Manifest.load(directory)
    assert manifest.skipped == {reason: n for reason, n in expected.items() if reason != "kept"}
    assert outputs["train_samples"] == manifest.num_samples == expected["kept"]
    assert not (ctx.out_dir / "_download").exists()
    assert elapsed < 300
    samples = list(wds.WebDataset([str(p) for p in manifest.shard_paths(directory)], shardshuffle=False)
                   .decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert [key for key, *_ in samples] == sorted(key for key, *_ in samples)
    assert sorted(meta["uid"] for *_, meta in samples) == sorted(uid(n) for n in range(12))
    for _, image, caption, meta in samples:
        n = int(caption.rsplit(" ", 1)[1])
        assert meta["url"] == f"images/{uid(n)}.jpg" and image.size == (64, 64) and meta["clip_score"] == n / 100
    report = json.loads((ctx.out_dir / "report.json").read_text())["train"]
    assert Counter(s["reason"] for s in report["skipped_samples"]) == Counter(
        {r: n for r, n in expected.items() if r not in ("kept", "not_in_uid_subset")})


@pytest.mark.slow
def test_hostile_servers_and_rows_cannot_hold_or_poison_the_download(tmp_path):
    """Tarpits are cut at the deadline, endless bodies at the size limit, file:// and ftp:// urls and null uids
    never reach img2dataset; integer uids (a second metadata file) are kept as strings. All of it is counted
    in the manifest and listed in report.json."""
    demo = tmp_path / "metadata"
    (demo / "images").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(jpeg(99, (64, 64)))  # a local file a url list must not pull in
    for n in range(4):
        (demo / "images" / f"{n}.jpg").write_bytes(jpeg(n, (64, 64)))
    with hostile_server(jpeg(50, (64, 64))) as hostile:
        rows = {  # url -> expected outcome
            f"{hostile}/image": "kept", "images/0.jpg": "kept", "images/1.jpg": "kept",
            f"{hostile}/trickle": "download_deadline", f"{hostile}/trickle-headers": "download_deadline",
            f"{hostile}/silent": "download_deadline", f"{hostile}/endless": "response_too_large",
            f"{hostile}/huge-length": "response_too_large",
            (tmp_path / "secret.jpg").as_uri(): "url_scheme_not_allowed",
            "ftp://127.0.0.1/x.jpg": "url_scheme_not_allowed",
        }
        uids = [uid(n) for n in range(len(rows))]
        table = {"uid": uids + [None], "url": [*rows, "images/2.jpg"],
                 "text": [f"caption {n}" for n in range(len(rows) + 1)]}
        pq.write_table(pa.table(table), demo / "a.parquet")
        pq.write_table(pa.table({"uid": pa.array([7, 2**40], pa.int64()), "url": ["images/3.jpg", "images/2.jpg"],
                                 "text": ["int uid 7", "int uid 2**40"]}), demo / "b.parquet")
        expected = Counter(rows.values()) + Counter({"missing_uid": 1, "kept": 2})
        ctx = stage_context(tmp_path, "shard_datacomp", {"demo_data": tmp_path})
        settings = DataCompShardSettings(source="@demo_data/metadata", serve_local=True, samples_per_shard=10,
                                           timeout_s=2.0, connect_timeout_s=1.0, max_response_bytes=1 << 20,
                                           thread_count=4, workers=1)
        started = time.monotonic()
        shard_datacomp.run(settings, ctx)
        elapsed = time.monotonic() - started

    assert elapsed < 120  # img2dataset's start-up included; a tarpit alone would take minutes
    directory = ctx.out_dir / "train"
    manifest = Manifest.load(directory)
    assert manifest.skipped == {reason: n for reason, n in expected.items() if reason != "kept"}
    assert all(is_documented(reason) for reason in manifest.skipped)
    assert manifest.num_samples == expected["kept"]
    metas = [meta for (meta,) in wds.WebDataset([str(p) for p in manifest.shard_paths(directory)],
                                                 shardshuffle=False).decode().to_tuple("json")]
    assert sorted(meta["uid"] for meta in metas) == sorted([uid(0), uid(1), uid(2), "7", str(2**40)])
    report = json.loads((ctx.out_dir / "report.json").read_text())["train"]
    listed = Counter(s["reason"] for s in report["skipped_samples"])
    assert listed == Counter({reason: n for reason, n in expected.items() if reason != "kept"})
    assert {s["detail"] for s in report["skipped_samples"] if s["reason"] == "url_scheme_not_allowed"} == {
        (tmp_path / "secret.jpg").as_uri(), "ftp://127.0.0.1/x.jpg"}
