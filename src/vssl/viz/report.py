"""Self-contained HTML pages for training runs: SVG line charts, inline PNGs, tables.

Everything is inline (SVG markup and base64 PNG data URIs), so a report is one file that opens
offline and can be mailed or attached to an issue. Charts are written here rather than with a
plotting library: a few polylines with axes do not justify a dependency.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLORS",
    "image_table",
    "line_chart",
    "loss_series",
    "metric_series",
    "png_data_uri",
    "read_metrics",
    "render_page",
    "table",
    "training_report",
    "write_page",
]

COLORS = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]
LOSS_TERMS = ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")


# ------------------------------------------------------------------------------------- metrics
def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON lines of a run's ``metrics.jsonl`` (a torn last line is ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def metric_series(rows: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """``[(step, value)]`` of every row that has ``key`` with a finite number, by step."""
    pts = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return sorted(pts)


def loss_series(rows: Sequence[dict]) -> dict[str, list[tuple[float, float]]]:
    """``{"loss": [...], <term>: [...]}`` for the loss and each logged loss term."""
    out = {"loss": metric_series(rows, "loss")}
    for term in LOSS_TERMS:
        s = metric_series(rows, term)
        if s:
            out[term] = s
    return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------------------- charts
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    width: int = 520,
    height: int = 280,
    y_range: tuple[float, float] | None = None,
) -> str:
    """An SVG line chart of ``{name: [(x, y), ...]}`` with axes, ticks and a legend.

    Non-finite points are left out. A series of one point is drawn as a dot. ``y_range`` fixes
    the vertical axis (e.g. (0, 1) for accuracies). Returns "" when there is nothing to draw.
    """
    clean = {
        name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return ""
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range is not None else (min(ys), max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    pad_l, pad_r, pad_t = 58, 12, 28
    legend_h = 16 * ((len(clean) + 2) // 3)
    pad_b = 40 + legend_h
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x):
        return pad_l + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return pad_t + ph - (y - y0) / (y1 - y0) * ph

    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}" '
        'font-family="sans-serif">',
        f'<text x="{width / 2:.0f}" y="17" text-anchor="middle" font-size="13">{e(title)}</text>',
        f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>',
    ]
    for t in _nice_ticks(y0, y1):
        y = sy(t)
        parts.append(
            f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + pw}" y2="{y:.1f}" stroke="#eee"/>'
        )
        parts.append(
            f'<text x="{pad_l - 5}" y="{y + 3.5:.1f}" text-anchor="end" '
            f'font-size="10">{_fmt(t)}</text>'
        )
    for t in _nice_ticks(x0, x1):
        x = sx(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad_t + ph}" x2="{x:.1f}" y2="{pad_t + ph + 4}" '
            'stroke="#666"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{pad_t + ph + 15}" text-anchor="middle" '
            f'font-size="10">{_fmt(t)}</text>'
        )
    parts.append(
        f'<text x="{pad_l + pw / 2:.0f}" y="{pad_t + ph + 29}" text-anchor="middle" '
        f'font-size="11">{e(xlabel)}</text>'
    )
    if ylabel:
        parts.append(
            f'<text x="12" y="{pad_t + ph / 2:.0f}" text-anchor="middle" font-size="11" '
            f'transform="rotate(-90 12 {pad_t + ph / 2:.0f})">{e(ylabel)}</text>'
        )
    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                f"<title>{e(name)}: {_fmt(y)}</title></circle>"
            )
        else:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" '
                f'stroke-width="1.8"><title>{e(name)}</title></polyline>'
            )
        lx = pad_l + (i % 3) * (pw / 3)
        ly = pad_t + ph + 44 + 16 * (i // 3) - 6
        parts.append(
            f'<rect x="{lx:.1f}" y="{ly - 8:.1f}" width="10" height="10" fill="{color}"/>'
            f'<text x="{lx + 14:.1f}" y="{ly + 1:.1f}" font-size="10">{e(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------- images/html
def png_data_uri(image: np.ndarray | Any, scale: int = 1) -> str:
    """A ``data:image/png;base64,...`` URI of an (H, W, 3) uint8 array or a PIL image, enlarged
    ``scale`` times with nearest-neighbour (so small maps stay crisp)."""
    from PIL import Image

    img = (
        image
        if isinstance(image, Image.Image)
        else Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)))
    )
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "") -> str:
    """An HTML table; floats are shown with 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return _fmt(v)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def image_table(
    columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]], *, scale: int = 3
) -> str:
    """A grid of inline PNGs: one row per ``(label, [image per column])``."""
    head = "<th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for label, images in rows:
        cells = "".join(
            f'<td><img src="{png_data_uri(im, scale)}" alt="{html.escape(label)}"></td>'
            for im in images
        )
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f'<table class="images"><tr>{head}</tr>{"".join(body)}</table>'


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 9px}
table.images td,table.images th{border:none;padding:3px;text-align:center;font-weight:normal}
table.images img{image-rendering:pixelated}.note{color:#555;font-size:.92em}
svg{margin:4px 8px 4px 0}"""


def render_page(title: str, sections: Sequence[tuple[str, str]], *, intro: str = "") -> str:
    """A complete HTML page: ``sections`` are ``(heading, inner html)`` pairs."""
    body = "".join(
        f"<section><h2>{html.escape(h)}</h2>{content}</section>" for h, content in sections
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>"
        f"{intro}{body}</body></html>\n"
    )


def write_page(path: str | os.PathLike, page: str) -> Path:
    """Write atomically (a browser never shows half a report)."""
    from .._io import atomic_write

    return atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def training_report(
    rows: Sequence[dict],
    *,
    title: str = "vssl pretraining run",
    intro: str = "",
    extra_sections: Sequence[tuple[str, str]] = (),
    knn_baselines: dict[str, float] | None = None,
) -> str:
    """The page for a run's ``metrics.jsonl`` rows: loss curves, kNN curve, throughput; then
    ``extra_sections`` (e.g. kNN comparisons, PCA maps). ``knn_baselines`` (``{"raw pixels":
    0.18}``) are drawn as flat reference lines in the kNN chart."""
    sections: list[tuple[str, str]] = []
    losses = loss_series(rows)
    charts = []
    if "loss" in losses:
        charts.append(line_chart({"loss": losses["loss"]}, title="total loss", ylabel="loss"))
    terms = {k: v for k, v in losses.items() if k != "loss"}
    if terms:
        charts.append(line_chart(terms, title="loss terms", ylabel="loss"))
    if charts:
        sections.append(("Loss", "".join(charts)))
    knn = {k: metric_series(rows, k) for k in ("knn_top1", "knn_top5")}
    knn = {k: v for k, v in knn.items() if v}
    if knn and knn_baselines:
        steps = [x for pts in knn.values() for x, _ in pts]
        lo, hi = min(steps), max(steps)
        for name, value in knn_baselines.items():
            knn[name] = [(lo, value), (hi, value)] if hi > lo else [(lo, value)]
    if knn:
        sections.append(
            (
                "kNN accuracy during training",
                line_chart(
                    knn,
                    title="kNN on the teacher's CLS token",
                    ylabel="accuracy",
                    y_range=(0.0, 1.0),
                ),
            )
        )
    sched = {k: metric_series(rows, k) for k in ("lr",)}
    ips = metric_series(rows, "images_per_s")
    small = []
    if sched["lr"]:
        small.append(line_chart(sched, title="learning rate", width=360, height=220))
    if ips:
        small.append(line_chart({"images/s": ips}, title="throughput", width=360, height=220))
    if small:
        sections.append(("Schedule and throughput", "".join(small)))
    sections.extend(extra_sections)
    if not sections:
        sections.append(("Metrics", '<p class="note">no metrics logged yet</p>'))
    return render_page(title, sections, intro=intro)
