"""`vssl curate cluster`: k-means against scikit-learn, the hierarchy, resume, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _curate_data import write_features, write_parts

from vssl.cli import main
from vssl.curate._kmeans import Comm, Rows, _update, kmeans, kmeans_plusplus, sample_per_cluster


def blobs(n_per, centers, d, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 3
    x = np.concatenate([c[i] + spread * rng.standard_normal((n_per[i], d)) for i in range(centers)])
    y = np.repeat(np.arange(centers), n_per)
    return x.astype(np.float32), y


def test_lloyd_matches_sklearn_from_the_same_init():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = rng.standard_normal((900, 8)).astype(np.float32)
    init = x[rng.choice(900, 12, replace=False)]
    c = init.copy()
    for _ in range(12):  # two blocks per pass: the float64 sums cross a block boundary
        c, _, _ = _update(Rows(x), c, Comm(), block_rows=512)
    ref = KMeans(12, init=init.astype(np.float64), n_init=1, max_iter=12, tol=0, algorithm="lloyd")
    ref.fit(x.astype(np.float64))
    np.testing.assert_allclose(c, ref.cluster_centers_, atol=1e-4)


def test_kmeanspp_finds_every_separated_blob():
    x, y = blobs([300, 20, 5, 100, 3, 50], 6, 16, seed=1)
    cen = kmeans_plusplus(x, 6, Comm(), np.random.default_rng(0))
    # one centre in each blob, even the 3-point one (D^2 sampling; a uniform draw would miss it)
    owner = np.argmin(((cen[:, None] - x[None]) ** 2).sum(-1), axis=1)
    assert sorted(y[owner].tolist()) == list(range(6))
    _, labels, _ = kmeans(Rows(x), 6, iters=5)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(y, labels) == 1.0


def test_sample_per_cluster_closest_and_random():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 200)
    dist = rng.random(200).astype(np.float32)
    got = sample_per_cluster(labels, dist, 0, 5, 3, "closest", Comm(), 0)
    ref = np.sort(
        np.concatenate(
            [np.nonzero(labels == c)[0][np.argsort(dist[labels == c])[:3]] for c in range(5)]
        )
    )
    np.testing.assert_array_equal(got, ref)
    r1 = sample_per_cluster(labels, dist, 0, 5, 3, "random", Comm(), 1)
    r2 = sample_per_cluster(labels, dist, 0, 5, 3, "random", Comm(), 2)
    assert len(r1) == 15 and np.bincount(labels[r1]).tolist() == [3] * 5 and set(r1) != set(r2)


def test_hierarchy_resume_and_manifest(tmp_path):
    x, y = blobs([200] * 4 + [30] * 8, 12, 8, seed=3, spread=0.3)
    write_features(tmp_path / "f", x)
    out = tmp_path / "cl"
    args = [
        "curate",
        "cluster",
        str(tmp_path / "f"),
        "--levels",
        "24,6,2",
        "--resample-steps",
        "1,3,2",
        "--iters",
        "10",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    t = pq.read_table(out / "clusters.parquet").to_pydict()
    a1 = np.load(out / "level1" / "assignment.npy")
    a2 = np.load(out / "level2" / "assignment.npy")
    a3 = np.load(out / "level3" / "assignment.npy")
    assert t["cluster_1"] == a1.tolist()
    assert t["cluster_2"] == a2[a1].tolist() and t["cluster_3"] == a3[a2[a1]].tolist()
    c1 = np.load(out / "level1" / "centroids.npy")
    xf = x.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(
        t["distance_1"], np.linalg.norm(xf - c1[a1], axis=1), rtol=1e-4, atol=1e-4
    )
    # every point's level-1 cluster is its nearest centroid (brute force)
    np.testing.assert_array_equal(a1, ((xf[:, None] - c1[None]) ** 2).sum(-1).argmin(1))
    # level 2 assigns level-1 centroids to their nearest level-2 centroid
    c2 = np.load(out / "level2" / "centroids.npy")
    np.testing.assert_array_equal(a2, ((c1[:, None] - c2[None]) ** 2).sum(-1).argmin(1))
    # interrupted after level 1: the rerun reuses it and reproduces the rest exactly
    mtime = (out / "level1" / "centroids.npy").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "level2")
    shutil.rmtree(out / "level3")
    (out / "clusters.parquet").unlink()
    assert main(args) == 0
    assert (out / "level1" / "centroids.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(np.load(out / "level3" / "assignment.npy"), a3)
    assert pq.read_table(out / "clusters.parquet").to_pydict()["cluster_3"] == t["cluster_3"]
    # other settings into the same folder: refused
    assert main(args[:-5] + ["--iters", "5", "--out", str(out), "--no-progress"]) == 2


def test_bad_cluster_input(tmp_path):
    write_features(tmp_path / "f", np.random.default_rng(0).standard_normal((10, 4)))
    assert (
        main(
            [
                "curate",
                "cluster",
                str(tmp_path / "f"),
                "--levels",
                "20",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "curate",
                "cluster",
                str(tmp_path / "f"),
                "--levels",
                "2,5",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    with pytest.raises(ValueError, match="more clusters than points"):
        from vssl.curate.cluster import hierarchical_kmeans

        hierarchical_kmeans(tmp_path / "f", tmp_path / "c", [11])


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    x, _ = blobs([150, 90, 60, 40, 30, 20, 10], 7, 6, seed=5, spread=0.6)
    write_parts(tmp_path / "f", x, world=2)
    common = ["--levels", "14,4", "--resample-steps", "2,3", "--iters", "8", "--no-progress"]
    assert (
        main(["curate", "cluster", str(tmp_path / "f"), *common, "--out", str(tmp_path / "one")])
        == 0
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "vssl",
        "curate",
        "cluster",
        str(tmp_path / "f"),
        *common,
        "--out",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for li in (1, 2):
        a = np.load(tmp_path / "one" / f"level{li}" / "assignment.npy")
        b = np.load(tmp_path / "two" / f"level{li}" / "assignment.npy")
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(
            np.load(tmp_path / "one" / f"level{li}" / "centroids.npy"),
            np.load(tmp_path / "two" / f"level{li}" / "centroids.npy"),
            atol=1e-5,
        )
