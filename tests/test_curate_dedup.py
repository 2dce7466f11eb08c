"""`vssl curate dedup` and the faiss neighbour module against brute force."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _curate_data import brute_components, planted, write_features, write_parts

from vssl.cli import main
from vssl.curate._features import FeatureParts
from vssl.curate.dedup import parse_phash, phash_dedup, self_dedup
from vssl.neighbors import NeighborIndex, choose_index, exact_knn


def test_neighbors_flat_and_ivf_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = np.argsort(-(q @ u.T), axis=1)[:, :10]
    flat = NeighborIndex(x, progress=False)
    assert flat.choice.kind == "flat"
    sims, ids = flat.search(q, 10)
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(q @ u.T, ref, 1), atol=1e-5)
    # IVF probing every cell is exact; IVF-PQ re-scores exactly, so its similarities are true
    ivf = NeighborIndex(x, kind="ivf", nprobe=10_000, progress=False)
    np.testing.assert_array_equal(ivf.search(q, 10)[1], ref)
    pq_ = NeighborIndex(x, kind="ivfpq", nprobe=10_000, progress=False)
    s, i = pq_.search(q, 10)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, u[i]), atol=1e-5)
    e_sims, e_ids = exact_knn(q, u, 10)
    np.testing.assert_array_equal(e_ids, ref)


def test_choose_index_by_size():
    assert choose_index(1000, 384).kind == "flat"
    c = choose_index(1_000_000, 384)
    assert c.kind == "ivf" and c.nlist == 4096 and c.nprobe == 64
    assert choose_index(50_000_000, 384).kind == "ivfpq"
    with pytest.raises(ValueError, match="unknown index kind"):
        choose_index(10, 4, "hnsw")


def test_self_dedup_equals_brute_force_components(tmp_path):
    x, pairs = planted(2000, 24, 150, seed=1, noise=0.3)
    # chains: a copy of a copy joins a component through a row the first one does not touch
    write_features(tmp_path / "f", x)
    feats = FeatureParts(tmp_path / "f")
    res = self_dedup(feats, 0.6, k=64, progress=False)
    ref = brute_components(x.astype(np.float16).astype(np.float32), 0.6)
    np.testing.assert_array_equal(res.duplicate_of, ref)
    np.testing.assert_array_equal(res.keep, ref == np.arange(len(x)))
    # every planted pair ends in one component
    assert (ref[pairs[:, 0]] == ref[pairs[:, 1]]).all()
    assert (~res.keep).sum() >= 150 * 0.99


def test_dedup_cli_outputs_and_parts(tmp_path):
    x, pairs = planted(600, 16, 40, seed=2, noise=0.2)
    write_parts(tmp_path / "f", x, world=3)
    assert (
        main(
            [
                "curate",
                "dedup",
                str(tmp_path / "f"),
                "--out",
                str(tmp_path / "k.parquet"),
                "--no-progress",
            ]
        )
        == 0
    )
    kept = pq.read_table(tmp_path / "k.parquet").to_pydict()
    gone = pq.read_table(tmp_path / "k.removed.parquet").to_pydict()
    ref = brute_components(x.astype(np.float16).astype(np.float32), 0.6)
    assert kept["row"] == [int(i) for i in np.nonzero(ref == np.arange(600))[0]]
    assert gone["duplicate_of"] == [int(ref[r]) for r in gone["row"]]
    assert gone["duplicate_of_path"] == [f"/img/{ref[r]:06d}.jpg" for r in gone["row"]]
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(
        gone["similarity"], [u[r] @ u[ref[r]] for r in gone["row"]], atol=2e-3
    )
    assert set(kept["part"]) == {f"part-{r:05d}-of-00003" for r in range(3)}
    assert set(kept["row"]).isdisjoint(gone["row"]) and len(kept["row"]) + len(gone["row"]) == 600


def test_dedup_against_eval_set(tmp_path):
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((500, 16)).astype(np.float32)
    ev = np.concatenate(
        [pool[:20] + 0.05 * rng.standard_normal((20, 16)), rng.standard_normal((30, 16))]
    )
    write_features(tmp_path / "pool", pool)
    write_features(tmp_path / "ev", ev.astype(np.float32))
    out = tmp_path / "k.parquet"
    assert (
        main(
            [
                "curate",
                "dedup",
                str(tmp_path / "pool"),
                "--against",
                str(tmp_path / "ev"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    u = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    e = ev / np.linalg.norm(ev, axis=1, keepdims=True)
    ref_removed = np.nonzero((u @ e.T).max(axis=1) > 0.45)[0]
    gone = pq.read_table(tmp_path / "k.removed.parquet").to_pydict()
    assert gone["row"] == ref_removed.tolist()
    assert set(range(20)) <= set(gone["row"])
    assert gone["duplicate_of"] == (u @ e.T)[ref_removed].argmax(axis=1).tolist()


def test_phash_dedup_against_brute_force_hamming():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, (400, 8), dtype=np.uint8)
    for i in range(0, 60, 2):  # flip 0..5 bits of a copy
        codes[i + 1] = codes[i]
        for b in rng.choice(64, i % 6, replace=False):
            codes[i + 1, b // 8] ^= 1 << (b % 8)
    res = phash_dedup(codes, 4, progress=False)
    bits = np.unpackbits(codes[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)
    from scipy.sparse.csgraph import connected_components

    _, lab = connected_components(bits <= 4, directed=False)
    first = {}
    ref = np.array([first.setdefault(lab_, i) for i, lab_ in enumerate(lab)])
    np.testing.assert_array_equal(res.duplicate_of, ref)
    assert res.score[~res.keep].max() <= 4


def test_parse_phash_hex_and_int():
    codes, valid = parse_phash(["ffffffff00000000", None, "zz", 255])
    assert valid.tolist() == [True, False, False, True]
    assert codes[0].tolist() == [255] * 4 + [0] * 4 and codes[3].tolist() == [0] * 7 + [255]


def test_phash_cli_computes_hashes(tmp_path, shared_data):
    from PIL import Image

    src = sorted((shared_data / "imagenet-samples").glob("*.JPEG"))[:6]
    paths = []
    for i, p in enumerate(src):
        paths.append(str(p))
        if i < 2:  # a resized re-encode: the same pHash within a few bits
            q = tmp_path / f"copy{i}.jpg"
            im = Image.open(p).convert("RGB")
            im.resize((im.width // 2, im.height // 2)).save(q, quality=70)
            paths.append(str(q))
    pq.write_table(pa.table({"path": paths}), tmp_path / "m.parquet")
    out = tmp_path / "k.parquet"
    assert (
        main(
            [
                "curate",
                "dedup",
                str(tmp_path / "m.parquet"),
                "--phash",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    gone = pq.read_table(tmp_path / "k.removed.parquet").to_pydict()
    assert sorted(gone["path"]) == sorted(str(tmp_path / f"copy{i}.jpg") for i in range(2))
    assert "image_phash" in pq.read_table(out).column_names


def test_bad_inputs_name_the_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    write_features(tmp_path / "f", x)
    pq.write_table(
        pa.table({"row": [0], "path": ["a"], "label": [None]}), tmp_path / "f" / "manifest.parquet"
    )
    with pytest.raises(ValueError, match="different lengths"):
        FeatureParts(tmp_path / "f")
    x[3] = 0
    write_features(tmp_path / "g", x)
    with pytest.raises(ValueError, match=r"row 3 .*all zeros"):
        self_dedup(FeatureParts(tmp_path / "g"), progress=False)
    x[3] = np.nan
    write_features(tmp_path / "h", x)
    with pytest.raises(ValueError, match=r"row 3 .*NaN"):
        self_dedup(FeatureParts(tmp_path / "h"), progress=False)
    write_features(tmp_path / "w", np.ones((4, 6), np.float32))
    assert (
        main(
            [
                "curate",
                "dedup",
                str(tmp_path / "g"),
                "--against",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path / "o.parquet"),
            ]
        )
        == 2
    )


def test_eval_knn_faiss_search_equals_blocked_torch_search():
    import torch

    from vssl.evaluate.knn import _topk_blocked, knn_classify

    rng = np.random.default_rng(5)
    xtr = rng.standard_normal((700, 24)).astype(np.float32)
    xte = rng.standard_normal((90, 24)).astype(np.float32)
    ytr = rng.integers(0, 7, 700)
    u = torch.nn.functional.normalize(torch.from_numpy(xtr), dim=1)
    q = torch.nn.functional.normalize(torch.from_numpy(xte), dim=1)
    ref_s, ref_i = _topk_blocked(q, u, 20, block=128)
    s, i = exact_knn(q.numpy(), u.numpy(), 20)
    np.testing.assert_array_equal(i, ref_i.numpy())
    np.testing.assert_allclose(s, ref_s.numpy(), atol=1e-5)
    # and the classifier's vote over them matches a brute-force vote
    res = knn_classify(xtr, ytr, xte, ks=(20,), temperature=0.07)
    w = torch.softmax(ref_s / 0.07, dim=1).numpy()
    votes = np.zeros((90, 7))
    np.add.at(votes, (np.arange(90)[:, None], ytr[ref_i.numpy()]), w)
    np.testing.assert_array_equal(res.predictions[20], votes.argmax(1))
