"""Generate the bundled sample images (src/vssl/assets/samples/*.jpg) that `vssl embed` uses by default.

Synthetic and deterministic (no photos, no licences to track): gradients, shapes, stripes, a
checkerboard, noise, text on white. Small (160x120 .. 256x192, a few KB each) so the wheel stays
light. Run once from the repository root; the outputs are committed:

    python scripts/make_sample_images.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

OUT = Path(__file__).resolve().parents[1] / "src" / "vssl" / "assets" / "samples"


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    rgb = np.stack([x * np.ones_like(y), y * np.ones_like(x), (1 - x) * (1 - y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def shapes(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (30, 60, 110))
    d = ImageDraw.Draw(img)
    d.ellipse((20, 20, 110, 110), fill=(240, 200, 40))
    d.rectangle((120, 40, 220, 150), fill=(200, 40, 60))
    d.polygon([(60, 180), (140, 120), (200, 185)], fill=(60, 190, 90))
    return img


def stripes(w: int, h: int) -> Image.Image:
    x = np.arange(w)[None, :] + np.arange(h)[:, None]
    band = ((x // 20) % 3)[..., None]
    palette = np.array([[230, 80, 30], [250, 240, 220], [20, 90, 160]], dtype=np.uint8)
    return Image.fromarray(palette[band[..., 0]])


def checkerboard(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    board = ((xx // 20 + yy // 20) % 2).astype(np.uint8) * 200 + 30
    return Image.fromarray(board, mode="L").convert("RGB")


def noise(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.SMOOTH)


def rings(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w / 2, yy - h / 2)
    v = np.sin(r / 6.0) * 0.5 + 0.5
    rgb = np.stack([v, v * 0.6, 1 - v], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def text_on_white(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=20)  # FreeType build: a readable size
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    lines = ["vssl sample", "Does vision", "need language?", "0123456789"]
    for i, line in enumerate(lines):
        d.text((12, 10 + 28 * i), line, fill=(10, 10, 10), font=font)
    d.line((12, h - 20, w - 12, h - 20), fill=(200, 0, 0), width=3)
    return img


def landscape(w: int, h: int) -> Image.Image:
    img = gradient(w, h).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    d = ImageDraw.Draw(img)
    d.rectangle((0, int(h * 0.65), w, h), fill=(40, 120, 50))
    d.ellipse((w - 60, 15, w - 20, 55), fill=(255, 230, 120))
    d.polygon(
        [(0, int(h * 0.65)), (w // 3, int(h * 0.3)), (2 * w // 3, int(h * 0.65))],
        fill=(110, 100, 120),
    )
    return img


SAMPLES = {
    "gradient.jpg": (gradient, (256, 192)),
    "shapes.jpg": (shapes, (240, 200)),
    "stripes.jpg": (stripes, (200, 150)),
    "checkerboard.jpg": (checkerboard, (160, 120)),
    "noise.jpg": (noise, (192, 160)),
    "rings.jpg": (rings, (224, 168)),
    "text.jpg": (text_on_white, (200, 150)),
    "landscape.jpg": (landscape, (256, 160)),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (make, (w, h)) in SAMPLES.items():
        img = make(w, h)
        assert img.size == (w, h) and img.mode == "RGB", (name, img.size, img.mode)
        path = OUT / name
        img.save(path, quality=85, optimize=True)
        print(f"{path} {w}x{h} {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
