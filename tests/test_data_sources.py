"""Data sources and packing: folder == shards, parquet round trip, hostile tars, `vssl data` CLI."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vssl.data.pack import add_data_parser, inspect_shards, pack, parse_size
from vssl.data.sources import FileSource, ShardSource, expand_shards, make_key, open_source

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = SHARED_DATA / "cifar10-subset" / "train"
PER_CLASS = 20  # 10 classes x 20 = 200 images


def _jpeg(size=(32, 24), color=(200, 30, 30), quality=90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(size=(20, 20), color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found: these tests need the real images in ../shared/data")
    root = tmp_path_factory.mktemp("cifar") / "train"
    for cls in sorted(p.name for p in CIFAR.iterdir() if p.is_dir()):
        (root / cls).mkdir(parents=True)
        for f in sorted((CIFAR / cls).iterdir())[:PER_CLASS]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def cifar_shards(cifar_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    stats = pack(cifar_folder, out, samples_per_shard=50, prefix="train")
    assert stats.samples == 10 * PER_CLASS and not stats.skipped
    return out


def test_folder_and_shards_give_the_same_samples(cifar_folder, cifar_shards):
    folder = list(FileSource(cifar_folder))
    assert sorted(json.loads((cifar_shards / "sizes.json").read_text()).items()) == [
        (f"train-{i:06d}.tar", 50) for i in range(4)
    ]
    assert json.loads((cifar_shards / "classes.json").read_text())[0] == "airplane"
    shards = list(ShardSource(str(cifar_shards / "train-{000000..000003}.tar")))
    assert len(folder) == len(shards) == 200
    assert [s.key for s in folder] == [s.key for s in shards]
    assert folder[0].key == "airplane/0000" and folder[0].label == 0 and folder[-1].label == 9
    for a, b in zip(folder, shards):
        assert a.label == b.label and a.caption is None and b.caption is None
        assert b.image.mode == "RGB"
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # original bytes stored: the member is byte-identical to the file
    with tarfile.open(cifar_shards / "train-000000.tar") as tf:
        member = tf.extractfile("airplane/0000.jpg").read()
    assert member == (cifar_folder / "airplane" / "0000.jpg").read_bytes()
    # raw mode gives the same bytes without decoding
    raw = next(iter(ShardSource(cifar_shards, decode=False)))
    assert raw.image == member


def test_inspect_report(cifar_shards):
    rep = inspect_shards(str(cifar_shards / "train-{000000..000003}.tar"))
    assert rep["totals"]["samples"] == 200 and rep["totals"]["shards"] == 4
    assert rep["totals"]["formats"] == {"jpg": 200} and rep["totals"]["labels"] == 200
    assert rep["totals"]["unreadable"] == 0
    assert all(r["samples"] == 50 and r["bytes"] > 0 for r in rep["shards"])


def test_parquet_manifest_round_trip(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(_jpeg())
    (imgs / "b.jpg").write_bytes(_png())  # a PNG named .jpg: stored as .png (real format)
    (imgs / "c.webp").write_bytes(b"")  # zero bytes: skipped
    Image.new("RGB", (16, 16), (0, 0, 255)).save(imgs / "d.webp", "WEBP", lossless=True)
    table = pa.table(
        {
            "id": [101, 102, 103, 104, 105],
            "url": [
                "imgs/a.jpg",
                f"file://{imgs / 'b.jpg'}",
                "imgs/c.webp",
                "https://example.com/x.jpg",
                str(imgs / "d.webp"),
            ],
            "text": ["a red box", "a green box", "empty", "remote", None],
            "width": [32, 20, 0, 1, 16],
            "clip_similarity_vitb32": [0.31, 0.25, 0.0, 0.1, 0.5],
        }
    )
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)

    src = FileSource(manifest)
    got = list(src)
    assert [s.key for s in got] == ["101", "102", "105"]
    assert got[0].caption == "a red box" and got[2].caption is None and got[0].label is None
    assert got[0].metadata == {"width": 32, "clip_similarity_vitb32": 0.31}
    reasons = dict(src.skipped)
    assert reasons["103"].startswith("zero bytes") and "no network" in reasons["104"]

    out = tmp_path / "out"
    stats = pack(manifest, out, samples_per_shard=2)
    assert stats.samples == 3 and dict(stats.formats) == {"jpg": 1, "png": 1, "webp": 1}
    assert {k for k, _ in stats.skipped} == {"103", "104"}
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 2,
        "shard-000001.tar": 1,
    }
    with tarfile.open(out / "shard-000000.tar") as tf:
        assert sorted(tf.getnames()) == [
            "101.jpg",
            "101.json",
            "101.txt",
            "102.json",
            "102.png",
            "102.txt",
        ]
    back = list(ShardSource(out))
    assert [(s.key, s.caption, s.metadata) for s in back] == [
        (s.key, s.caption, s.metadata) for s in got
    ]
    for a, b in zip(got, back):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    rep = inspect_shards(out)
    assert rep["totals"]["samples"] == 3 and rep["totals"]["captions"] == 2


def _add(tf: tarfile.TarFile, name: str, data: bytes, type_=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    info.type = type_
    if type_ == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    tf.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


@pytest.fixture
def hostile_tar(tmp_path) -> Path:
    path = tmp_path / "bad-000000.tar"
    good = _jpeg()
    with tarfile.open(path, "w") as tf:
        _add(tf, "good.jpg", good)
        _add(tf, "good.cls", b"3")
        _add(tf, "good.pyd", b"\x80\x04cos\nsystem\n.")  # a pickle: must never be loaded
        _add(tf, "trunc.jpg", good[: len(good) // 2])
        _add(tf, "../evil.jpg", good)
        _add(tf, "/abs.jpg", good)
        _add(tf, "sub/../../up.jpg", good)
        _add(tf, "link.jpg", b"", tarfile.SYMTYPE)
        _add(tf, "html.jpg", b"<html>not an image</html>")
        _add(tf, "badcls.jpg", good)
        _add(tf, "badcls.cls", b"cat")
        _add(tf, "last.png", _png())
    return path


def test_hostile_tar_is_skipped_and_listed(hostile_tar):
    src = ShardSource(str(hostile_tar))
    got = list(src)
    assert [(s.key, s.label) for s in got] == [("good", 3), ("last", None)]
    assert "pyd" not in got[0].metadata
    reasons = dict(src.skipped)
    assert reasons["bad-000000.tar:trunc"] == "truncated file"
    assert "refused" in reasons["bad-000000.tar:../evil.jpg"]
    assert "refused" in reasons["bad-000000.tar:/abs.jpg"]
    assert "refused" in reasons["bad-000000.tar:sub/../../up.jpg"]
    assert "not an image" in reasons["bad-000000.tar:html"]
    assert ".cls" in reasons["bad-000000.tar:badcls"]
    assert len(src.skipped) == 6 and "6 skipped" in src.skipped.summary()

    rep = inspect_shards(hostile_tar)
    assert rep["totals"]["samples"] == 2 and rep["totals"]["unreadable"] == 6


def test_cut_off_shard_keeps_what_was_read(tmp_path):
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(3):
            _add(tf, f"{i:03d}.jpg", _jpeg(size=(64, 64), quality=100))
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])  # cut inside 002.jpg
    src = ShardSource(path)
    got = list(src)
    assert [s.key for s in got] == ["000", "001"]
    assert "unreadable shard" in list(src.skipped)[0][1]


def test_folder_labels_keys_and_lists(tmp_path):
    root = tmp_path / "f"
    for cls in ("zebra", "ant"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.v2.jpg").write_bytes(_jpeg())
    (root / "ant" / "x_v2.jpg").write_bytes(_jpeg())  # collides with make_key("x.v2.jpg")
    (root / "loose.png").write_bytes(_png())
    (root / "ant" / "notes.txt").write_text("not an image")
    src = FileSource(root)
    assert src.classes == ["ant", "zebra"]
    got = list(src)
    assert [(s.key, s.label) for s in got] == [
        ("ant/x_v2", 0),
        ("ant/x_v2_1", 0),
        ("loose", None),
        ("zebra/x_v2", 1),
    ]
    assert list(dict(src.skipped)) == ["ant/notes"]
    assert make_key("a/b.c.jpg") == "a/b_c"

    lst = tmp_path / "files.txt"
    lst.write_text(f"f/ant/x_v2.jpg\t7\n# comment\n{root / 'loose.png'}\t2\n")
    got = list(FileSource(lst))
    assert [(s.key, s.label) for s in got] == [("f/ant/x_v2", 7), ("f/loose", 2)]
    assert isinstance(open_source(lst), FileSource)
    assert isinstance(open_source(str(tmp_path / "s-{000..002}.tar")), ShardSource)
    assert expand_shards(str(tmp_path / "s-{000..002}.tar"))[-1].endswith("s-002.tar")


def test_embed_list_inputs_still_importable():
    from vssl.data.listing import list_inputs as moved
    from vssl.embed import list_inputs

    assert list_inputs is moved


def test_pack_splits_by_size_and_refuses_existing_shards(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # noise: ~12 KB per PNG
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    out = tmp_path / "out"
    limit = 40_000
    stats = pack(root, out, samples_per_shard=100, max_shard_bytes=limit)
    assert sum(stats.shards.values()) == 6 and len(stats.shards) == 3
    for name in stats.shards:
        assert (out / name).stat().st_size <= limit
    with pytest.raises(FileExistsError):
        pack(root, out)
    assert parse_size("1GB") == 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("0") is None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vssl")
    add_data_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_pack_and_inspect(tmp_path, capsys, hostile_tar):
    root = tmp_path / "in"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(3):
        (root / "cat" / f"{i}.jpg").write_bytes(_jpeg())
        (root / "dog" / f"{i}.png").write_bytes(_png())
    (root / "dog" / "broken.jpg").write_bytes(_jpeg()[:100])
    parser = _parser()
    args = parser.parse_args(
        [
            "data",
            "pack",
            str(root),
            str(tmp_path / "out"),
            "--samples-per-shard",
            "4",
            "--max-shard-size",
            "1MB",
            "--prefix",
            "pets",
        ]
    )
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "packed 6 samples into 2 shards" in out and "dog/broken" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "pets-000000.tar",
        "pets-000001.tar",
    ]

    args = parser.parse_args(
        [
            "data",
            "inspect",
            str(tmp_path / "out" / "pets-{000000..000001}.tar"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.func(args) == 0
    out, _ = capsys.readouterr()
    assert "TOTAL (2 shards)" in out and "jpg:3" in out and "png:3" in out
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["samples"] == 6

    args = parser.parse_args(["data", "inspect", str(hostile_tar)])
    assert args.func(args) == 0
    assert "../evil.jpg" in capsys.readouterr().out

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        _add(tf, "x.jpg", b"garbage")
    args = parser.parse_args(["data", "inspect", str(empty)])
    assert args.func(args) == 1

    for sub in ("pack", "inspect"):
        with pytest.raises(SystemExit):
            parser.parse_args(["data", sub, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_cli_pack_empty_folder_and_inspect_missing_path_say_why(tmp_path, capsys):
    """Issue 16: an empty folder is "no images found", a missing shard "does not exist" (not a
    table row of zeros)."""
    parser = _parser()
    empty = tmp_path / "empty"
    empty.mkdir()
    args = parser.parse_args(["data", "pack", str(empty), str(tmp_path / "out")])
    assert args.func(args) == 1
    assert f"no images found in {empty}" in capsys.readouterr().err

    missing = tmp_path / "nope.tar"
    args = parser.parse_args(["data", "inspect", str(missing)])
    assert args.func(args) == 2
    out, err = capsys.readouterr()
    assert f"{missing} does not exist" in err and "TOTAL" not in out


def test_remote_shards_over_http_and_pipe(shared_data, tmp_path, monkeypatch):
    """URL shards go through webdataset.gopen: an http server on 127.0.0.1 (no outside network)
    and a ``pipe:`` command give the local shards' samples; sizes.json is fetched beside http
    shards so the epoch length is known."""
    import functools
    import http.server
    import shutil as _sh
    import threading

    from vssl.data.pack import pack
    from vssl.data.sources import ShardSource, read_sizes
    from vssl.data.stream import ShardStream

    if _sh.which("curl") is None:
        pytest.skip("webdataset reads http shards with curl, which is not installed")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    src = tmp_path / "src"
    for cls in ("airplane", "cat"):
        (src / cls).mkdir(parents=True)
        for f in sorted((shared_data / "cifar10-subset" / "test" / cls).glob("*.jpg"))[:6]:
            _sh.copy(f, src / cls / f.name)
    pack(src, tmp_path / "sh", samples_per_shard=5)
    local = [(s.key, s.label, s.image) for s in ShardSource(tmp_path / "sh", decode=False)]
    assert len(local) == 12

    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "sh")
    )
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000002}}.tar"
        assert sum(read_sizes(ShardSource(url).shards).values()) == 12
        remote = [(s.key, s.label, s.image) for s in ShardSource(url, decode=False)]
        assert remote == local
        stream = ShardStream(url, rank=0, world_size=1, shuffle=False)
        assert len(stream) == 12 and sorted(s.key for s in stream) == sorted(k for k, _, _ in local)
    finally:
        server.shutdown()
    pipe = f"pipe:cat {tmp_path}/sh/shard-{{000000..000002}}.tar"
    assert read_sizes(ShardSource(pipe).shards) is None  # a pipe has no folder to look in
    assert [(s.key, s.label, s.image) for s in ShardSource(pipe, decode=False)] == local
