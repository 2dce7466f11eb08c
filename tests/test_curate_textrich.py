"""`vssl curate textrich`: the OCR scorer on rendered text and real photos (labels known by
construction), the layout features against hand-worked cases, the VLM scorer's plumbing."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from vssl.cli import main
from vssl.curate.textrich import _aligned_fraction, _flat_fraction, heavy_score

WORDS = "annual report revenue growth table figure results market price total north".split()


def _document(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (420, 520), (250, 250, 248))
    d = ImageDraw.Draw(img)
    d.text((30, 20), "Quarterly Results", fill=(0, 0, 0), font=ImageFont.load_default(size=26))
    f = ImageFont.load_default(size=16)
    for i in range(14):
        line = " ".join(rng.choice(WORDS) for _ in range(5))
        d.text((30, 70 + 30 * i), line, fill=(20, 20, 20), font=f)
    return img


def _sign(photo: Image.Image) -> Image.Image:
    img = photo.convert("RGB")
    img.thumbnail((480, 480))
    d = ImageDraw.Draw(img)
    d.rectangle([20, 20, 260, 70], fill=(250, 220, 40))
    d.text((32, 28), "MARKET 24", fill=(0, 0, 0), font=ImageFont.load_default(size=32))
    return img


@pytest.fixture
def images(tmp_path, shared_data):
    pytest.importorskip("rapidocr_onnxruntime")
    rng = random.Random(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    _document(rng).save(folder / "doc.png")
    photo = Image.open(shared_data / "imagenet-samples" / "n02391049_zebra.JPEG")
    small = photo.convert("RGB")
    small.thumbnail((480, 480))
    small.save(folder / "photo.jpg")
    _sign(Image.open(shared_data / "imagenet-samples" / "n01530575_brambling.JPEG")).save(
        folder / "sign.jpg"
    )
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_ocr_scorer_light_heavy_and_select(images, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    argv = ["curate", "textrich", str(images), "--out", str(out), "--max-side", "480"]
    assert main([*argv, "--select", "heavy", "--quiet"]) == 0
    rows = {r["path"].rsplit("/", 1)[1]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"doc.png", "photo.jpg", "sign.jpg", "broken.jpg"}  # nothing dropped
    doc, photo, sign = rows["doc.png"], rows["photo.jpg"], rows["sign.jpg"]
    assert doc["light"] and doc["heavy"] and doc["readable_lines"] >= 10
    assert sign["light"] and not sign["heavy"] and 1 <= sign["text_score"] <= 3
    assert not photo["light"] and not photo["heavy"] and photo["text_score"] == 0
    assert doc["heavy_score"] > sign["heavy_score"] > photo["heavy_score"]
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["text_score"] is None
    assert not rows["broken.jpg"]["light"]
    subset = pq.read_table(tmp_path / "scores-heavy.parquet").column("path").to_pylist()
    assert [p.rsplit("/", 1)[1] for p in subset] == ["doc.png"]
    printed = capsys.readouterr().out
    assert "scored 3 images" in printed and "1 unreadable" in printed and "heavy: 1 rows" in printed


def test_layout_features_by_hand():
    # three boxes on one row (a table row), one far away: 3 of 4 aligned
    rects = np.array([[0, 0, 40, 10], [100, 1, 140, 11], [200, 0, 240, 10], [300, 200, 340, 212]])
    assert _aligned_fraction(rects.astype(float), width=1000) == pytest.approx(0.75)
    # two lines with the same left edge (a paragraph), one isolated
    rects = np.array([[10, 0, 300, 10], [12, 20, 200, 30], [500, 400, 560, 410]], float)
    assert _aligned_fraction(rects, width=1000) == pytest.approx(2 / 3)
    assert _aligned_fraction(rects[:1], width=1000) == 0.0
    white = np.full((100, 100, 3), 255, np.uint8)
    assert _flat_fraction(white) == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert _flat_fraction(noise) < 0.01
    assert heavy_score(0, 0, 0, 0) == 0.0
    assert heavy_score(8, 0.08, 1, 0.5) == pytest.approx(1.0)
    assert heavy_score(4, 0.04, 0.5, 0.25) == pytest.approx(0.5)


def test_bad_input(tmp_path, capsys):
    folder = tmp_path / "x"
    folder.mkdir()
    assert main(["curate", "textrich", str(folder), "--out", str(tmp_path / "s.csv")]) == 2
    assert ".parquet" in capsys.readouterr().err
    argv = ["curate", "textrich", str(folder), "--out", str(tmp_path / "s.parquet")]
    assert main([*argv, "--scorer", "vlm"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*argv, "--scorer", "vlm", "--model", str(tmp_path / "nomodel")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["curate", "textrich", str(tmp_path / "none"), "--out", argv[-1]]) == 2
    assert "not found" in capsys.readouterr().err
