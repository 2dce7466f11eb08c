"""`vssl curate browse`: a self-contained page with the right clusters, sizes and thumbnails."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
from _curate_data import write_features

from vssl.assets import sample_images_dir
from vssl.cli import main


def test_browse_page_is_offline_and_counts_match(tmp_path):
    imgs = sorted(str(p) for p in sample_images_dir().glob("*.jpg"))
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 6)) * 5
    n = 30
    x = np.concatenate([centers[i % 3] + 0.1 * rng.standard_normal((1, 6)) for i in range(n)])
    paths = [imgs[i % len(imgs)] for i in range(n - 1)] + [str(tmp_path / "gone.jpg")]
    write_features(tmp_path / "f", x, paths=paths)
    cl = tmp_path / "cl"
    assert (
        main(
            [
                "curate",
                "cluster",
                str(tmp_path / "f"),
                "--levels",
                "3",
                "--iters",
                "5",
                "--out",
                str(cl),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(["curate", "sample", str(cl), "--n", "9", "--out", str(tmp_path / "s.parquet")]) == 0
    )
    out = tmp_path / "c.html"
    assert (
        main(
            [
                "curate",
                "browse",
                str(cl),
                "--sample",
                str(tmp_path / "s.parquet"),
                "--per-cluster",
                "4",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    page = out.read_text()
    rows = re.findall(
        r'<tr data-id="(\d+)"><td class="n">\d+</td><td class="n">(\d+)</td><td class="n">(\d+)</td>',
        page,
    )
    cl1 = pq.read_table(cl / "clusters.parquet").column("cluster_1").to_numpy()
    sampled = pq.read_table(tmp_path / "s.parquet").column("cluster_1").to_numpy()
    assert sorted((int(c), int(s), int(k)) for c, s, k in rows) == [
        (c, int((cl1 == c).sum()), int((sampled == c).sum())) for c in range(3)
    ]
    assert page.count("data:image/jpeg;base64,") + page.count('class="miss"') == 12
    assert 'class="miss"' not in page or "gone.jpg" in page
    assert not re.search(r'src="(https?:|file:|/)', page)  # self-contained: nothing to fetch
    assert "filterRows" in page
