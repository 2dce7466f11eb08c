#!/usr/bin/env python
"""`vssl curate` at scale on synthetic features: hierarchical k-means and self-dedup.

Data (``make``): N x D float16 features written as a `vssl embed` folder, an imbalanced mixture
(4 huge modes hold 40% of the rows, 1996 modes share the rest with Zipf weights); row = 0.55 x
mode direction + unit Gaussian noise, so two rows of one mode have cosine ~0.23 and rows of two
modes ~0. Each block of 100k rows holds 1,000 planted near-duplicate pairs (a row and a noisy
copy, cosine 0.80-0.98), so the first 100k / 300k / 1M rows are complete subsets.

(kmeans) `vssl curate cluster` with levels 2000,200,20 and resampling 1,10,10 at each size (time,
         peak RSS), then `vssl curate sample` (cluster entropy before/after); the peer in the same
         run is faiss's flat k-means (``faiss.Kmeans``, same k and iterations, all points) of the
         first level alone on the largest size.
(dedup)  `vssl curate dedup` on the largest size (recall of the planted pairs, rows wrongly
         removed), and on the first 100k rows against a brute-force reference (every pair's
         cosine, blocked numpy GEMMs, scipy connected components): time and agreement.

    python benchmarks/curate_scale.py make --n 1000000 --out /tmp/curate_bench
    nice python benchmarks/curate_scale.py kmeans --data /tmp/curate_bench --iters 10
    nice python benchmarks/curate_scale.py dedup --data /tmp/curate_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 100_000
PAIRS_PER_CHUNK = 1000


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def _write_folder(folder: Path, x: np.ndarray, start: int = 0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", x)
    n = len(x)
    pq.write_table(
        pa.table(
            {
                "row": pa.array(np.arange(n), type=pa.int64()),
                "path": pa.array([f"/bench/{i:07d}.jpg" for i in range(start, start + n)]),
                "label": pa.array([None] * n, type=pa.string()),
            }
        ),
        folder / "manifest.parquet",
    )


def make(args):
    out = Path(args.out)
    rng = np.random.default_rng(0)
    modes = rng.standard_normal((2000, args.dim)).astype(np.float32)
    modes /= np.linalg.norm(modes, axis=1, keepdims=True)
    w = np.concatenate([np.full(4, 0.1), 0.6 * (1 / np.arange(1, 1997) ** 1.1)])
    w[4:] *= 0.6 / w[4:].sum()
    out.mkdir(parents=True, exist_ok=True)
    full = np.empty((args.n, args.dim), dtype=np.float16)
    pairs, labels = [], []
    for s in range(0, args.n, CHUNK):
        m = min(CHUNK, args.n - s)
        lab = rng.choice(2000, m, p=w)
        x = 0.55 * modes[lab] + rng.standard_normal((m, args.dim)).astype(np.float32) / np.sqrt(
            args.dim
        )
        idx = rng.choice(m, 2 * PAIRS_PER_CHUNK, replace=False)
        a, b = idx[:PAIRS_PER_CHUNK], idx[PAIRS_PER_CHUNK:]
        sigma = rng.uniform(0.25, 0.85, PAIRS_PER_CHUNK)[:, None]
        noise = rng.standard_normal((PAIRS_PER_CHUNK, args.dim)).astype(np.float32)
        x[b] = x[a] + sigma * noise / np.sqrt(args.dim) * np.linalg.norm(
            x[a], axis=1, keepdims=True
        )
        full[s : s + m] = x
        pairs.append(np.stack([a + s, b + s], axis=1))
        labels.append(lab)
    np.save(out / "pairs.npy", np.concatenate(pairs))
    np.save(out / "modes.npy", np.concatenate(labels))  # the true mode of each row
    for n in sorted({min(v, args.n) for v in (100_000, 300_000, args.n)}):
        _write_folder(out / f"feats_{n}", full[:n])
        print(f"wrote {out / f'feats_{n}'}", flush=True)


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` under /usr/bin/time: (seconds, peak RSS GiB, stderr)."""
    r = subprocess.run(
        ["/usr/bin/time", "-f", "TIME %e %M", *cmd], env=_env(), capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("TIME ")][-1].split()
    return float(line[1]), float(line[2]) / 2**20, r.stderr


def _load():
    return os.getloadavg()


def _sizes(args, data: Path) -> list[int]:
    have = sorted(int(p.name.split("_")[1]) for p in data.glob("feats_*"))
    if not args.sizes:
        return have
    want = [int(v) for v in args.sizes.split(",")]
    missing = set(want) - set(have)
    if missing:
        raise SystemExit(f"no feats_N folder for {sorted(missing)} in {data}")
    return sorted(want)


def kmeans(args):
    data = Path(args.data)
    sizes = _sizes(args, data)
    rows = []
    for n in sizes if not args.peer_only else []:
        out = data / f"clusters_{n}"
        cmd = [
            sys.executable,
            "-m",
            "vssl",
            "curate",
            "cluster",
            str(data / f"feats_{n}"),
            "--levels",
            args.levels,
            "--resample-steps",
            args.steps,
            "--iters",
            str(args.iters),
            "--init-points-per-centroid",
            str(args.init_ppc),
            "--out",
            str(out),
            "--no-progress",
        ]
        load0 = _load()
        sec, rss, _ = _timed(cmd)
        feat_gib = n * args_dim(data, n) * 2 / 2**30
        rows.append(
            {
                "what": f"vssl curate cluster N={n}",
                "seconds": sec,
                "peak_rss_gib": rss,
                "features_gib": feat_gib,
                "load_before": load0,
                "load_after": _load(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    n = sizes[-1]
    if not args.peer_only:
        _, _, err = _timed(
            [
                sys.executable,
                "-m",
                "vssl",
                "curate",
                "sample",
                str(data / f"clusters_{n}"),
                "--n",
                str(n // 10),
                "--out",
                str(data / f"sample_{n}.parquet"),
            ]
        )
        rows.append(
            {"what": f"vssl curate sample N={n} -> {n // 10}", "note": err.strip().splitlines()[-2]}
        )
        print(json.dumps(rows[-1]), flush=True)
    code = (
        "import faiss, numpy as np, time, sys\n"
        f"x = np.load('{data / f'feats_{n}' / 'embeddings.npy'}').astype(np.float32)\n"
        "t = time.perf_counter()\n"
        f"km = faiss.Kmeans(x.shape[1], {args.levels.split(',')[0]}, niter={args.iters}, seed=0, "
        "max_points_per_centroid=10**9)\n"
        "km.train(x)\n"
        "print('train_s', time.perf_counter() - t, file=sys.stderr)\n"
    )
    load0 = _load()
    sec, rss, err = _timed([sys.executable, "-c", code])
    rows.append(
        {
            "what": f"faiss.Kmeans first level only N={n} (peer)",
            "seconds": sec,
            "peak_rss_gib": rss,
            "note": [ln for ln in err.splitlines() if "train_s" in ln],
            "load_before": load0,
            "load_after": _load(),
        }
    )
    print(json.dumps(rows[-1]), flush=True)


def balance(args):
    """The true-mode distribution of a sample against the data's: entropy and the huge modes'
    share (modes 0-3 are the huge ones)."""
    import pyarrow.parquet as pq

    modes = np.load(Path(args.data) / "modes.npy")
    rows = pq.read_table(args.sample, columns=["row"]).column("row").to_numpy()
    n = int(args.n)

    def ent(lab):
        p = np.bincount(lab, minlength=2000).astype(float)
        p = p[p > 0] / p.sum()
        return float(-(p * np.log(p)).sum())

    before, after = modes[:n], modes[:n][rows]
    print(
        json.dumps(
            {
                "what": f"balanced sample {len(rows)} of {n}: true modes",
                "entropy_before": ent(before),
                "entropy_after": ent(after),
                "entropy_max": float(np.log(2000)),
                "huge_modes_share_before": float((before < 4).mean()),
                "huge_modes_share_after": float((after < 4).mean()),
                "modes_present_before": int(len(np.unique(before))),
                "modes_present_after": int(len(np.unique(after))),
            }
        ),
        flush=True,
    )


def args_dim(data: Path, n: int) -> int:
    return np.load(data / f"feats_{n}" / "embeddings.npy", mmap_mode="r").shape[1]


def _components_from_removed(removed_parquet: Path, n: int) -> np.ndarray:
    import pyarrow.parquet as pq

    t = pq.read_table(removed_parquet, columns=["row", "duplicate_of"]).to_pydict()
    rep = np.arange(n)
    rep[np.array(t["row"], dtype=np.int64)] = np.array(t["duplicate_of"], dtype=np.int64)
    return rep


def brute_force_dedup(x: np.ndarray, threshold: float) -> np.ndarray:
    """Every pair's cosine in 4096-row blocks, edges above the threshold, scipy components;
    the lowest row of each component is kept. Returns the representative of each row."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    u = x.astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    src, dst = [], []
    for s in range(0, len(u), 4096):
        sim = u[s : s + 4096] @ u.T
        i, j = np.nonzero(sim > threshold)
        keep = (i + s) != j
        src.append(i[keep] + s)
        dst.append(j[keep])
    src, dst = np.concatenate(src), np.concatenate(dst)
    g = sp.coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(len(u),) * 2)
    _, lab = connected_components(g, directed=False)
    first = np.full(lab.max() + 1, len(u))
    np.minimum.at(first, lab, np.arange(len(u)))
    return first[lab]


def dedup(args):
    data = Path(args.data)
    sizes = _sizes(args, data)
    pairs = np.load(data / "pairs.npy")
    rows = []
    for n in sorted({sizes[-1], sizes[0]}) if not args.peer_only else []:
        tag = "" if args.index == "auto" else f"_{args.index}"
        out = data / f"keep_{n}{tag}.parquet"
        load0 = _load()
        sec, rss, err = _timed(
            [
                sys.executable,
                "-m",
                "vssl",
                "curate",
                "dedup",
                str(data / f"feats_{n}"),
                "--index",
                args.index,
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        rep = _components_from_removed(out.with_name(f"{out.stem}.removed.parquet"), n)
        p = pairs[(pairs < n).all(axis=1)]
        recall = float((rep[p[:, 0]] == rep[p[:, 1]]).mean())
        in_pair = np.zeros(n, bool)
        in_pair[p.ravel()] = True
        removed = rep != np.arange(n)
        wrong = float((removed & ~in_pair).sum() / n)
        index_line = [ln for ln in err.splitlines() if "rows:" in ln]
        rows.append(
            {
                "what": f"vssl curate dedup N={n}",
                "seconds": sec,
                "peak_rss_gib": rss,
                "planted_pair_recall": recall,
                "wrongly_removed_frac": wrong,
                "removed": int(removed.sum()),
                "index": index_line,
                "load_before": load0,
                "load_after": _load(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.index != "auto":
        return
    n = sizes[0]
    x = np.load(data / f"feats_{n}" / "embeddings.npy")
    load0 = _load()
    t = time.perf_counter()
    ref = brute_force_dedup(x, 0.6)
    sec = time.perf_counter() - t
    ours = _components_from_removed(data / f"keep_{n}.removed.parquet", n)
    rows.append(
        {
            "what": f"brute-force dedup N={n} (peer)",
            "seconds": sec,
            "same_kept_rows_as_vssl": bool((ref == ours).all()),
            "rows_differing": int((ref != ours).sum()),
            "load_before": load0,
            "load_after": _load(),
        }
    )
    print(json.dumps(rows[-1]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    m = sub.add_parser("make")
    m.add_argument("--n", type=int, default=1_000_000)
    m.add_argument("--dim", type=int, default=384)
    m.add_argument("--out", required=True)
    k = sub.add_parser("kmeans")
    k.add_argument("--data", required=True)
    k.add_argument("--levels", default="2000,200,20")
    k.add_argument("--steps", default="1,10,10")
    k.add_argument("--iters", type=int, default=50)
    k.add_argument("--init-ppc", type=int, default=32)
    k.add_argument("--sizes", default=None, help="comma-separated N (default: every feats_N)")
    k.add_argument("--peer-only", action="store_true", help="only faiss's k-means at max N")
    d = sub.add_parser("dedup")
    d.add_argument("--data", required=True)
    d.add_argument("--sizes", default=None, help="comma-separated N (default: every feats_N)")
    d.add_argument("--index", default="auto", help="faiss index for vssl (not auto: no peer)")
    d.add_argument("--peer-only", action="store_true", help="only the brute force, at min N")
    b = sub.add_parser("balance")
    b.add_argument("--data", required=True, help="a folder made by `make` (modes.npy)")
    b.add_argument("--sample", required=True, help="a `vssl curate sample` output")
    b.add_argument("--n", required=True, help="the number of rows that were clustered")
    args = ap.parse_args()
    {"make": make, "kmeans": kmeans, "dedup": dedup, "balance": balance}[args.part](args)


if __name__ == "__main__":
    main()
