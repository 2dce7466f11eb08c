"""The quickstart's default dataset: ten classes of procedurally drawn shapes, generated on first use.

Why generated and not downloaded: ``vssl quickstart`` must run offline with nothing but vssl
installed, and no dependency ships a labelled image set in its wheel (torchvision's datasets
download). A seeded generator makes the same images on every machine in a few seconds.

Why shapes drawn this way: the class is the *shape* only. Colour, background (flat, gradient,
stripes or noise), position, size, rotation and stroke width are random per image, so raw pixels
are a weak kNN feature (two images of one class share almost no pixel values), while the
invariances DINO's augmentations teach (colour jitter, crops, flips) are exactly the ones that
help. 32 px images keep a CPU pretraining run inside a few minutes.

Images are PNG (lossless) in ``root/{train,test}/<class>/<index>.png``: class subfolders are the
labels every vssl data source and evaluator understands.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["CLASSES", "VERSION", "default_toy_dir", "draw_shape", "make_toy_dataset", "toy_dataset"]

#: Bump when the drawing changes, so a cached copy of an older version is not reused.
VERSION = 1
CLASSES = (
    "circle",
    "cross",
    "diamond",
    "frame",
    "plus",
    "ring",
    "square",
    "star",
    "triangle",
    "hexagon",
)
_SUPERSAMPLE = 4  # draw at 4x and average down (box filter): antialiased edges at 32 px


def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple]:
    return [
        (
            cx + r * math.cos(phase + 2 * math.pi * k / n),
            cy + r * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star(cx: float, cy: float, r: float, phase: float) -> list[tuple]:
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.42
        a = phase + math.pi * k / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _bar_polygon(cx, cy, length, width, angle) -> list[tuple]:
    """A rectangle of ``length x width`` centred on (cx, cy), rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    hl, hw = length / 2, width / 2
    return [
        (cx + x * c - y * s, cy + x * s + y * c)
        for x, y in ((-hl, -hw), (hl, -hw), (hl, hw), (-hl, hw))
    ]


def _background(rng: np.random.Generator, size: int, plain: bool = False) -> np.ndarray:
    """(size, size, 3) float32 background at the output resolution (upsampled for drawing);
    ``plain``: always one flat colour (no kind is drawn)."""
    base = rng.integers(0, 256, 3).astype(np.float32)
    kind = 0 if plain else rng.integers(0, 4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == 0:  # flat
        arr = np.broadcast_to(base, (size, size, 3))
    elif kind == 1:  # linear gradient to a second colour
        other = rng.integers(0, 256, 3)
        a = rng.uniform(0, 2 * math.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        arr = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 2:  # soft stripes
        other = rng.integers(0, 256, 3)
        a = rng.uniform(0, math.pi)
        freq = rng.uniform(2, 6)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.cos(a) * xx + np.sin(a) * yy))
        arr = base * (1 - 0.5 * t[..., None]) + other * 0.5 * t[..., None]
    else:  # coloured noise
        arr = base + rng.normal(0, 40, (size, size, 3))
    return np.clip(arr, 0, 255)


def _foreground_colour(rng: np.random.Generator, bg: np.ndarray) -> tuple[int, int, int]:
    """A random colour that differs clearly from the background's mean (the shape stays visible)."""
    mean = bg.reshape(-1, 3).mean(0)
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.abs(c - mean).sum() > 180:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in (255 - mean))


def draw_shape(
    name: str, rng: np.random.Generator, size: int = 32, *, plain: bool = False
) -> Image.Image:
    """One RGB image of class ``name`` with random colour, background, pose and scale.

    ``plain``: flat backgrounds and no blur, so colour, pose and scale are the only nuisances
    (an experiment of issue 12: two crops of one image share its background type, which the
    objectives learn before the shape; see BENCHMARKS.md, "The quickstart").
    """
    if name not in CLASSES:
        raise ValueError(f"unknown toy class {name!r}; classes are {', '.join(CLASSES)}")
    S = size * _SUPERSAMPLE
    bg = _background(rng, size, plain)
    colour = _foreground_colour(rng, bg)
    img = Image.fromarray(bg.astype(np.uint8), "RGB").resize((S, S), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    r = S * rng.uniform(0.2, 0.42)  # "radius" of the shape
    cx = rng.uniform(r, S - r)
    cy = rng.uniform(r, S - r)
    phase = rng.uniform(0, 2 * math.pi)
    stroke = max(2, int(r * rng.uniform(0.22, 0.38)))
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=stroke)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, r * 1.15, 4, phase), fill=colour)
    elif name == "frame":
        draw.polygon(_regular_polygon(cx, cy, r * 1.15, 4, phase), outline=colour, width=stroke)
    elif name == "diamond":  # a rhombus: one diagonal 1.8x the other
        c, s = math.cos(phase), math.sin(phase)
        pts = [(r, 0), (0, r * 0.55), (-r, 0), (0, -r * 0.55)]
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=colour)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r * 1.1, 3, phase), fill=colour)
    elif name == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, phase), fill=colour)
    elif name == "star":
        draw.polygon(_star(cx, cy, r * 1.15, phase), fill=colour)
    elif name in ("plus", "cross"):
        # plus: axis-aligned up to +-15 degrees; cross: the same bars turned by 45 degrees
        angle = rng.uniform(-math.pi / 12, math.pi / 12) + (math.pi / 4 if name == "cross" else 0)
        for a in (angle, angle + math.pi / 2):
            draw.polygon(_bar_polygon(cx, cy, 2 * r, stroke * 1.2, a), fill=colour)
    if rng.random() < 0.3:
        radius = rng.uniform(0.5, 2.0)  # drawn either way: same draws, same generator state
        if not plain:
            img = img.filter(ImageFilter.GaussianBlur(radius=radius))
    return img.resize((size, size), Image.Resampling.BOX)


def make_toy_dataset(
    root: str | os.PathLike,
    *,
    n_train: int = 400,
    n_test: int = 100,
    size: int = 32,
    seed: int = 0,
    plain: bool = False,
) -> Path:
    """Write ``root/{train,test}/<class>/<i>.png``: ``n_train``/``n_test`` images per class
    (``plain``: see :func:`draw_shape`).

    Deterministic: image ``i`` of class ``c`` in split ``s`` depends only on (seed, s, c, i).
    Written into a temporary folder beside ``root`` and renamed into place, so an interrupted
    run never leaves a half dataset that looks complete.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split_id, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            for class_id, name in enumerate(CLASSES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(n):
                    rng = np.random.default_rng([seed, split_id, class_id, i])
                    draw_shape(name, rng, size, plain=plain).save(
                        folder / f"{i:05d}.png", compress_level=1
                    )
        if root.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def default_toy_dir() -> Path:
    """``$VSSL_CACHE/toy``, else ``$XDG_CACHE_HOME/vssl/toy``, else ``~/.cache/vssl/toy``."""
    if os.environ.get("VSSL_CACHE"):
        return Path(os.environ["VSSL_CACHE"]).expanduser() / "toy"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vssl" / "toy"


def toy_dataset(
    cache_dir: str | os.PathLike | None = None,
    *,
    n_train: int = 400,
    n_test: int = 100,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """The toy dataset's folder, generated on first use (a few seconds) and reused afterwards."""
    base = Path(cache_dir) if cache_dir is not None else default_toy_dir()
    root = base / f"shapes-v{VERSION}-{size}px-{n_train}+{n_test}-seed{seed}"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        make_toy_dataset(root, n_train=n_train, n_test=n_test, size=size, seed=seed)
    return root
