"""``vssl curate sample``: balanced sampling down a cluster hierarchy (ssl-data-curation's
hierarchical_sampling; Vo et al. 2024; docs/architecture.md, Curation).

Top-down: at the top level, the integer cap x with sum_i min(x, size_i) closest to the target
below it is found by binary search; the remainder goes +1 to random clusters larger than the cap.
Each cluster's share is split the same way among its sub-clusters, down to level 1, where the
points are taken at random (``random``) or closest to the centroid first (``closest``). Huge modes
are capped, the long tail is kept whole: the cluster distribution gets flatter (its entropy,
printed before and after, rises).
"""

from __future__ import annotations

import argparse

import numpy as np

HELP = "balanced top-down sampling of a cluster hierarchy to N images"

_EPILOG = """\
examples:
  vssl curate sample clusters/ --n 1000000 --out sample.parquet
  vssl curate sample clusters/ --n 50000 --strategy closest --out sample.parquet
  vssl data pack sample.parquet shards/              # then pretrain on the shards

The output is clusters/clusters.parquet's rows that were sampled (a manifest with a path column).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample",
        help=HELP,
        description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("clusters", metavar="CLUSTERS", help="a `vssl curate cluster` output folder")
    p.add_argument("--n", type=int, required=True, help="how many images to sample")
    p.add_argument(
        "--strategy",
        choices=("random", "closest"),
        default="random",
        help="which points of a level-1 cluster (default random, the reference's default)",
    )
    p.add_argument(
        "--multiplier",
        type=int,
        default=1,
        help="a cluster may give up to multiplier x its size (repeats; default 1: no repeats)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="the sampled rows")
    p.set_defaults(func=run)
    return p


def best_cut(sizes: np.ndarray, target: int) -> int:
    """The integer x with sum(min(x, sizes)) <= target, as large as possible (binary search);
    max(sizes) when everything fits."""
    if target < 0:
        raise ValueError(f"target {target} must be >= 0")
    if sizes.sum() <= target:
        return int(sizes.max(initial=0))
    lo, hi = 0, int(sizes.max())  # sum at lo <= target < sum at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(mid, sizes).sum() <= target:
            lo = mid
        else:
            hi = mid
    return lo


def split_target(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Per-cluster targets summing to ``target`` (or to all when it is larger): min(cap, size),
    plus one for random clusters above the cap until the remainder is spent."""
    sizes = np.asarray(sizes, dtype=np.int64)
    cut = best_cut(sizes, target)
    if sizes.sum() <= target:
        return sizes.copy()
    out = np.minimum(cut, sizes)
    remainder = target - int(out.sum())
    above = np.nonzero(sizes > cut)[0]
    out[rng.choice(above, remainder, replace=False)] += 1
    return out


def hierarchical_sample(
    levels: list[dict], n: int, *, strategy: str = "random", multiplier: int = 1, seed: int = 0
) -> np.ndarray:
    """Row indices (level-1 points; repeated with ``multiplier`` > 1) of a balanced sample of
    ``n`` from the hierarchy ``levels`` (``vssl.curate.cluster.load_levels``)."""
    if strategy not in ("random", "closest"):
        raise ValueError(f"unknown strategy {strategy!r}: random or closest")
    if n < 0 or multiplier < 1:
        raise ValueError("--n must be >= 0 and --multiplier >= 1")
    rng = np.random.default_rng(seed)
    a1 = np.asarray(levels[0]["assignment"], dtype=np.int64)
    d1 = np.asarray(levels[0]["distance"], dtype=np.float64)
    k1 = len(levels[0]["centroids"])
    order = np.lexsort((np.arange(len(a1)), d1, a1))  # points by cluster, closest first
    starts = np.searchsorted(a1[order], np.arange(k1 + 1))
    members = [order[starts[c] : starts[c + 1]] for c in range(k1)]
    # children[l][c]: the clusters of level l (0-based) that belong to cluster c of level l+1
    children, flat = [], [np.diff(starts)]
    for lv in levels[1:]:
        a = np.asarray(lv["assignment"], dtype=np.int64)
        k = len(lv["centroids"])
        o = np.argsort(a, kind="stable")
        s = np.searchsorted(a[o], np.arange(k + 1))
        children.append([o[s[c] : s[c + 1]] for c in range(k)])
        flat.append(np.bincount(a, weights=flat[-1], minlength=k).astype(np.int64))

    def leaf(c: int, t: int) -> np.ndarray:
        pts = members[c]
        if t <= 0:
            return pts[:0]
        reps = t // len(pts)
        rest = t - reps * len(pts)
        tail = pts[:rest] if strategy == "closest" else rng.choice(pts, rest, replace=False)
        return np.concatenate([np.tile(pts, reps), tail])

    def down(level: int, c: int, t: int) -> list[np.ndarray]:
        if level == 0:
            return [leaf(c, t)]
        subs = children[level - 1][c]
        targets = split_target(flat[level - 1][subs] * multiplier, t, rng)
        out = []
        for s, ts in zip(subs, targets):
            out += down(level - 1, int(s), int(ts))
        return out

    top = len(levels) - 1
    targets = split_target(flat[top] * multiplier, n, rng)
    picked = []
    for c, t in enumerate(targets):
        picked += down(top, c, int(t))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def entropy(labels: np.ndarray, k: int) -> float:
    """Shannon entropy (nats) of the cluster distribution of ``labels``."""
    p = np.bincount(labels, minlength=k).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ._output import check_out, note, write_table
    from .cluster import RESULT, load_levels

    out = check_out(args.out, "sample")
    levels = load_levels(args.clusters)
    n_points = len(levels[0]["assignment"])
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.n > n_points * args.multiplier:
        note(
            "sample",
            f"--n {args.n} is more than the {n_points} clustered points x multiplier "
            f"{args.multiplier}: taking all of them",
        )
    rows = hierarchical_sample(
        levels, args.n, strategy=args.strategy, multiplier=args.multiplier, seed=args.seed
    )
    table = pq.read_table(f"{args.clusters}/{RESULT}")
    if table.num_rows != n_points:
        raise ValueError(
            f"{args.clusters}/{RESULT} has {table.num_rows} rows, level 1 {n_points}: the folder "
            "mixes two runs; re-run `vssl curate cluster` into a clean folder"
        )
    write_table(table.take(pa.array(rows)), out)
    a = np.asarray(levels[0]["assignment"], dtype=np.int64)
    k1 = len(levels[0]["centroids"])
    top = table.column(f"cluster_{len(levels)}").to_numpy()
    kt = len(levels[-1]["centroids"])
    note(
        "sample",
        f"{len(rows)} of {n_points} rows -> {out}; cluster entropy (nats) level 1: "
        f"{entropy(a, k1):.3f} -> {entropy(a[rows], k1):.3f} (max {np.log(k1):.3f}), "
        f"level {len(levels)}: {entropy(top, kt):.3f} -> {entropy(top[rows], kt):.3f}",
    )
    return 0
