"""`vssl curate sample`: balanced hierarchical sampling against brute force and the rules."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from _curate_data import write_features

from vssl.cli import main
from vssl.curate.sample import best_cut, hierarchical_sample, split_target


def test_best_cut_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 200, rng.integers(1, 30))
        target = int(rng.integers(0, sizes.sum() + 50))
        ref = max(x for x in range(sizes.max() + 1) if np.minimum(x, sizes).sum() <= target)
        assert best_cut(sizes, target) == (sizes.max() if sizes.sum() <= target else ref)
        t = split_target(sizes, target, rng)
        assert t.sum() == min(target, sizes.sum()) and (t <= sizes).all()
        cap = best_cut(sizes, target)
        assert ((t == np.minimum(cap, sizes)) | (t == cap + 1)).all()


def _levels(a1, d1, k1, a2, k2):
    return [
        {"assignment": a1, "distance": d1, "centroids": np.zeros((k1, 2))},
        {"assignment": a2, "distance": np.zeros(k1), "centroids": np.zeros((k2, 2))},
    ]


def test_hierarchical_sample_balances_and_respects_strategy():
    # 6 level-1 clusters of sizes 500, 300, 10, 5, 100, 1 under 2 top clusters {0,1,2} {3,4,5}
    sizes = [500, 300, 10, 5, 100, 1]
    a1 = np.repeat(np.arange(6), sizes)
    rng = np.random.default_rng(1)
    d1 = rng.random(len(a1))
    a2 = np.array([0, 0, 0, 1, 1, 1])
    levels = _levels(a1, d1, 6, a2, 2)
    got = hierarchical_sample(levels, 200, strategy="closest", seed=0)
    assert len(got) == 200 and len(set(got)) == 200
    per = np.bincount(a1[got], minlength=6)
    # top: 100 each (both above 100); top 0: cap on {500, 300, 10} -> 45, 45, 10;
    # top 1: {5, 100, 1} -> 5, 94, 1
    assert per.tolist() == [45, 45, 10, 5, 94, 1]
    for c in range(6):  # closest: the c nearest points of each cluster
        pts = np.nonzero(a1 == c)[0]
        assert set(got[a1[got] == c]) == set(pts[np.argsort(d1[pts])[: per[c]]])
    r = hierarchical_sample(levels, 200, strategy="random", seed=0)
    assert np.bincount(a1[r], minlength=6).tolist() == per.tolist()
    # multiplier 2 lets small clusters repeat their points
    m = hierarchical_sample(levels, 900, multiplier=2, seed=0)
    assert len(m) == 900 and np.bincount(a1[m], minlength=6)[5] == 2


def test_sample_cli_end_to_end(tmp_path):
    rng = np.random.default_rng(2)
    # an imbalanced mixture: one huge mode and a tail of small ones
    centers = rng.standard_normal((8, 6)) * 4
    n_per = [1500, 60, 50, 40, 30, 20, 10, 5]
    x = np.concatenate(
        [centers[i] + 0.3 * rng.standard_normal((n, 6)) for i, n in enumerate(n_per)]
    )
    write_features(tmp_path / "f", x)
    cl = tmp_path / "cl"
    assert (
        main(
            [
                "curate",
                "cluster",
                str(tmp_path / "f"),
                "--levels",
                "40,8",
                "--iters",
                "10",
                "--out",
                str(cl),
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "s.parquet"
    assert main(["curate", "sample", str(cl), "--n", "400", "--out", str(out)]) == 0
    t = pq.read_table(out).to_pydict()
    assert len(t["row"]) == 400 and len(set(t["row"])) == 400
    truth = np.repeat(np.arange(8), n_per)
    # the huge mode held 87% of the data; after balanced sampling far less
    assert (truth[t["row"]] == 0).mean() < 0.6
    assert set(t["path"]) <= set(
        pq.read_table(tmp_path / "f" / "manifest.parquet").column("path").to_pylist()
    )
    # the output is a manifest `vssl data pack` reads (path column)
    from vssl.data.sources import FileSource

    assert len(FileSource(out, decode=False)) == 400
