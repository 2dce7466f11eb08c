"""``vssl curate browse``: one HTML page to see what clustering and sampling kept.

Each cluster is a row: its id, its size, how many of its images a sample kept (``--sample``), and
thumbnails of its images closest to their level-1 centroid. Thumbnails are embedded as JPEG data
URIs and the search box is inline JavaScript, so the page is one file that opens offline.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys

import numpy as np

HELP = "an offline HTML page of the clusters: thumbnails, sizes before/after sampling"

_EPILOG = """\
examples:
  vssl curate browse clusters/ --out clusters.html
  vssl curate browse clusters/ --sample sample.parquet --level 2 --out clusters.html
"""

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td {{ border-bottom: 1px solid #ddd; padding: 4px; vertical-align: middle; }}
td.n {{ text-align: right; white-space: nowrap; }}
img, .miss {{ width: {px}px; height: {px}px; object-fit: cover; margin: 1px; }}
.miss {{ display: inline-block; background: #ccc; }}
</style></head><body>
<h2>{title}</h2>
<p>{summary}</p>
<p>cluster id: <input id="q" placeholder="e.g. 17" oninput="filterRows()"></p>
<table><tr><th>cluster</th><th>images</th>{sampled_head}<th>closest to the centroid</th></tr>
{rows}
</table>
<script>
function filterRows() {{
  var q = document.getElementById('q').value.trim();
  document.querySelectorAll('tr[data-id]').forEach(function (r) {{
    r.style.display = (q === '' || r.dataset.id === q) ? '' : 'none';
  }});
}}
</script></body></html>
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "browse",
        help=HELP,
        description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("clusters", metavar="CLUSTERS", help="a `vssl curate cluster` output folder")
    p.add_argument("--out", required=True, metavar="OUT.html", help="the page")
    p.add_argument("--sample", metavar="SAMPLE.parquet", help="a `vssl curate sample` output")
    p.add_argument("--level", type=int, default=1, help="which level's clusters are rows (1)")
    p.add_argument("--per-cluster", type=int, default=12, help="thumbnails per cluster (12)")
    p.add_argument("--max-clusters", type=int, default=200, help="largest clusters shown (200)")
    p.add_argument("--thumb", type=int, default=64, help="thumbnail size in pixels (64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _thumb(path: str, px: int) -> str | None:
    from ..data.decode import open_image

    try:
        im = open_image(path).convert("RGB")
    except Exception:  # noqa: BLE001 - an unreadable image shows as a grey square with its path
        return None
    im.thumbnail((px * 2, px * 2))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_page(
    table, level: int, *, sampled=None, per_cluster=12, max_clusters=200, px=64, progress=True
) -> str:
    """The HTML page for a ``clusters.parquet`` table (pyarrow); ``sampled``: row ids kept by a
    sample (the ``row`` column of its output)."""
    from tqdm import tqdm

    col = f"cluster_{level}"
    if col not in table.column_names:
        raise ValueError(f"no level {level} in the clusters (columns: {table.column_names})")
    cl = table.column(col).to_numpy()
    dist = table.column("distance_1").to_numpy()
    paths = table.column("path").to_pylist()
    rows = table.column("row").to_numpy()
    k = int(cl.max()) + 1 if len(cl) else 0
    sizes = np.bincount(cl, minlength=k)
    kept = None
    if sampled is not None:
        where = np.searchsorted(rows, sampled)  # rows are 0..N-1 in order
        kept = np.bincount(cl[where], minlength=k)
    shown = np.argsort(-sizes, kind="stable")[:max_clusters]
    shown = shown[sizes[shown] > 0]
    order = np.lexsort((np.arange(len(cl)), dist, cl))
    starts = np.searchsorted(cl[order], np.arange(k + 1))
    out = []
    for c in tqdm(shown, desc="thumbnails", unit="cluster", disable=not progress, file=sys.stderr):
        members = order[starts[c] : starts[c + 1]][:per_cluster]
        imgs = []
        for m in members:
            uri = _thumb(paths[m], px)
            title = html.escape(str(paths[m]), quote=True)
            imgs.append(
                f'<img src="{uri}" title="{title}">'
                if uri
                else f'<span class="miss" title="{title}"></span>'
            )
        kept_cell = f'<td class="n">{kept[c]}</td>' if kept is not None else ""
        out.append(
            f'<tr data-id="{c}"><td class="n">{c}</td><td class="n">{sizes[c]}</td>{kept_cell}'
            f"<td>{''.join(imgs)}</td></tr>"
        )
    summary = f"{len(cl)} images in {int((sizes > 0).sum())} clusters at level {level}"
    if kept is not None:
        summary += f"; the sample keeps {len(sampled)}"
    if len(shown) < (sizes > 0).sum():
        summary += f"; the {len(shown)} largest clusters are shown"
    return _PAGE.format(
        title=f"vssl curate: level {level} clusters",
        summary=html.escape(summary),
        px=px,
        sampled_head="<th>sampled</th>" if kept is not None else "",
        rows="\n".join(out),
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from .._io import atomic_write
    from ._output import note
    from .cluster import RESULT, load_levels

    n_levels = len(load_levels(args.clusters))
    if not 1 <= args.level <= n_levels:
        raise ValueError(f"--level must be in 1..{n_levels} for {args.clusters}, got {args.level}")
    table = pq.read_table(Path(args.clusters) / RESULT)
    sampled = None
    if args.sample:
        sampled = np.sort(pq.read_table(args.sample, columns=["row"]).column("row").to_numpy())
        if len(sampled) and (sampled.max() >= table.num_rows or sampled.min() < 0):
            raise ValueError(
                f"{args.sample} names rows outside {args.clusters}: a sample of another clustering"
            )
    page = build_page(
        table,
        args.level,
        sampled=sampled,
        per_cluster=args.per_cluster,
        max_clusters=args.max_clusters,
        px=args.thumb,
        progress=not args.no_progress,
    )
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    note("browse", f"wrote {args.out}")
    return 0
