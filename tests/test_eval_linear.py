"""DINOv2's linear-probe grid: accuracy, head selection on validation, joint training of all heads
against a one-head torch.optim reference, the stratified split, and `vssl eval linear`."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vssl
from vssl.embed import embed_images
from vssl.evaluate import linear as linear_mod
from vssl.evaluate.features import load_features
from vssl.evaluate.linear import (
    DINOV2_LRS,
    init_head,
    minibatches,
    scale_lr,
    stratified_split,
    train_linear_grid,
)


@pytest.fixture(autouse=True)
def one_thread():
    """The heads here are tiny: one thread avoids OpenMP hand-offs that dominate on a busy
    2-core machine (numerics are compared with tolerances, so threading does not matter)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _split(rng, labels, centers, L, informative, signal=3.0):
    """Features whose CLS layers and/or avgpool carry the class (``informative`` in
    {"layers", "avgpool"}); the rest is pure noise."""
    n, d = len(labels), centers.shape[1]
    layers = rng.normal(size=(n, L, d)).astype(np.float32)
    avg = rng.normal(size=(n, d)).astype(np.float32)
    if "layers" in informative:
        layers += signal * centers[labels][:, None, :]
    if "avgpool" in informative:
        avg += signal * centers[labels]
    return SimpleNamespace(
        layers=layers,
        avgpool=avg,
        cls=layers[:, -1].copy(),
        labels=labels,
        classes=[f"c{i}" for i in range(len(centers))],
    )


def _data(
    C=4, D=16, L=4, n_train=60, n_test=20, informative=("layers", "avgpool"), seed=0, signal=3.0
):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)).astype(np.float32)
    ytr = np.repeat(np.arange(C), n_train)
    yte = np.repeat(np.arange(C), n_test)
    return (
        _split(rng, ytr, centers, L, informative, signal),
        _split(rng, yte, centers, L, informative, signal),
    )


def _input(f, rows, n, avgpool):
    """create_linear_input in numpy: last n blocks' CLS (oldest first), then the avgpool."""
    parts = [f.layers[rows][:, -n:].reshape(len(rows), -1)]
    if avgpool:
        parts.append(f.avgpool[rows])
    return np.concatenate(parts, axis=1)


def test_dinov2_constants():
    assert DINOV2_LRS == (
        1e-5,
        2e-5,
        5e-5,
        1e-4,
        2e-4,
        5e-4,
        1e-3,
        2e-3,
        5e-3,
        1e-2,
        2e-2,
        5e-2,
        0.1,
    )
    assert scale_lr(1e-3, 512) == pytest.approx(2e-3) and scale_lr(0.1, 128) == pytest.approx(0.05)
    w, b = init_head(500, 40, seed=0, n_blocks=4, avgpool=True, lr=1e-3)
    assert w.shape == (500, 40) and torch.all(b == 0)
    assert float(w.std()) == pytest.approx(0.01, rel=0.03) and abs(float(w.mean())) < 1e-3
    # a head's init depends on its own config only, not on the rest of the grid
    w2, _ = init_head(500, 40, seed=0, n_blocks=4, avgpool=True, lr=1e-3)
    w3, _ = init_head(500, 40, seed=0, n_blocks=4, avgpool=True, lr=2e-3)
    assert torch.equal(w, w2) and not torch.equal(w, w3)


def test_separable_data_reaches_full_accuracy():
    train, test = _data(C=6, signal=4.0)
    r = train_linear_grid(train, test, lrs=(1e-3, 1e-2, 0.1), epochs=15, batch_size=32)
    assert len(r.heads) == 2 * 2 * 3 and not r.notes
    assert {(h.n_blocks, h.avgpool) for h in r.heads} == {
        (1, False),
        (1, True),
        (4, False),
        (4, True),
    }
    assert r.best.val_top1 == 1.0
    assert r.test_top1 >= 0.99 and r.test_top5 == 1.0
    assert r.iterations == 15 * (len(r.train_indices) // 32)


def test_best_head_is_the_validation_argmax_and_test_is_reported_on_test():
    # only the avgpool carries the class: the choice is forced onto an avgpool head
    train, test = _data(C=6, informative=("avgpool",), signal=1.0, n_train=50, n_test=30)
    r = train_linear_grid(train, test, lrs=(1e-4, 1e-2, 0.2), epochs=10, batch_size=32, seed=3)
    yv = train.labels[r.val_indices]
    accs = []
    for h in r.heads:  # recompute every head's validation accuracy from its weights
        logits = _input(train, r.val_indices, h.n_blocks, h.avgpool) @ h.weight + h.bias
        accs.append(float((logits.argmax(1) == yv).mean()))
        assert h.val_top1 == pytest.approx(accs[-1], abs=1e-12)
        assert h.scaled_lr == pytest.approx(h.lr * 32 / 256)
    assert r.best is r.heads[int(np.argmax(accs))]
    assert r.best.avgpool
    noise = [a for h, a in zip(r.heads, accs) if not h.avgpool]
    assert max(noise) < 0.5 < r.best.val_top1
    # the reported numbers are the chosen head on the test split
    logits = (
        _input(test, np.arange(len(test.labels)), r.best.n_blocks, True) @ r.best.weight
        + r.best.bias
    )
    assert r.test_top1 == pytest.approx(float((logits.argmax(1) == test.labels).mean()))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert r.test_top5 == pytest.approx(float((top5 == test.labels[:, None]).any(1).mean()))


def test_joint_training_equals_one_head_trained_alone_with_torch_sgd():
    """Every head of the one-pass grid ends where torch.optim.SGD(momentum=0.9) with
    CosineAnnealingLR puts the same head trained alone on the same batches."""
    train, test = _data(C=3, D=8, n_train=40, signal=1.0)
    lrs, bs, epochs, seed = (1e-3, 3e-2, 0.3), 16, 3, 7
    r = train_linear_grid(train, test, lrs=lrs, epochs=epochs, batch_size=bs, seed=seed)
    n_train = len(r.train_indices)
    total = epochs * (n_train // bs)
    assert r.iterations == total
    for h in r.heads:
        d_in = h.weight.shape[0]
        w0, b0 = init_head(d_in, 3, seed=seed, n_blocks=h.n_blocks, avgpool=h.avgpool, lr=h.lr)
        ref = torch.nn.Linear(d_in, 3)
        with torch.no_grad():
            ref.weight.copy_(w0.T)
            ref.bias.copy_(b0)
        opt = torch.optim.SGD(
            ref.parameters(), lr=scale_lr(h.lr, bs), momentum=0.9, weight_decay=0.0
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=0.0)
        for batch in minibatches(n_train, bs, total, seed):
            rows = r.train_indices[batch]  # positions in the training rows (val excluded)
            x = torch.from_numpy(_input(train, rows, h.n_blocks, h.avgpool))
            loss = torch.nn.functional.cross_entropy(ref(x), torch.from_numpy(train.labels[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        moved = np.abs(ref.weight.detach().numpy().T - w0.numpy()).max()
        assert moved > 1e-3  # the heads did train
        np.testing.assert_allclose(h.weight, ref.weight.detach().numpy().T, rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(h.bias, ref.bias.detach().numpy(), rtol=1e-4, atol=2e-6)


def test_minibatches_are_seeded_epoch_permutations():
    batches = list(minibatches(10, 4, 5, seed=1))
    assert [len(b) for b in batches] == [4] * 5
    # 2 batches per epoch (the incomplete third is dropped), no repeats inside an epoch
    for e in range(2):
        assert len(set(np.concatenate(batches[2 * e : 2 * e + 2]))) == 8
    assert all(np.array_equal(a, b) for a, b in zip(batches, minibatches(10, 4, 5, seed=1)))
    other = np.concatenate(list(minibatches(10, 4, 5, seed=2)))
    assert not np.array_equal(np.concatenate(batches), other)
    assert [len(b) for b in minibatches(3, 8, 2)] == [3, 3]  # a batch larger than the data


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 23, 7, 1])
    tr, val = stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(tr, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, val])), np.arange(len(labels)))
    # round(0.1 * n) per class, and a class keeps at least one training row
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 2, 1, 0]
    tr2, val2 = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(val, val2)
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=1)[1])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        stratified_split(labels, 0.0)
    with pytest.raises(ValueError, match="leaves no validation rows"):
        stratified_split(np.arange(5), 0.1)

    train, test = _data(C=3, n_train=30)
    r = train_linear_grid(train, test, lrs=(0.01,), epochs=1, batch_size=16, val_fraction=0.2)
    assert np.array_equal(r.val_indices, stratified_split(train.labels, 0.2, 0)[1])
    assert np.bincount(train.labels[r.val_indices]).tolist() == [6, 6, 6]


def test_missing_blocks_or_avgpool_are_skipped_with_notes():
    train, test = _data(C=3, L=2, n_train=20)
    r = train_linear_grid(train, test, lrs=(0.01,), epochs=1, batch_size=16)
    assert {(h.n_blocks, h.avgpool) for h in r.heads} == {(1, False), (1, True)}
    assert any("skipped n=4" in n and "--layers 4" in n for n in r.notes)
    # CLS embeddings only: the one-block heads run on `cls`
    only_cls = [
        SimpleNamespace(cls=f.cls, labels=f.labels, classes=f.classes) for f in (train, test)
    ]
    r = train_linear_grid(*only_cls, lrs=(0.01,), epochs=1, batch_size=16)
    assert [(h.n_blocks, h.avgpool) for h in r.heads] == [(1, False)]
    assert any("avgpool" in n for n in r.notes) and any("n=4" in n for n in r.notes)
    with pytest.raises(ValueError, match="no labels"):
        train_linear_grid(SimpleNamespace(cls=train.cls, labels=None), test)
    with pytest.raises(ValueError, match="learning rates must be positive"):
        train_linear_grid(train, test, lrs=(0.1, -1.0))


# ------------------------------------------------------------------------------------ CLI
CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


def _cifar(shared_data, split, per_class):
    root = shared_data / "cifar10-subset" / split
    return [(p, c) for c in CLASSES for p in sorted((root / c).glob("*.jpg"))[:per_class]]


def _parser():
    p = argparse.ArgumentParser(prog="vssl eval")
    linear_mod.add_parser(p.add_subparsers())
    return p


def test_cli_end_to_end(shared_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = vssl.create_model("vit-test-p14", random_init=True, depth=4, layerscale=1.0)
    train_dir, test_dir = tmp_path / "train", tmp_path / "cifar-test"
    for items, out in (
        (_cifar(shared_data, "train", 8), train_dir),
        (_cifar(shared_data, "test", 3), test_dir),
    ):
        embed_images(model, items, out, layers=4, avgpool=True, num_workers=0, progress=False)
    results = tmp_path / "res.jsonl"
    argv = [
        "linear",
        "--train",
        str(train_dir),
        "--test",
        str(test_dir),
        "--epochs",
        "3",
        "--lrs",
        "0.01",
        "0.1",
        "--probe-batch-size",
        "8",
        "--results",
        str(results),
    ]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "35 train / 5 val / 15 test images, 5 classes, 8 heads" in out
    assert "4 blocks + avgpool" in out and out.count("*") == 1

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    got = {r["metric"]: r["value"] for r in rows}
    assert set(got) == {"linear_top1", "linear_top5"}
    assert rows[0]["protocol"] == "linear" and rows[0]["dataset"] == "cifar-test"
    # the recorded numbers are the library's on the same folders and settings
    train, test = load_features(train_dir), load_features(test_dir, classes=CLASSES)
    ref = train_linear_grid(train, test, lrs=(0.01, 0.1), epochs=3, batch_size=8)
    assert got["linear_top1"] == ref.test_top1 and got["linear_top5"] == ref.test_top5
    assert rows[0]["best_lr"] == ref.best.lr and rows[0]["best_config"] == ref.best.config

    # features without layers/avgpool: a clear error saying how to make them
    plain = tmp_path / "plain"
    embed_images(model, _cifar(shared_data, "train", 2), plain, num_workers=0, progress=False)
    args = _parser().parse_args(
        ["linear", "--train", str(plain), "--test", str(test_dir), "--results", "-"]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "vssl eval linear: error:" in err and "--layers 4" in err and "--n-blocks 1" in err
    # ... or a grid shrunk to what they hold
    args = _parser().parse_args(
        [
            "linear",
            "--train",
            str(plain),
            "--test",
            str(test_dir),
            "--n-blocks",
            "1",
            "--avgpool",
            "off",
            "--epochs",
            "1",
            "--lrs",
            "0.1",
            "--val-fraction",
            "0.5",
            "--results",
            "-",
        ]
    )
    assert args.func(args) == 0


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["linear", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "vssl eval linear --train feats/train --test feats/test" in text
    for flag in ("--epochs", "--lrs", "--probe-batch-size", "--val-fraction", "--n-blocks"):
        assert flag in text
