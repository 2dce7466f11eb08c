"""curate -> pack: real images embedded, deduplicated, clustered, sampled, packed into shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from _curate_data import write_features
from PIL import Image

from vssl.cli import main


def test_embed_dedup_cluster_sample_pack(tmp_path, shared_data):
    src = shared_data / "cifar10-subset" / "test"
    imgs = tmp_path / "imgs"
    for cls in sorted(p.name for p in src.iterdir())[:3]:
        (imgs / cls).mkdir(parents=True)
        for i, p in enumerate(sorted((src / cls).glob("*.jpg"))[:10]):
            (imgs / cls / p.name).write_bytes(p.read_bytes())
            if i < 2:  # exact copies: the dedup must find them
                (imgs / cls / f"copy_{p.name}").write_bytes(p.read_bytes())
    # features: 8x8 grey pixels, centred (a random-init network maps these images to one point)
    files = sorted(imgs.rglob("*.jpg"))
    x = np.stack(
        [np.asarray(Image.open(f).convert("L").resize((8, 8)), np.float32).ravel() for f in files]
    )
    feats = write_features(tmp_path / "feats", x - x.mean(0), paths=[str(f) for f in files])
    keep = tmp_path / "keep.parquet"
    assert (
        main(
            [
                "curate",
                "dedup",
                str(feats),
                "--threshold",
                "0.999",
                "--out",
                str(keep),
                "--no-progress",
            ]
        )
        == 0
    )
    gone = pq.read_table(tmp_path / "keep.removed.parquet").to_pydict()
    assert len(gone["path"]) >= 6
    assert all(
        p.split("/")[-1].removeprefix("copy_") == q.split("/")[-1].removeprefix("copy_")
        for p, q in zip(gone["path"], gone["duplicate_of_path"])
    )
    cl = tmp_path / "cl"
    assert (
        main(
            [
                "curate",
                "cluster",
                str(feats),
                "--levels",
                "6,2",
                "--iters",
                "5",
                "--out",
                str(cl),
                "--no-progress",
            ]
        )
        == 0
    )
    sample = tmp_path / "sample.parquet"
    assert main(["curate", "sample", str(cl), "--n", "12", "--out", str(sample)]) == 0
    for manifest, n in ((keep, 36 - len(gone["path"])), (sample, 12)):
        shards = tmp_path / f"shards_{manifest.stem}"
        assert main(["data", "pack", str(manifest), str(shards), "--quiet"]) == 0
        sizes = json.loads((shards / "sizes.json").read_text())
        assert sum(sizes.values()) == n
