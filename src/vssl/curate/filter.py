"""``vssl curate filter``: keep the manifest rows that pass metadata thresholds, with DuckDB.

COYO-700M ships 747M rows with CLIP similarity, aesthetic, watermark and NSFW scores and image
sizes; DataComp and LAION ship similar columns. The filter is one SQL query that DuckDB streams
from the parquet files (any number, globs) to the output parquet, so memory stays bounded
(``--memory-limit``; DuckDB spills to disk past it) however many rows there are. Each rule is a SQL
predicate; the report counts the rows left after each rule, in the order given, in one extra
scan of only the columns the rules read. A NULL in a column a threshold reads fails that threshold
(the value cannot be shown to pass). ``--dedup-phash`` then keeps the first row (file order) per
exact ``image_phash`` value; rows without a pHash are all kept. Near-duplicates (pHash Hamming
distance) are ``vssl curate dedup --phash``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HELP = "keep manifest rows by COYO/DataComp metadata thresholds and SQL (DuckDB, streaming)"

# the columns each threshold reads: the first one the manifest has (COYO, DataComp, LAION names)
CLIP_COLUMNS = ("clip_similarity_vitb32", "clip_b32_similarity_score", "similarity")
AESTHETIC_COLUMNS = ("aesthetic_score_laion_v2", "aesthetic_score", "aesthetic")
WATERMARK_COLUMNS = ("watermark_score", "pwatermark")
NSFW_COLUMNS = ("nsfw_score_opennsfw2", "nsfw_score_gantman", "punsafe")  # all present are used
WIDTH_COLUMNS = ("width", "original_width")
HEIGHT_COLUMNS = ("height", "original_height")
PHASH_COLUMN = "image_phash"
_FILE, _ROW = "__vssl_file", "__vssl_row"


@dataclass
class Rule:
    name: str  # what the report prints
    sql: str  # a predicate over the manifest's columns


def _q(col: str) -> str:
    return '"' + col.replace('"', '""') + '"'


def manifest_files(spec: list[str]) -> list[str]:
    """Parquet files, globs or folders -> a sorted, de-duplicated file list."""
    files: list[str] = []
    for s in spec:
        if os.path.isdir(s):
            found = sorted(glob.glob(os.path.join(s, "**", "*.parquet"), recursive=True))
        elif any(ch in s for ch in "*?["):
            found = sorted(glob.glob(s, recursive=True))
        elif os.path.exists(s):
            found = [s]
        else:
            raise FileNotFoundError(f"manifest not found: {s}")
        if not found:
            raise FileNotFoundError(f"no parquet files match {s}")
        files += [os.path.abspath(f) for f in found]
    return list(dict.fromkeys(files))


def _pick(columns: list[str], candidates, flag: str, column_flag: str | None = None) -> str:
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    how = f"; name it with {column_flag}" if column_flag else ""
    raise ValueError(
        f"{flag} needs one of the columns {', '.join(candidates)} (the manifest has "
        f"{', '.join(columns)}){how}"
    )


def build_rules(
    columns: list[str],
    *,
    min_clip_similarity: float | None = None,
    clip_column: str | None = None,
    min_aesthetic: float | None = None,
    max_watermark: float | None = None,
    max_nsfw: float | None = None,
    min_size: int | None = None,
    max_aspect_ratio: float | None = None,
    where: list[str] | tuple[str, ...] = (),
) -> list[Rule]:
    """The threshold flags as SQL predicates, in the order the report prints them."""
    rules = []
    if min_clip_similarity is not None:
        col = (
            _pick(columns, [clip_column], "--clip-column")
            if clip_column
            else _pick(columns, CLIP_COLUMNS, "--min-clip-similarity", "--clip-column")
        )
        rules.append(
            Rule(f"{col} >= {min_clip_similarity:g}", f"{_q(col)} >= {min_clip_similarity!r}")
        )
    if min_aesthetic is not None:
        col = _pick(columns, AESTHETIC_COLUMNS, "--min-aesthetic")
        rules.append(Rule(f"{col} >= {min_aesthetic:g}", f"{_q(col)} >= {min_aesthetic!r}"))
    if max_watermark is not None:
        col = _pick(columns, WATERMARK_COLUMNS, "--max-watermark")
        rules.append(Rule(f"{col} <= {max_watermark:g}", f"{_q(col)} <= {max_watermark!r}"))
    if max_nsfw is not None:
        lower = {c.lower() for c in columns}
        cols = [c for c in NSFW_COLUMNS if c in lower]
        if not cols:
            _pick(columns, NSFW_COLUMNS, "--max-nsfw")
        rules.append(
            Rule(
                " and ".join(f"{c} <= {max_nsfw:g}" for c in cols),
                " AND ".join(f"{_q(c)} <= {max_nsfw!r}" for c in cols),
            )
        )
    if min_size is not None or max_aspect_ratio is not None:
        w = _pick(columns, WIDTH_COLUMNS, "--min-size/--max-aspect-ratio")
        h = _pick(columns, HEIGHT_COLUMNS, "--min-size/--max-aspect-ratio")
        if min_size is not None:
            rules.append(
                Rule(f"min({w}, {h}) >= {min_size}", f"least({_q(w)}, {_q(h)}) >= {int(min_size)}")
            )
        if max_aspect_ratio is not None:
            rules.append(
                Rule(
                    f"max/min side <= {max_aspect_ratio:g}",
                    f"greatest({_q(w)}, {_q(h)}) <= {max_aspect_ratio!r} * least({_q(w)}, {_q(h)})"
                    f" AND least({_q(w)}, {_q(h)}) > 0",
                )
            )
    for sql in where:
        rules.append(Rule(f"where {sql}", f"({sql})"))
    return rules


@dataclass
class FilterResult:
    rows_in: int
    kept: list[tuple[str, int]]  # (rule, rows left after it), in order
    rows_out: int
    seconds: float


def _connect(memory_limit: str | None, threads: int | None, temp_dir: str | None):
    import duckdb

    con = duckdb.connect()
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if temp_dir:
        con.execute(f"SET temp_directory = '{temp_dir}'")
    # streaming writes do not need the input order kept: lets DuckDB write in parallel, in less
    # memory (its documented advice for large COPY ... TO)
    con.execute("SET preserve_insertion_order = false")
    return con


def filter_manifest(
    manifests: list[str] | str,
    out: str | os.PathLike,
    *,
    dedup_phash: bool = False,
    memory_limit: str | None = "4GB",
    threads: int | None = None,
    progress: bool = False,
    **thresholds,
) -> FilterResult:
    """Write the rows of ``manifests`` passing every rule to ``out`` (parquet, zstd)."""
    try:
        import duckdb
    except ImportError:
        raise ValueError("vssl curate filter needs DuckDB: pip install 'vssl[filter]'") from None

    files = manifest_files([manifests] if isinstance(manifests, (str, os.PathLike)) else manifests)
    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out must be a .parquet file, got {out}")
    if os.path.abspath(out) in files:
        raise ValueError(f"--out {out} is one of the inputs: write to another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    con = _connect(memory_limit, threads, str(out.parent / ".duckdb_tmp"))
    con.execute(f"SET enable_progress_bar = {str(bool(progress)).lower()}")
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    src = f"read_parquet([{listed}], union_by_name = true, filename = '{_FILE}', file_row_number = true)"
    try:
        con.execute(f"CREATE VIEW manifest AS SELECT * FROM {src}")
        columns = [
            r[0]
            for r in con.execute("DESCRIBE manifest").fetchall()
            if r[0] not in (_FILE, "file_row_number")
        ]
    except duckdb.Error as exc:
        raise ValueError(f"cannot read the manifest as parquet: {exc}") from None
    rules = build_rules(columns, **thresholds)
    for r in rules:  # a wrong --where is named before any scan
        try:
            con.execute(f"EXPLAIN SELECT count(*) FROM manifest WHERE {r.sql}")
        except duckdb.Error as exc:
            msg = str(exc).splitlines()[0]
            raise ValueError(
                f"rule '{r.name}' is not valid SQL over the manifest: {msg} (columns: "
                f"{', '.join(columns)})"
            ) from None
    if dedup_phash and PHASH_COLUMN not in {c.lower() for c in columns}:
        _pick(columns, [PHASH_COLUMN], "--dedup-phash")

    sums = ["count(*)"]
    for i in range(len(rules)):
        sums.append(
            "count(*) FILTER (WHERE " + " AND ".join(f"({r.sql})" for r in rules[: i + 1]) + ")"
        )
    counts = con.execute(f"SELECT {', '.join(sums)} FROM manifest").fetchone()
    kept = [(r.name, int(n)) for r, n in zip(rules, counts[1:])]
    where = " AND ".join(f"({r.sql})" for r in rules) or "true"
    user_cols = ", ".join(_q(c) for c in columns)
    if dedup_phash:
        ph = _q(PHASH_COLUMN)
        query = f"""
            WITH passed AS (SELECT * FROM manifest WHERE {where}),
            firsts AS (
                SELECT min({{'f': {_FILE}, 'r': file_row_number}}) AS k FROM passed
                WHERE {ph} IS NOT NULL GROUP BY {ph}
            )
            SELECT {user_cols} FROM passed
            WHERE {ph} IS NULL OR {{'f': {_FILE}, 'r': file_row_number}} IN (SELECT k FROM firsts)
        """
    else:
        query = f"SELECT {user_cols} FROM manifest WHERE {where}"
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        con.execute(
            f"COPY ({query}) TO '{tmp}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)"
        )
        rows_out = con.execute("SELECT count(*) FROM read_parquet(?)", [str(tmp)]).fetchone()[0]
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
        con.close()
        spill = out.parent / ".duckdb_tmp"
        if spill.is_dir() and not any(spill.iterdir()):
            spill.rmdir()
    if dedup_phash:
        kept.append((f"one row per {PHASH_COLUMN}", int(rows_out)))
    return FilterResult(int(counts[0]), kept, int(rows_out), time.perf_counter() - t0)


def format_result(res: FilterResult) -> str:
    rows = [("input", res.rows_in)] + res.kept
    width = max(len(n) for n, _ in rows)
    lines = [f"{'rule':<{width}}  {'rows kept':>13}  {'of input':>8}"]
    for name, n in rows:
        pct = 100 * n / res.rows_in if res.rows_in else 0.0
        lines.append(f"{name:<{width}}  {n:>13,}  {pct:>7.2f}%")
    rate = res.rows_in / res.seconds if res.seconds else 0.0
    lines.append(f"wrote {res.rows_out:,} rows in {res.seconds:.1f}s ({rate:,.0f} rows/s)")
    return "\n".join(lines)


EXAMPLES = """\
examples:
  # Kakao's COYO image filters, on all 128 parquet files
  vssl curate filter 'coyo-700m/data/*.parquet' --out coyo-kept.parquet \\
      --min-size 200 --max-aspect-ratio 3 --max-nsfw 0.5 --dedup-phash
  # DataComp-style CLIP threshold plus any SQL
  vssl curate filter part-*.parquet --out kept.parquet --min-clip-similarity 0.28 \\
      --where "text_length BETWEEN 5 AND 1000" --where "url NOT LIKE '%.gif'"

Rules apply in the order listed above (then each --where, then --dedup-phash); the report gives
the rows left after each. Memory stays under --memory-limit: DuckDB streams the parquet files and
spills to OUT's folder (.duckdb_tmp) past it.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "filter",
        help=HELP,
        description="Keep the rows of parquet manifests that pass metadata thresholds and SQL "
        "predicates (DuckDB, streaming: any number of rows in bounded memory).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", nargs="+", metavar="MANIFEST", help="parquet files, globs, folders")
    p.add_argument("--out", required=True, help="output parquet (the kept rows, all columns)")
    t = p.add_argument_group("thresholds (COYO names; DataComp/LAION names are found too)")
    t.add_argument("--min-clip-similarity", type=float, metavar="S")
    t.add_argument(
        "--clip-column", metavar="COL", help="column for --min-clip-similarity (default: "
        "clip_similarity_vitb32, else clip_b32_similarity_score, else similarity)",
    )  # fmt: skip
    t.add_argument("--min-aesthetic", type=float, metavar="S", help="aesthetic_score_laion_v2")
    t.add_argument("--max-watermark", type=float, metavar="P", help="watermark_score")
    t.add_argument(
        "--max-nsfw", type=float, metavar="P", help="every NSFW score present (COYO: both)"
    )
    t.add_argument("--min-size", type=int, metavar="PX", help="smaller side of width/height")
    t.add_argument("--max-aspect-ratio", type=float, metavar="R", help="long side / short side")
    t.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="SQL",
        help="any DuckDB predicate over the columns (repeatable; each is a rule)",
    )
    t.add_argument(
        "--dedup-phash",
        action="store_true",
        help="keep one row per exact image_phash (the first in file order)",
    )
    r = p.add_argument_group("resources")
    r.add_argument("--memory-limit", default="4GB", help="DuckDB memory limit (default: 4GB)")
    r.add_argument("--threads", type=int, help="DuckDB threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_filter)
    return p


def _cmd_filter(args) -> int:
    res = filter_manifest(
        args.manifest,
        args.out,
        dedup_phash=args.dedup_phash,
        memory_limit=args.memory_limit,
        threads=args.threads,
        progress=not args.quiet and sys.stderr.isatty(),
        min_clip_similarity=args.min_clip_similarity,
        clip_column=args.clip_column,
        min_aesthetic=args.min_aesthetic,
        max_watermark=args.max_watermark,
        max_nsfw=args.max_nsfw,
        min_size=args.min_size,
        max_aspect_ratio=args.max_aspect_ratio,
        where=args.where,
    )
    print(format_result(res))
    return 0 if res.rows_out else 1
