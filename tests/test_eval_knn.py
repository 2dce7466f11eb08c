"""kNN classification (DINOv2 protocol) against a brute-force reference, `vssl eval knn`, and the
online kNN monitor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vssl
from vssl.data import EvalTransform, open_image
from vssl.embed import embed_images
from vssl.evaluate import knn as knn_mod
from vssl.evaluate.knn import knn_classify
from vssl.evaluate.monitor import KNNMonitor

RES = 56


def brute_force_knn(xtr, ytr, xte, yte, ks, T, C):
    """The protocol written out plainly in float64: full similarity matrix, argsort, softmax over
    the max(k) neighbours, per-class sums of the first k, stable class ranking."""
    xtr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    xte = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sim = xte.astype(np.float64) @ xtr.astype(np.float64).T
    order = np.argsort(-sim, axis=1, kind="stable")
    K = max(ks)
    top = np.take_along_axis(sim, order[:, :K], axis=1)
    w = np.exp((top - top[:, :1]) / T)
    w /= w.sum(axis=1, keepdims=True)
    out = {}
    for k in ks:
        scores = np.zeros((len(xte), C))
        for i in range(len(xte)):
            for j in range(k):
                scores[i, ytr[order[i, j]]] += w[i, j]
        ranked = np.argsort(-scores, axis=1, kind="stable")
        out[k] = {
            "pred": ranked[:, 0],
            "top1": float(np.mean(ranked[:, 0] == yte)),
            "top5": float(np.mean((ranked[:, :5] == yte[:, None]).any(axis=1))),
            "scores": scores,
            "sim": sim,
            "order": order,
        }
    return out


def _no_near_ties(ref, ks):
    """The data must not sit on a tie (float32 vs float64 could then legitimately differ)."""
    for k in ks:
        sim_sorted = np.take_along_axis(ref[k]["sim"], ref[k]["order"], axis=1)
        assert (np.abs(np.diff(sim_sorted[:, : k + 1], axis=1)) > 1e-6).all()
        s = -np.sort(-ref[k]["scores"], axis=1)[:, :6]
        gaps = s[:, :-1] - s[:, 1:]
        assert ((gaps > 1e-6) | (s[:, 1:] == 0)).all()


@pytest.mark.parametrize("blocks", [(1024, 65536), (7, 13)])  # one block; many ragged blocks
def test_matches_brute_force(blocks):
    rng = np.random.default_rng(0)
    C, D = 7, 16
    centers = rng.normal(size=(C, D))
    ytr = rng.integers(0, C, 300)
    yte = rng.integers(0, C, 60)
    xtr = (centers[ytr] + 1.5 * rng.normal(size=(300, D))).astype(np.float32)
    xte = (centers[yte] + 1.5 * rng.normal(size=(60, D))).astype(np.float32)
    xtr *= rng.uniform(0.5, 3, (300, 1)).astype(np.float32)  # norms must not matter
    ks, T = (1, 5, 20, 100), 0.07
    ref = brute_force_knn(xtr, ytr, xte, yte, ks, T, C)
    _no_near_ties(ref, ks)
    batch_size, train_block = blocks
    res = knn_classify(
        xtr, ytr, xte, yte, ks=ks, temperature=T, batch_size=batch_size, train_block=train_block
    )
    assert res.ks == list(ks) and res.num_classes == C
    assert (res.num_train, res.num_test) == (300, 60)
    for k in ks:
        np.testing.assert_array_equal(res.predictions[k], ref[k]["pred"])
        assert res.top1[k] == ref[k]["top1"] and res.top5[k] == ref[k]["top5"]
    # the data is not trivial: k matters, and top-5 differs from top-1
    assert len({res.top1[k] for k in ks}) > 1 and res.top5[20] > res.top1[20]
    assert 0.2 < res.top1[20] < 0.95
    assert res.metrics()["knn_top1@20"] == res.top1[20] and len(res.metrics()) == 8


def test_top1_agrees_with_scikit_learn():
    """scikit-learn's KNeighborsClassifier with cosine distance and weights exp(sim / T) is the
    same classifier for top-1 (it takes the first class among equal sums, as we do)."""
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    xtr = rng.normal(size=(200, 8)).astype(np.float32)
    ytr = rng.integers(0, 4, 200)
    xte = rng.normal(size=(50, 8)).astype(np.float32)
    T = 0.1
    for k in (3, 15):
        clf = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / T)
        ).fit(xtr, ytr)
        ours = knn_classify(xtr, ytr, xte, ks=(k,), temperature=T)
        np.testing.assert_array_equal(ours.predictions[k], clf.predict(xte))
        assert ours.top1 is None  # no test labels: predictions only


def test_hand_computable_toy():
    """One test point (1, 0); neighbours at cosine 1.0 (class 0), 0.8 and 0.6 (class 1).
    T=0.07: e^(1/T) = 1.6e6 beats e^(.8/T) + e^(.6/T) = 9.5e4 -> class 0 for every k.
    T=1: e^1 = 2.72 < e^.8 + e^.6 = 4.05 -> class 1 at k=3; k=2 still class 0 (2.72 > 2.23)."""
    xtr = np.array([[5.0, 0.0], [0.6, 0.8], [0.8, 0.6]], np.float32)  # norms differ on purpose
    ytr = np.array([0, 1, 1])
    xte = np.array([[2.0, 0.0]], np.float32)
    cold = knn_classify(xtr, ytr, xte, np.array([1]), ks=(1, 2, 3), temperature=0.07)
    assert {k: int(p[0]) for k, p in cold.predictions.items()} == {1: 0, 2: 0, 3: 0}
    assert cold.top1 == {1: 0.0, 2: 0.0, 3: 0.0}
    assert cold.top5 is None and "knn_top5@3" not in cold.metrics()  # 2 classes: no top-5
    warm = knn_classify(xtr, ytr, xte, np.array([1]), ks=(2, 3), temperature=1.0)
    assert {k: int(p[0]) for k, p in warm.predictions.items()} == {2: 0, 3: 1}
    assert warm.top1 == {2: 0.0, 3: 1.0}


def test_k_larger_than_train_set_is_clipped_with_warning():
    rng = np.random.default_rng(1)
    xtr, ytr = rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 1, 2, 3, 4, 0])
    xte, yte = rng.normal(size=(9, 4)).astype(np.float32), rng.integers(0, 5, 9)
    with pytest.warns(UserWarning, match="k=10, 20 exceeds the 6 training images: using k=6"):
        res = knn_classify(xtr, ytr, xte, yte, ks=(3, 10, 20), temperature=0.07)
    assert res.ks == [3, 6] and res.clipped == [10, 20]
    ref = brute_force_knn(xtr, ytr, xte, yte, (3, 6), 0.07, 5)
    for k in (3, 6):
        np.testing.assert_array_equal(res.predictions[k], ref[k]["pred"])
        assert res.top5[k] == ref[k]["top5"]


def test_bad_inputs_are_clear_errors():
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="width 3, test features 5"):
        knn_classify(x, y, np.ones((2, 5), np.float32), ks=(1,))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(rows \[2\]"):
        knn_classify(bad, y, x, ks=(1,))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        knn_classify(x, y, x, np.array([0, 1, 2, 0]), ks=(1,), num_classes=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_classify(x, y, x, ks=(1,), temperature=0)
    with pytest.raises(ValueError, match="integer class indices"):
        knn_classify(x, y.astype(np.float32), x, ks=(1,))


# ------------------------------------------------------------------------------ CLI
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar(shared_data, split: str, per_class: int, classes=CLASSES):
    root = shared_data / "cifar10-subset" / split
    return [(p, c) for c in classes for p in sorted((root / c).glob("*.jpg"))[:per_class]]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return vssl.create_model("vit-test-p14", random_init=True, layerscale=1.0)


def _parser():
    p = argparse.ArgumentParser(prog="vssl eval")
    knn_mod.add_parser(p.add_subparsers())
    return p


def test_cli_end_to_end(shared_data, tiny_model, tmp_path, capsys):
    train_dir, test_dir = tmp_path / "feats" / "train", tmp_path / "feats" / "cifar-test"
    embed_images(
        tiny_model, _cifar(shared_data, "train", 4), train_dir, num_workers=0, progress=False
    )
    embed_images(
        tiny_model, _cifar(shared_data, "test", 2), test_dir, num_workers=0, progress=False
    )
    results = tmp_path / "res.jsonl"
    args = _parser().parse_args(
        [
            "knn",
            "--train",
            str(train_dir),
            "--test",
            str(test_dir),
            "--k",
            "5",
            "20",
            "100",
            "--results",
            str(results),
        ]
    )
    assert args.func(args) == 0
    cap = capsys.readouterr()
    assert "k=100 exceeds the 40 training images: using k=40" in cap.err
    lines = cap.out.splitlines()
    assert "40 train / 20 test images, 10 classes" in lines[0]
    assert lines[1].split() == ["k", "top1", "top5"] and [r.split()[0] for r in lines[3:]] == [
        "5",
        "20",
        "40",
    ]

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    got = {r["metric"]: r["value"] for r in rows}
    assert set(got) == {f"knn_top{t}@{k}" for t in (1, 5) for k in (5, 20, 40)}
    assert {r["dataset"] for r in rows} == {"cifar-test"} and rows[0]["protocol"] == "knn"
    assert rows[0]["num_classes"] == 10 and rows[0]["temperature"] == 0.07
    # the numbers are the brute-force protocol on the written features
    xtr, xte = np.load(train_dir / "embeddings.npy"), np.load(test_dir / "embeddings.npy")
    ytr, yte = np.repeat(np.arange(10), 4), np.repeat(np.arange(10), 2)
    ref = brute_force_knn(xtr, ytr, xte, yte, (5, 20, 40), 0.07, 10)
    for k in (5, 20, 40):
        assert got[f"knn_top1@{k}"] == ref[k]["top1"] and got[f"knn_top5@{k}"] == ref[k]["top5"]


def test_cli_embeds_on_the_fly_and_reports_user_errors(shared_data, tiny_model, tmp_path, capsys):
    ckpt = vssl.save_vssl(tiny_model, tmp_path / "tiny.safetensors")
    lists = {}
    for split, per in (("train", 3), ("test", 1)):
        lists[split] = tmp_path / f"{split}.txt"
        lists[split].write_text("".join(f"{p}\t{c}\n" for p, c in _cifar(shared_data, split, per)))
    argv = [
        "knn",
        "--model",
        str(ckpt),
        "--train",
        str(lists["train"]),
        "--test",
        str(lists["test"]),
        "--k",
        "10",
        "--cache",
        str(tmp_path / "cache"),
        "--num-workers",
        "0",
        "--results",
        "-",
        "--run-name",
        "tiny",
    ]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    assert "embedding 30 train images" in capsys.readouterr().err

    # a test class the training split does not have
    odd = tmp_path / "odd.txt"
    odd.write_text(lists["test"].read_text() + f"{_cifar(shared_data, 'test', 1)[0][0]}\tzebra\n")
    args = _parser().parse_args(argv[:5] + ["--test", str(odd)] + argv[7:])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "vssl eval knn: error:" in err and "'zebra' not among the 10 training classes" in err
    # images given without --model
    args = _parser().parse_args(["knn", "--train", str(lists["train"]), "--test", "x"])
    assert args.func(args) == 2
    assert "not a `vssl embed` output folder" in capsys.readouterr().err


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["knn", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "vssl eval knn --train feats/train --test feats/val" in text
    for flag in ("--k", "--temperature", "--model", "--cache", "--results"):
        assert flag in text


# ------------------------------------------------------------------------------ monitor
def _direct_features(model, items):
    t = EvalTransform(RES)
    x = torch.stack([t(open_image(p, draft_size=t.draft_size)) for p, _ in items])
    with torch.inference_mode():
        return model.forward_features(x)["x_norm_clstoken"]


def test_monitor_equals_knn_on_direct_features(shared_data, tiny_model):
    train, test = _cifar(shared_data, "train", 5), _cifar(shared_data, "test", 2)
    monitor = KNNMonitor(train, test, every_n_steps=10, k=20, batch_size=16, num_workers=0)
    tiny_model.train()
    tiny_model.blocks[0].eval()  # a submodule the trainer keeps in eval mode
    out = monitor.run(tiny_model)
    assert tiny_model.training and tiny_model.blocks[1].training
    assert not tiny_model.blocks[0].training  # each module's own mode comes back
    assert monitor.images["train"].dtype == torch.uint8 and monitor.resolution == RES

    ftr, fte = _direct_features(tiny_model, train), _direct_features(tiny_model, test)
    feats = monitor.features(tiny_model)
    torch.testing.assert_close(feats["train"], ftr, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats["test"], fte, atol=1e-5, rtol=0)
    ytr, yte = np.repeat(np.arange(10), 5), np.repeat(np.arange(10), 2)
    ref = brute_force_knn(ftr.numpy(), ytr, fte.numpy(), yte, (20,), 0.07, 10)
    assert out["knn_top1"] == ref[20]["top1"] and out["knn_top5"] == ref[20]["top5"]
    assert out["seconds"] > 0

    class Wrapped(torch.nn.Module):  # DDP-style: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    again = monitor.run(Wrapped(tiny_model))
    assert again["knn_top1"] == out["knn_top1"]


def test_monitor_cadence_subset_and_errors(shared_data, tiny_model):
    train, test = _cifar(shared_data, "train", 3), _cifar(shared_data, "test", 1)
    monitor = KNNMonitor(
        train, test, every_n_steps=3, k=5, resolution=RES, max_per_split=12, num_workers=0
    )
    assert len(monitor.images["train"]) == 12 and len(monitor.images["test"]) == 10
    # class-balanced: every class kept, none more than twice (a random 12 of 30 would drop some)
    counts = monitor.labels["train"].bincount(minlength=10)
    assert counts.min() == 1 and counts.max() == 2 and counts.sum() == 12
    same = KNNMonitor(train, test, every_n_steps=3, resolution=RES, max_per_split=12, num_workers=0)
    assert torch.equal(same.images["train"], monitor.images["train"])  # seeded subset
    ran = [s for s in range(8) if monitor.maybe_run(s, tiny_model) is not None]
    assert ran == [0, 3, 6]

    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        KNNMonitor(train, test, every_n_steps=0)
    with pytest.raises(ValueError, match="needs labeled train images"):
        KNNMonitor([(p, None) for p, _ in train], test, every_n_steps=1)
    with pytest.raises(ValueError, match=r"test labels \['zebra'\] are not training classes"):
        KNNMonitor(train, [(test[0][0], "zebra")], every_n_steps=1)
    with pytest.raises(ValueError, match="source not found"):
        KNNMonitor(Path("/nonexistent/imgs"), test, every_n_steps=1)
