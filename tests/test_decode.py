"""open_image on a corpus of the files that break real runs: each is RGB out or a clear error."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vssl.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth noise: compresses like a photo (a flat image would be too small to truncate well)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _reason(path, **kw) -> str:
    with pytest.raises(ImageDecodeError) as info:
        open_image(path, **kw)
    assert info.value.path == str(path)
    return info.value.reason


def test_good_jpeg_and_bytes_source(tmp_path):
    img = _photo_like(64, 48)
    data = _jpeg_bytes(img)
    (tmp_path / "ok.jpg").write_bytes(data)
    out = open_image(tmp_path / "ok.jpg")
    assert out.mode == "RGB" and out.size == (64, 48)
    ref = np.asarray(out)
    assert np.array_equal(np.asarray(open_image(data)), ref)  # bytes source decodes the same
    assert np.array_equal(np.asarray(open_image(io.BytesIO(data))), ref)
    # JPEG is lossy, but a q90 decode is close to the source pixels.
    assert np.abs(ref.astype(int) - np.asarray(img).astype(int)).mean() < 6


def test_truncated_jpeg_raises(tmp_path):
    data = _jpeg_bytes(_photo_like(256, 192))
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) * 6 // 10])
    assert _reason(p) == "truncated file"


def test_zero_bytes(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert _reason(p) == "zero bytes"
    with pytest.raises(ImageDecodeError, match="zero bytes"):
        open_image(b"")


def test_text_named_jpg(tmp_path):
    p = tmp_path / "page.jpg"
    p.write_text("<html><body>404 not found</body></html>\n")
    assert _reason(p) == "not an image (cannot identify)"


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "file not found"


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    p = tmp_path / "cmyk.jpg"
    cmyk.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = open_image(p)
    assert out.mode == "RGB" and out.size == (40, 30)
    r, g, b = np.asarray(out)[15, 20].astype(int)
    assert r > 240 and g < 15 and b < 15, (r, g, b)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    arr = np.tile(ramp, (8, 1))
    p = tmp_path / "depth16.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")  # 16-bit greyscale as PIL reads it
    out = open_image(p)
    assert out.mode == "RGB"
    row = np.asarray(out)[4, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # ordering preserved
    assert len(np.unique(row)) > 200  # a real ramp, not a clipped step (a clip is ~all 255)
    assert abs(row[128] - 128) <= 1  # linear: mid-range maps to mid-grey
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(out)[..., 2])  # still grey


def test_float_tiff_is_stretched(tmp_path):
    arr = np.linspace(-1000.0, 5000.0, 64, dtype=np.float32)[None, :].repeat(4, 0)
    p = tmp_path / "float.tif"
    Image.fromarray(arr, mode="F").save(p)
    out = np.asarray(open_image(p))[2, :, 1].astype(int)
    assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out) >= 0)


def test_palette_png_with_transparency(tmp_path):
    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))  # 0: black, 1: green
    pal.paste(1, (10, 0, 20, 10))
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)  # black is the transparent index
    out = np.asarray(open_image(p))
    assert out.shape == (10, 20, 3)
    assert tuple(out[5, 2]) == (255, 255, 255)  # transparent -> white, not black
    assert tuple(out[5, 15]) == (0, 200, 0)


def test_la_png(tmp_path):
    la = Image.new("LA", (20, 10), (0, 0))  # black, fully transparent
    la.paste((100, 255), (10, 0, 20, 10))  # grey 100, opaque
    p = tmp_path / "la.png"
    la.save(p)
    out = np.asarray(open_image(p))
    assert tuple(out[5, 2]) == (255, 255, 255)
    assert tuple(out[5, 15]) == (100, 100, 100)


def test_rgba_png_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (10, 0, 20, 10))
    rgba.paste((255, 0, 0, 128), (20, 0, 30, 10))
    p = tmp_path / "rgba.png"
    rgba.save(p)
    out = np.asarray(open_image(p)).astype(int)
    assert tuple(out[5, 5]) == (255, 255, 255)  # dropping alpha would give black here
    assert tuple(out[5, 15]) == (255, 0, 0)
    r, g, b = out[5, 25]
    assert r == 255 and 120 <= g <= 135 and g == b  # half-transparent red over white: pink


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # red block at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rotated.jpg"
    p.write_bytes(_jpeg_bytes(img, exif=exif.tobytes()))
    assert Image.open(p).size == (64, 32)
    out = open_image(p)
    assert out.size == (32, 64)  # width and height swapped
    arr = np.asarray(out).astype(int)
    assert arr[4, 27, 0] > 200 and arr[4, 27, 2] < 60  # red now at the top-right
    assert arr[4, 4, 2] > 200 and arr[4, 4, 0] < 60  # top-left is blue


def test_decompression_bomb_refused_before_decode(tmp_path):
    data = _jpeg_bytes(_photo_like(1200, 1000))
    p = tmp_path / "big.jpg"
    p.write_bytes(data)
    assert _reason(p, max_pixels=1_000_000) == "decompression bomb: 1200000 pixels > limit 1000000"
    assert open_image(p).size == (1200, 1000)  # fine under the default limit
    # Header only, no pixel data: refusing it as a bomb (not as truncated) proves the check
    # happens before decoding.
    head = tmp_path / "big-head.jpg"
    head.write_bytes(data[:700])
    assert _reason(head, max_pixels=1_000_000).startswith("decompression bomb")
    assert _reason(head) == "truncated file"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels and holds almost no data: what a bomb's header looks like."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_default_limit(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(15000, 13000))  # 195 M pixels: over ours, under PIL's 2x
    assert _reason(p) == f"decompression bomb: 195000000 pixels > limit {DEFAULT_MAX_PIXELS}"
    p2 = tmp_path / "bigger.png"
    p2.write_bytes(_png_header_only(20000, 20000))  # PIL's own guard fires in Image.open
    assert _reason(p2) == f"decompression bomb: 400000000 pixels > limit {DEFAULT_MAX_PIXELS}"


def test_error_is_picklable():
    err = ImageDecodeError("a/b.jpg", "truncated file")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (
        "a/b.jpg",
        "truncated file",
        "a/b.jpg: truncated file",
    )


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [
        ((2000, 1500), 256, (500, 375)),  # 1500 // 256 = 5 -> 1/4 scale
        ((1000, 600), 256, (500, 300)),  # 600 // 256 = 2 -> 1/2 scale
        ((600, 500), 256, (600, 500)),  # less than 2x the target: full size
    ],
)
def test_draft_decodes_small_but_not_below_target(tmp_path, size, target, expected):
    p = tmp_path / "large.jpg"
    p.write_bytes(_jpeg_bytes(_photo_like(*size)))
    full = open_image(p)
    assert full.size == size
    drafted = open_image(p, draft_size=(target, target))
    assert drafted.size == expected
    assert min(drafted.size) >= target
    # Same picture at a lower scale: compare against a resize of the full decode.
    ref = np.asarray(full.resize(drafted.size, Image.Resampling.BOX)).astype(int)
    assert np.abs(np.asarray(drafted).astype(int) - ref).mean() < 4


def test_draft_ignored_for_png(tmp_path):
    p = tmp_path / "large.png"
    _photo_like(1024, 768).save(p)
    assert open_image(p, draft_size=256).size == (1024, 768)


# -- the libjpeg-turbo (simplejpeg) fast path must be invisible: same pixels as Pillow ---------
def _turbo_calls(monkeypatch):
    """Count decodes that the fast path finished (returned an image) rather than handed back."""
    from vssl.data import decode

    if decode._simplejpeg is None:
        pytest.skip("simplejpeg not installed: only the Pillow path exists")
    calls = []
    real = decode._decode_jpeg_turbo

    def counting(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decode, "_decode_jpeg_turbo", counting)
    return calls


@pytest.mark.parametrize("draft", [None, 256, 128, 48])
def test_fast_jpeg_path_equals_pillow_on_real_photos(shared_data, monkeypatch, draft):
    calls = _turbo_calls(monkeypatch)
    files = sorted((shared_data / "imagenet-samples").glob("*.JPEG"))[:40]
    assert files
    for f in files:
        fast = open_image(f, draft_size=draft)
        slow = open_image(f, draft_size=draft, decoder="pil")
        assert fast.size == slow.size, f
        assert np.array_equal(np.asarray(fast), np.asarray(slow)), f
    assert calls and all(calls)  # every one of these photos took the fast path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_path_applies_every_exif_orientation(tmp_path, monkeypatch, orientation):
    calls = _turbo_calls(monkeypatch)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    p.write_bytes(_jpeg_bytes(_photo_like(40, 24, seed=orientation), exif=exif.tobytes()))
    fast, slow = open_image(p), open_image(p, decoder="pil")
    assert calls == [True]
    assert fast.size == slow.size == ((40, 24) if orientation <= 4 else (24, 40))
    assert np.array_equal(np.asarray(fast), np.asarray(slow))


def test_fast_jpeg_path_hands_cmyk_grey_and_broken_files_to_pillow(tmp_path, monkeypatch):
    calls = _turbo_calls(monkeypatch)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=95)
    grey = tmp_path / "grey.jpg"
    _photo_like(32, 32).convert("L").save(grey, quality=90)
    for p in (cmyk, grey):
        assert np.array_equal(np.asarray(open_image(p)), np.asarray(open_image(p, decoder="pil")))
    assert calls == [False, True]  # CMYK went to Pillow; greyscale is libjpeg-turbo's job
    data = _jpeg_bytes(_photo_like(256, 192))
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    assert _reason(bad) == "truncated file"  # handed back, and Pillow words the error
    assert calls[-1] is False


def test_decoder_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match="decoder must be"):
        open_image(tmp_path / "x.jpg", decoder="turbo")
