"""Feature parts: `vssl embed` under torchrun writes one part per rank, in float16; curation reads
all parts as one matrix, lazily."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from _curate_data import write_features, write_parts

from vssl.cli import main
from vssl.curate._features import FeatureParts


def test_embed_parts_per_rank_read_as_one(tmp_path, monkeypatch):
    common = ["embed", "vit-test-p14", "--random-init", "--num-workers", "0", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    for rank in (0, 1, 2):  # what torchrun's environment tells each of 3 ranks
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        assert (
            main([*common, "--feature-dtype", "float16", "--output", str(tmp_path / "parts")]) == 0
        )
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    folders = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert folders == [f"part-{r:05d}-of-00003" for r in range(3)]
    assert np.load(tmp_path / "parts" / folders[0] / "embeddings.npy").dtype == np.float16
    one = np.load(tmp_path / "one" / "embeddings.npy")
    parts = FeatureParts(tmp_path / "parts")
    assert len(parts) == len(one) and parts.dim == one.shape[1]
    np.testing.assert_allclose(parts.block(0, len(one)), one, rtol=2e-3, atol=2e-3)
    rows = np.array([5, 0, 7, 3])
    np.testing.assert_array_equal(parts.take(rows), parts.block(0, len(one))[rows])
    m = parts.manifest().to_pydict()
    assert (
        m["path"] == pq.read_table(tmp_path / "one" / "manifest.parquet").column("path").to_pylist()
    )
    assert m["row"] == list(range(len(one)))


def test_blocks_cross_part_boundaries(tmp_path):
    x = np.random.default_rng(0).standard_normal((103, 5)).astype(np.float32)
    write_parts(tmp_path / "f", x, world=4)
    f = FeatureParts(tmp_path / "f")
    got = np.concatenate([b for _, b in f.blocks(10)])
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    u = np.concatenate([b for _, b in f.blocks(7, normalize=True)])
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1, atol=1e-6)


def test_parts_folder_errors(tmp_path):
    x = np.ones((6, 4), np.float32)
    with pytest.raises(FileNotFoundError):
        FeatureParts(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a features folder"):
        FeatureParts(tmp_path / "empty")
    write_features(tmp_path / "p" / "part-00000-of-00002", x)
    with pytest.raises(ValueError, match="rank did not finish"):
        FeatureParts(tmp_path / "p")
    write_features(tmp_path / "p" / "part-00001-of-00002", np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="different models"):
        FeatureParts(tmp_path / "p")
