"""`vssl curate filter` on N synthetic COYO rows: rows/s and peak memory, vs a pyarrow.dataset peer.

    python benchmarks/curate_filter.py --rows 10000000 --data /tmp/coyo-synth

The manifest (COYO-700M's 17 columns, 1M rows per file, ~78% unique pHashes as in COYO) is
generated once with DuckDB and reused. Each command runs in its own process; peak memory is that
process's max RSS (os.wait4). The peer is the same threshold filter with pyarrow.dataset's
streaming scanner and a ParquetWriter (no per-rule counts, no dedup).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = [
    "--min-clip-similarity", "0.28", "--max-watermark", "0.5", "--max-nsfw", "0.5",
    "--min-size", "200", "--max-aspect-ratio", "3", "--where", "text_length BETWEEN 5 AND 1000",
]  # fmt: skip

PEER = r"""
import sys, pyarrow.dataset as ds, pyarrow.parquet as pq, pyarrow.compute as pc
src, out = sys.argv[1], sys.argv[2]
d = ds.dataset(src, format="parquet")
w, h = pc.field("width"), pc.field("height")
expr = (
    (pc.field("clip_similarity_vitb32") >= 0.28) & (pc.field("watermark_score") <= 0.5)
    & (pc.field("nsfw_score_opennsfw2") <= 0.5) & (pc.field("nsfw_score_gantman") <= 0.5)
    & (pc.min_element_wise(w, h) >= 200) & (pc.max_element_wise(w, h) <= pc.multiply(pc.min_element_wise(w, h), 3))
    & (pc.field("text_length") >= 5) & (pc.field("text_length") <= 1000)
)
n = 0
with pq.ParquetWriter(out, d.schema, compression="zstd") as wr:
    for b in d.scanner(filter=expr, batch_size=131072).to_batches():
        if b.num_rows:
            wr.write_batch(b); n += b.num_rows
print("kept", n)
"""


def generate(folder: Path, rows: int, per_file: int = 1_000_000) -> None:
    import duckdb

    folder.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SELECT setseed(0.42)")
    for i, start in enumerate(range(0, rows, per_file)):
        path = folder / f"part-{i:05d}.parquet"
        if path.exists():
            continue
        n = min(per_file, rows - start)
        con.execute(
            f"""COPY (SELECT
              range AS id,
              'https://img' || (range % 97) || '.example.com/' || md5(range::VARCHAR) || '.jpg' AS url,
              'an alt text of an image number ' || range AS text,
              printf('%016x', (random() * {int(rows * 0.78)})::BIGINT) AS image_phash,
              (50 + random() * 1500)::INT AS width,
              (50 + random() * 1500)::INT AS height,
              (random() * 400)::INT AS text_length,
              (random() * 60)::INT AS word_count,
              (random() * 80)::INT AS num_tokens_bert,
              (random() * 80)::INT AS num_tokens_gpt,
              (random() * 3)::INT AS num_faces,
              0.291 + 0.05 * (random() + random() + random() - 1.5) AS clip_similarity_vitb32,
              0.25 + 0.05 * (random() + random() + random() - 1.5) AS clip_similarity_vitl14,
              random() ** 6 AS nsfw_score_opennsfw2,
              random() ** 6 AS nsfw_score_gantman,
              random() ** 2.5 AS watermark_score,
              4.77 + (random() + random() + random() - 1.5) AS aesthetic_score_laion_v2
            FROM range({start}, {start + n})) TO '{path}' (FORMAT parquet, COMPRESSION snappy)"""
        )


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}
    )  # fmt: skip
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return {"seconds": round(secs, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "out": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--data", default="/tmp/coyo-synth")
    ap.add_argument("--memory-limit", default="2GB")
    args = ap.parse_args()
    data = Path(args.data) / f"rows{args.rows}"
    t0 = time.perf_counter()
    generate(data, args.rows)
    print(f"manifest: {data} ({time.perf_counter() - t0:.0f}s)", flush=True)
    size = sum(p.stat().st_size for p in data.glob("*.parquet"))
    out = Path(args.data) / "out"
    out.mkdir(exist_ok=True)
    vssl = [sys.executable, "-m", "vssl", "curate", "filter", str(data / "*.parquet")]
    runs = {
        "vssl curate filter (thresholds + where)": vssl
        + ["--out", str(out / "a.parquet"), "--quiet", "--memory-limit", args.memory_limit]
        + RULES,
        "vssl curate filter (+ --dedup-phash)": vssl
        + ["--out", str(out / "b.parquet"), "--quiet", "--memory-limit", args.memory_limit]
        + RULES
        + ["--dedup-phash"],
        "peer: pyarrow.dataset scanner + ParquetWriter": [
            sys.executable,
            "-c",
            PEER,
            str(data),
            str(out / "c.parquet"),
        ],  # fmt: skip
    }
    results = {"rows": args.rows, "manifest_bytes": size, "load": os.getloadavg()[0]}
    for name, cmd in runs.items():
        r = run(cmd)
        r["rows_per_s"] = round(args.rows / r["seconds"])
        print(
            f"{name}: {r['seconds']}s  {r['rows_per_s']:,} rows/s  peak RSS {r['peak_rss_mb']} MB"
        )
        print("   " + r["out"].strip().replace("\n", "\n   "), flush=True)
        results[name] = r
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps({k: v for k, v in results.items()}, default=str)[:2000])


if __name__ == "__main__":
    main()
