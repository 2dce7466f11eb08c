"""`vssl curate retrieve` against brute-force cosine search, and the cluster-based mode."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from _curate_data import write_features

from vssl.cli import main


def test_knn_retrieval_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((800, 12)).astype(np.float32)
    queries = rng.standard_normal((25, 12)).astype(np.float32)
    write_features(tmp_path / "pool", pool)
    write_features(tmp_path / "q", queries)
    out = tmp_path / "r.parquet"
    assert (
        main(
            [
                "curate",
                "retrieve",
                str(tmp_path / "pool"),
                "--queries",
                str(tmp_path / "q"),
                "--k",
                "6",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    t = pq.read_table(out).to_pydict()
    p16 = pool.astype(np.float16).astype(np.float64)
    q16 = queries.astype(np.float16).astype(np.float64)
    sim = (q16 / np.linalg.norm(q16, axis=1, keepdims=True)) @ (
        p16 / np.linalg.norm(p16, axis=1, keepdims=True)
    ).T
    top = np.argsort(-sim, axis=1)[:, :6]
    ref_rows = sorted(set(top.ravel().tolist()))
    assert t["row"] == ref_rows
    for r, s, q, h in zip(t["row"], t["score"], t["query_row"], t["hits"]):
        holders = np.nonzero((top == r).any(axis=1))[0]
        assert h == len(holders)
        assert q == holders[np.argmax(sim[holders, r])]
        assert abs(s - sim[q, r]) < 1e-4
    assert t["query_path"][0].startswith("/img/q/")


def test_cluster_retrieval_takes_clusters_with_queries(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((6, 8)).astype(np.float32) * 5
    pool = np.concatenate([c + 0.2 * rng.standard_normal((100, 8)) for c in centers]).astype(
        np.float32
    )
    queries = np.concatenate(
        [
            centers[1] + 0.2 * rng.standard_normal((5, 8)),
            centers[4] + 0.2 * rng.standard_normal((2, 8)),
        ]
    )
    write_features(tmp_path / "pool", pool)
    write_features(tmp_path / "q", queries.astype(np.float32))
    assert (
        main(
            [
                "curate",
                "cluster",
                str(tmp_path / "pool"),
                "--levels",
                "6",
                "--iters",
                "10",
                "--out",
                str(tmp_path / "cl"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "r.parquet"
    assert (
        main(
            [
                "curate",
                "retrieve",
                str(tmp_path / "pool"),
                "--queries",
                str(tmp_path / "q"),
                "--clusters",
                str(tmp_path / "cl"),
                "--min-queries",
                "4",
                "--per-cluster",
                "30",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    t = pq.read_table(out).to_pydict()
    # only blob 1 holds >= 4 queries: its 30 points closest to the centroid
    assert len(t["row"]) == 30 and all(100 <= r < 200 for r in t["row"])
    assert set(t["queries_in_cluster"]) == {5}
    d = pq.read_table(tmp_path / "cl" / "clusters.parquet").column("distance_1").to_numpy()
    blob = np.arange(100, 200)
    assert set(t["row"]) == set(blob[np.argsort(d[blob], kind="stable")[:30]])


def test_retrieve_dimension_mismatch(tmp_path, capsys):
    write_features(tmp_path / "pool", np.ones((5, 8), np.float32))
    write_features(tmp_path / "q", np.ones((5, 6), np.float32))
    assert (
        main(
            [
                "curate",
                "retrieve",
                str(tmp_path / "pool"),
                "--queries",
                str(tmp_path / "q"),
                "--out",
                str(tmp_path / "r.parquet"),
            ]
        )
        == 2
    )
    assert "dimension mismatch" in capsys.readouterr().err
