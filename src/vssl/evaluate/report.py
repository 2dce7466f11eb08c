"""``vssl eval report``: results files -> runs side by side, as markdown and as an HTML page.

Rows of the table are (protocol, dataset, metric); columns are runs (the ``model`` label of each
line). When a run logged the same metric several times, the latest line wins, except that lines
with a ``step`` (the training-time kNN monitor) become curves. The plot is inline SVG written
here: a bar chart and a line chart do not justify a plotting dependency, and the page must open
offline.
"""

from __future__ import annotations

import argparse
import html
import math
import sys
from collections import OrderedDict
from pathlib import Path

from .._io import atomic_write
from ..viz.report import COLORS as _COLORS  # the same colour per run in bars and curves
from ..viz.report import line_chart
from .results import read_results


def _run_label(row: dict) -> str:
    return str(row.get("model") or row.get("checkpoint") or "run")


def pivot(rows: list[dict]) -> tuple[list[str], OrderedDict[tuple, dict]]:
    """(runs, {(protocol, dataset, metric): {run: value}}), in first-seen order; latest wins."""
    runs: list[str] = []
    table: OrderedDict[tuple, dict] = OrderedDict()
    for r in rows:
        if r.get("step") is not None:
            continue
        run = _run_label(r)
        if run not in runs:
            runs.append(run)
        key = (str(r.get("protocol")), str(r.get("dataset") or ""), str(r.get("metric")))
        table.setdefault(key, {})[run] = float(r["value"])
    return runs, table


def curves(rows: list[dict]) -> OrderedDict[str, dict[str, list[tuple[float, float]]]]:
    """{metric: {run: [(step, value), ...]}} for lines that carry a ``step``."""
    out: OrderedDict[str, dict] = OrderedDict()
    for r in rows:
        if r.get("step") is None:
            continue
        out.setdefault(str(r["metric"]), {}).setdefault(_run_label(r), []).append(
            (float(r["step"]), float(r["value"]))
        )
    for per_run in out.values():
        for pts in per_run.values():
            pts.sort()
    return out


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def to_markdown(rows: list[dict]) -> str:
    """The pivot as a markdown table; the best value of each row in bold (higher is better)."""
    runs, table = pivot(rows)
    if not table:
        return "(no final results; only training curves)\n" if rows else "(no results)\n"
    lines = [
        "| protocol | dataset | metric | " + " | ".join(runs) + " |",
        "|---|---|---|" + "---:|" * len(runs),
    ]
    for (protocol, dataset, metric), vals in table.items():
        best = max(vals.values()) if vals else None
        cells = []
        for run in runs:
            v = vals.get(run)
            s = _fmt(v)
            cells.append(f"**{s}**" if v is not None and v == best and len(vals) > 1 else s)
        lines.append(f"| {protocol} | {dataset} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- SVG charts
def _bar_chart(title: str, vals: dict[str, float], runs: list[str], width=420, height=220) -> str:
    pad_l, pad_b, pad_t = 48, 28, 26
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    hi = max([v for v in vals.values() if math.isfinite(v)] + [0.0])
    lo = min([v for v in vals.values() if math.isfinite(v)] + [0.0])
    top = 1.0 if 0 <= lo and hi <= 1.0 else (hi if hi > 0 else 1.0)
    span = top - min(lo, 0.0) or 1.0
    n = max(len(runs), 1)
    bw = plot_w / n * 0.7
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 10}" y2="{pad_t + plot_h}" stroke="#333"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + plot_h - frac * plot_h
        parts.append(
            f'<text x="{pad_l - 4}" y="{y + 4}" text-anchor="end" font-size="10">'
            f"{_fmt(min(lo, 0.0) + frac * span)}</text>"
        )
    for i, run in enumerate(runs):
        v = vals.get(run)
        if v is None or not math.isfinite(v):
            continue
        h = (v - min(lo, 0.0)) / span * plot_h
        x = pad_l + (i + 0.15) * plot_w / n
        parts.append(
            f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bw:.1f}" height="{h:.1f}" '
            f'fill="{_COLORS[i % len(_COLORS)]}"><title>{html.escape(run)}: {_fmt(v)}</title></rect>'
        )
        parts.append(
            f'<text x="{x + bw / 2:.1f}" y="{pad_t + plot_h - h - 3:.1f}" text-anchor="middle" '
            f'font-size="10">{_fmt(v)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _curve(title: str, per_run: dict[str, list[tuple[float, float]]]) -> str:
    """One metric over training steps, a line per run (the chart of :mod:`vssl.viz.report`)."""
    ys = [y for pts in per_run.values() for _, y in pts if math.isfinite(y)]
    fraction = bool(ys) and 0 <= min(ys) and max(ys) <= 1
    return line_chart(per_run, title=title, y_range=(0.0, 1.0) if fraction else None)


def to_html(rows: list[dict], title: str = "vssl evaluation report") -> str:
    """A self-contained page: the side-by-side table, a bar chart per metric, curves per metric."""
    runs, table = pivot(rows)
    legend = " ".join(
        f'<span style="color:{_COLORS[i % len(_COLORS)]}">&#9632;</span> {html.escape(r)}'
        for i, r in enumerate(runs)
    )
    head = "".join(f"<th>{html.escape(r)}</th>" for r in runs)
    body = []
    for (protocol, dataset, metric), vals in table.items():
        best = max(vals.values()) if vals else None
        cells = "".join(
            f"<td{' class=best' if vals.get(r) == best and len(vals) > 1 else ''}>{_fmt(vals.get(r))}</td>"
            for r in runs
        )
        body.append(
            f"<tr><td>{html.escape(protocol)}</td><td>{html.escape(dataset)}</td>"
            f"<td>{html.escape(metric)}</td>{cells}</tr>"
        )
    charts = [_bar_chart(f"{p} {d} {m}".strip(), vals, runs) for (p, d, m), vals in table.items()]
    lines = [
        _curve(f"{metric} during training", per_run) for metric, per_run in curves(rows).items()
    ]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px;text-align:right}}td:nth-child(-n+3){{text-align:left}}
.best{{font-weight:bold;background:#eef6ee}}svg{{margin:6px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(rows)} result lines, {len(runs)} run(s): {legend}</p>
<table><tr><th>protocol</th><th>dataset</th><th>metric</th>{head}</tr>
{"".join(body)}</table>
<h2>Metrics</h2><div>{"".join(charts)}</div>
{"<h2>During training</h2><div>" + "".join(lines) + "</div>" if lines else ""}
</body></html>
"""


# ------------------------------------------------------------------------------------------ CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="render results files side by side (markdown + HTML with plots)",
        description="Read one or more results files (JSON lines written by `vssl eval ...`) and "
        "print the runs side by side as a markdown table; --html also writes a "
        "self-contained page with a chart per metric and training curves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  vssl eval report vssl_results.jsonl\n"
        "  vssl eval report runs/*/results.jsonl --html report.html --markdown report.md",
    )
    p.add_argument("results", nargs="+", help="results files (JSON lines)")
    p.add_argument("--html", metavar="FILE", help="also write an HTML page here")
    p.add_argument("--markdown", metavar="FILE", help="also write the markdown table here")
    p.add_argument("--title", default="vssl evaluation report", help="page title")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    missing = [f for f in args.results if not Path(f).is_file()]
    if missing:
        print(
            f"vssl eval report: error: no such results file: {', '.join(missing)}", file=sys.stderr
        )
        return 2
    try:
        rows = read_results(args.results)
    except ValueError as exc:
        print(f"vssl eval report: error: {exc}", file=sys.stderr)
        return 2
    md = to_markdown(rows)
    print(md, end="")
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
    if args.html:
        page = to_html(rows, args.title)
        atomic_write(args.html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
