"""``vssl curate retrieve``: images of an uncurated pool close to a curated query set, as DINOv2
built LVD-142M (Oquab et al. 2023, Sec. 3; docs/architecture.md, Curation).

Sample-based (large query sets): the ``k`` most cosine-similar pool images of every query (DINOv2:
k = 4, 32 for ImageNet-1k), merged: a pool image retrieved by several queries appears once, with
its best similarity, the query that gave it and how many queries retrieved it. Cluster-based
(small query sets, ``--clusters``): the queries are assigned to the pool's level-1 clusters (from
`vssl curate cluster`); from every cluster holding at least ``--min-queries`` queries, up to
``--per-cluster`` images are taken (DINOv2: clusters with more than 3 queries, 10,000 each).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

HELP = "retrieve pool images near a curated query set (k-NN per query, or whole clusters)"

_EPILOG = """\
examples:
  vssl curate retrieve pool_feats/ --queries in1k_feats/ --k 32 --out retrieved.parquet
  vssl curate retrieve pool_feats/ --queries small_set/ --clusters clusters/ --out r.parquet

POOL_FEATS and QUERY_FEATS are `vssl embed` folders made with the same model; --clusters is a
`vssl curate cluster` folder made from POOL_FEATS.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "retrieve",
        help=HELP,
        description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pool", metavar="POOL_FEATS", help="features of the uncurated pool")
    p.add_argument("--queries", required=True, metavar="QUERY_FEATS", help="curated query set")
    p.add_argument("--k", type=int, default=4, help="pool images per query (default 4)")
    p.add_argument(
        "--clusters",
        metavar="CLUSTERS",
        default=None,
        help="cluster-based retrieval: a `vssl curate cluster` folder of POOL_FEATS",
    )
    p.add_argument(
        "--min-queries",
        type=int,
        default=4,
        help="with --clusters: take clusters holding at least this many queries (default 4: "
        "DINOv2's 'more than 3')",
    )
    p.add_argument(
        "--per-cluster",
        type=int,
        default=10000,
        help="with --clusters: images taken per cluster, closest to the centroid first "
        "(default 10000)",
    )
    p.add_argument(
        "--index",
        default="auto",
        choices=("auto", "flat", "ivf", "ivfpq"),
        help="faiss index of the pool (default auto: exact flat up to 262144 rows, IVF beyond)",
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched (default nlist/64)")
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="the retrieved pool rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def retrieve_knn(pool, queries, k: int, *, index="auto", nprobe=None, progress=True):
    """Sample-based retrieval. Returns ``(rows, score, query_row, hits)``, rows ascending."""
    from tqdm import tqdm

    from ..neighbors import NeighborIndex
    from ._output import note

    idx = NeighborIndex(pool, kind=index, nprobe=nprobe, progress=progress)
    note("retrieve", f"pool of {len(pool)} rows: {idx.choice.describe()}")
    all_ids, all_sims, all_q = [], [], []
    bar = tqdm(
        total=len(queries), unit="query", desc="search", disable=not progress, file=sys.stderr
    )
    for start, block in queries.blocks(16384, normalize=True):
        sims, ids = idx.search(block, k)
        valid = ids >= 0
        all_ids.append(ids[valid])
        all_sims.append(sims[valid])
        all_q.append(
            np.broadcast_to(np.arange(start, start + len(block))[:, None], ids.shape)[valid]
        )
        bar.update(len(block))
    bar.close()
    ids, sims, q = np.concatenate(all_ids), np.concatenate(all_sims), np.concatenate(all_q)
    order = np.lexsort((q, -sims, ids))  # per pool row: best similarity first, then lowest query
    ids, sims, q = ids[order], sims[order], q[order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, bool)
    rows = ids[first]
    hits = np.diff(np.append(np.nonzero(first)[0], len(ids)))
    return rows, sims[first], q[first], hits


def retrieve_clusters(clusters, queries, min_queries: int, per_cluster: int):
    """Cluster-based retrieval. Returns ``(rows, cluster, queries_in_cluster)``, rows ascending."""
    import faiss

    from .cluster import load_levels

    level = load_levels(clusters)[0]
    cen = np.ascontiguousarray(level["centroids"], dtype=np.float32)
    if cen.shape[1] != queries.dim:
        raise ValueError(
            f"{clusters} has width {cen.shape[1]} but the queries {queries.path} have "
            f"{queries.dim}: a dimension mismatch; cluster and embed with the same model"
        )
    index = faiss.IndexFlatL2(cen.shape[1])
    index.add(cen)
    q_cluster = np.concatenate([index.search(b, 1)[1][:, 0] for _, b in queries.blocks(65536)])
    counts = np.bincount(q_cluster, minlength=len(cen))
    chosen = np.nonzero(counts >= min_queries)[0]
    a = np.asarray(level["assignment"], dtype=np.int64)
    d = np.asarray(level["distance"], dtype=np.float64)
    order = np.lexsort((np.arange(len(a)), d, a))
    starts = np.searchsorted(a[order], np.arange(len(cen) + 1))
    rows = [
        order[starts[c] : starts[c] + min(per_cluster, starts[c + 1] - starts[c])] for c in chosen
    ]
    rows = np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
    return rows, a[rows], counts[a[rows]]


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from ._features import FeatureParts
    from ._output import check_out, note, write_table

    out = check_out(args.out, "retrieve")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    pool = FeatureParts(args.pool, what="pool features")
    queries = FeatureParts(args.queries, what="query features")
    pool.check_width(queries)
    table = pool.manifest()
    if args.clusters:
        if args.min_queries < 1 or args.per_cluster < 1:
            raise ValueError("--min-queries and --per-cluster must be >= 1")
        from .cluster import load_levels

        n_clustered = len(load_levels(args.clusters)[0]["assignment"])
        if n_clustered != len(pool):
            raise ValueError(
                f"{args.clusters} clusters {n_clustered} points but {args.pool} has {len(pool)}: "
                "cluster this pool with `vssl curate cluster` first"
            )
        rows, cl, nq = retrieve_clusters(args.clusters, queries, args.min_queries, args.per_cluster)
        result = table.take(pa.array(rows))
        result = result.append_column("cluster_1", pa.array(cl))
        result = result.append_column("queries_in_cluster", pa.array(nq))
        how = f"clusters with >= {args.min_queries} queries, <= {args.per_cluster} each"
    else:
        rows, score, q, hits = retrieve_knn(
            pool,
            queries,
            args.k,
            index=args.index,
            nprobe=args.nprobe,
            progress=not args.no_progress,
        )
        qpaths = queries.manifest().column("path").take(pa.array(q))
        result = table.take(pa.array(rows))
        result = result.append_column("score", pa.array(score))
        result = result.append_column("query_row", pa.array(q))
        result = result.append_column("query_path", qpaths)
        result = result.append_column("hits", pa.array(hits))
        how = f"{args.k} per query"
    write_table(result, out)
    note("retrieve", f"{result.num_rows} pool rows ({how}) from {len(queries)} queries -> {out}")
    return 0
