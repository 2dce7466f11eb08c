"""`vssl data download` against a local HTTP server on 127.0.0.1 (no network): every manifest row
gets a status, failures carry their reason, shards are complete and a rerun skips them."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vssl.cli import main
from vssl.data.download import download


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


GOOD = _jpeg(320, 240, 1)
ROUTES = {
    "/good.jpg": (200, GOOD),
    "/big.jpg": (200, _jpeg(400, 300, 2)),
    "/real-png.jpg": (200, _png(64, 48)),  # a PNG served under a .jpg name
    "/page.jpg": (200, b"<!DOCTYPE html><html><body>Not found</body></html>"),
    "/trunc.jpg": (200, GOOD[: len(GOOD) // 2]),
    "/empty.jpg": (200, b""),
    "/tiny.jpg": (200, _jpeg(20, 20, 3)),
    "/wide.jpg": (200, _jpeg(300, 50, 4)),
    "/noai.jpg": (200, GOOD),
}
HITS: dict[str, int] = {}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        HITS[self.path] = HITS.get(self.path, 0) + 1
        if self.path == "/slow.jpg":
            time.sleep(3)
        if self.path == "/redirect.jpg":
            self.send_response(302)
            self.send_header("Location", "/good.jpg")
            self.end_headers()
            return
        if self.path == "/flaky.jpg" and HITS[self.path] == 1:  # 503 once, then the image
            self.send_error(503)
            return
        code, body = ROUTES.get(self.path, (404, b""))
        if self.path in ("/slow.jpg", "/flaky.jpg"):
            code, body = 200, GOOD
        if code != 200:
            self.send_error(code)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/noai.jpg":
            self.send_header("X-Robots-Tag", "noai")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


EXPECTED = {
    "/good.jpg": "success",
    "/big.jpg": "success",
    "/real-png.jpg": "success",
    "/redirect.jpg": "success",
    "/flaky.jpg": "success",
    "/missing.jpg": "http_404",
    "/page.jpg": "not_an_image",
    "/trunc.jpg": "truncated",
    "/empty.jpg": "empty",
    "/slow.jpg": "timeout",
    "/tiny.jpg": "too_small",
    "/wide.jpg": "aspect_ratio",
    "/noai.jpg": "opted_out",
    "/good.jpg#dup": "duplicate_url",
}


def _manifest(tmp_path, server, url_col="url", caption_col="text"):
    urls = [server + p.split("#")[0] for p in EXPECTED]
    urls += [f"http://127.0.0.1:{_closed_port()}/x.jpg", None, "not a url"]
    rows = {
        url_col: urls,
        caption_col: [f"caption {i}" for i in range(len(urls))],
        "clip_similarity_vitb32": np.linspace(0.1, 0.4, len(urls)).tolist(),
        "id": list(range(len(urls))),
    }
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def _all_rows(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pylist()


def test_every_row_gets_its_status(tmp_path, server):
    HITS.clear()
    man = _manifest(tmp_path, server)
    out = tmp_path / "out"
    summary = download(
        man, out, samples_per_shard=6, timeout=1.0, retries=1, min_image_size=32,
        max_aspect_ratio=3, threads=8,
    )  # fmt: skip
    rows = _all_rows(out)
    assert len(rows) == len(EXPECTED) + 3  # one row per manifest row, failures included
    got = [r["status"] for r in rows]
    assert got == list(EXPECTED.values()) + ["connection_error", "missing_url", "invalid_url"]
    assert all(r["error_message"] for r in rows if r["status"] != "success")
    assert "HTML" in rows[6]["error_message"]
    assert rows[0]["key"] == "000000000" and rows[6]["key"] == "000010000"
    assert summary["count"] == len(rows) and summary["successes"] == 5
    assert summary["status"]["timeout"] == 1 and summary["shards_finished"] == 3
    # the tar holds exactly the successes, the real format, the caption and the other columns
    ok = {r["key"]: r for r in rows if r["status"] == "success"}
    seen = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                seen[m.name] = tf.extractfile(m).read()
    assert {n.split(".")[0] for n in seen} == set(ok)
    k_png = rows[2]["key"]
    assert f"{k_png}.png" in seen and f"{k_png}.jpg" not in seen
    assert seen[f"{rows[0]['key']}.jpg"] == GOOD  # no resize asked: the original bytes
    assert seen[f"{rows[0]['key']}.txt"] == b"caption 0"
    meta = json.loads(seen[f"{rows[0]['key']}.json"])
    assert meta["url"] == server + "/good.jpg" and meta["id"] == 0 and meta["width"] == 320
    assert "text" not in meta
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 5, "00001.tar": 0, "00002.tar": 0}


def test_resize_modes(tmp_path, server):
    man = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": [server + "/big.jpg", server + "/good.jpg"]}), man)

    def images(out):
        with tarfile.open(out / "00000.tar") as tf:
            return [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]

    download(
        man, tmp_path / "a", image_size=240, resize_mode="keep_ratio", resize_only_if_bigger=True
    )
    keep = images(tmp_path / "a")
    assert Image.open(io.BytesIO(keep[0])).size == (320, 240)  # 400x300 -> short side 240
    assert keep[1] == GOOD  # short side already 240: untouched bytes
    download(man, tmp_path / "b", image_size=100, resize_mode="center_crop")
    crops = images(tmp_path / "b")
    assert [Image.open(io.BytesIO(c)).size for c in crops] == [(100, 100), (100, 100)]
    rows = _all_rows(tmp_path / "b")
    assert (rows[0]["original_width"], rows[0]["width"]) == (400, 100)


def test_rerun_skips_finished_shards_and_completes_the_rest(tmp_path, server):
    urls = [server + "/good.jpg", server + "/big.jpg", server + "/real-png.jpg"]
    man = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": urls, "text": ["a", "b", "c"]}), man)
    out = tmp_path / "out"
    download(man, out, samples_per_shard=1)
    (out / "00001_stats.json").unlink()  # as if interrupted before shard 1 was finished
    (out / "00002.tar").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[0]*")}
    HITS.clear()
    summary = download(man, out, samples_per_shard=1)
    assert HITS == {"/big.jpg": 1, "/real-png.jpg": 1}  # only the unfinished shards
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[0]*")} == before
    assert summary["successes"] == 3 and summary["downloaded_shards_this_run"] == 2
    with pytest.raises(ValueError, match="samples_per_shard differ"):
        download(man, out, samples_per_shard=2)


def test_cli_columns_errors_and_inspect(tmp_path, server, capsys):
    man = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table({"URL": [server + "/good.jpg", server + "/missing.jpg"], "TEXT": ["x", "y"]}), man
    )
    out = tmp_path / "out"
    assert main(["data", "download", str(man), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no URL column 'url'" in err and "URL, TEXT" in err and "--url-col" in err
    argv = ["data", "download", str(man), str(out), "--url-col", "URL", "--quiet"]
    assert main([*argv, "--caption-col", "caption"]) == 2
    assert "no caption column 'caption'" in capsys.readouterr().err
    assert main([*argv, "--caption-col", "TEXT"]) == 0
    printed = capsys.readouterr().out
    assert "1/2 images (50.0% success)" in printed and "http_404" in printed
    with tarfile.open(out / "00000.tar") as tf:
        assert tf.extractfile("000000000.txt").read() == b"x"
    assert main(["data", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "50.0% success" in printed and "http_404" in printed and "00000.tar" in printed


def test_processes(tmp_path, server):
    urls = [server + "/good.jpg", server + "/missing.jpg", server + "/big.jpg"]
    man = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": urls}), man)
    summary = download(man, tmp_path / "out", samples_per_shard=1, processes=2)
    assert summary["status"] == {"success": 2, "http_404": 1}
    assert [r["status"] for r in _all_rows(tmp_path / "out")] == ["success", "http_404", "success"]
