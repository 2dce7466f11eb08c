"""`vssl pretrain` end to end, `vssl quickstart` end to end, and the toy dataset behind it.

Runs are a few steps of tiny models (width 32, 1-2 blocks, 16-64 prototypes): they check the
wiring, the files a run leaves and the numbers the report shows, not what a model learns.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.assets.toy import CLASSES, draw_shape, make_toy_dataset
from vssl.data.transforms import EvalTransform

TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "method.n_prototypes=64",
    "method.hidden_dim=64",
    "method.bottleneck_dim=32",
    "data.num_workers=0",
]
#: the same for the quickstart's own recipe (cpu_simclr32: SimCLR, a projection head)
TINY_QUICKSTART = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "method.proj_hidden_dim=32",
    "data.num_workers=0",
]


def _parse(argv):
    from vssl.pretrain import add_pretrain_parser
    from vssl.quickstart import add_quickstart_parser

    parser = argparse.ArgumentParser(prog="vssl")
    sub = parser.add_subparsers(dest="command")
    add_pretrain_parser(sub)
    add_quickstart_parser(sub)
    return parser.parse_args(argv)


def _list(path: Path, rows) -> Path:
    path.write_text("".join(f"{p}\t{label}\n" for p, label in rows))
    return path


def _cifar(shared_data: Path, split: str, per_class: int):
    root = shared_data / "cifar10-subset" / split
    return [
        (p, c.name) for c in sorted(root.iterdir()) for p in sorted(c.glob("*.jpg"))[:per_class]
    ]


# ------------------------------------------------------------------------------------ toy data
def test_toy_dataset_is_deterministic_and_labelled(tmp_path):
    a = make_toy_dataset(tmp_path / "a", n_train=3, n_test=2)
    b = make_toy_dataset(tmp_path / "b", n_train=3, n_test=2)
    for split, n in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(CLASSES)
        for c in CLASSES:
            files = sorted((a / split / c).glob("*.png"))
            assert len(files) == n
            for f in files:
                x = np.asarray(Image.open(f))
                assert x.shape == (32, 32, 3) and x.dtype == np.uint8
                np.testing.assert_array_equal(x, np.asarray(Image.open(b / split / c / f.name)))
    # images of one class differ (random colour, pose, background): the class is the shape
    x0, x1 = (
        np.asarray(Image.open(f), dtype=float) for f in sorted((a / "train/circle").glob("*"))[:2]
    )
    assert np.abs(x0 - x1).mean() > 20
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
    with pytest.raises(ValueError, match="unknown toy class 'blob'.*circle"):
        draw_shape("blob", np.random.default_rng(0))


def test_plain_toy_images_have_flat_backgrounds():
    """plain=True: one background colour (the four corners agree) behind a visible shape; the
    default set varies its backgrounds (gradients, stripes, noise)."""
    textured = 0
    for i in range(30):
        name = CLASSES[i % len(CLASSES)]
        plain = np.asarray(draw_shape(name, np.random.default_rng(i), plain=True), dtype=int)
        corners = plain[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == corners[0]).all(), i
        assert (np.abs(plain - corners[0]).sum(-1) > 60).sum() > 20, i  # the shape is there
        default = np.asarray(draw_shape(name, np.random.default_rng(i)), dtype=int)
        d_corners = default[[0, 0, -1, -1], [0, -1, 0, -1]]
        textured += not (d_corners == d_corners[0]).all()
    assert textured >= 10


# ------------------------------------------------------------------------------------ pretrain
def test_pretrain_cli_end_to_end_writes_metrics_checkpoint_and_resumes(
    shared_data, tmp_path, capsys
):
    from vssl.models.zoo import create_model
    from vssl.train.config import load_recipe

    train = _list(tmp_path / "train.txt", _cifar(shared_data, "train", 3))  # 30 images
    knn_train = _list(tmp_path / "knn_train.txt", _cifar(shared_data, "train", 2))
    knn_test = _list(tmp_path / "knn_test.txt", _cifar(shared_data, "test", 1))
    run = tmp_path / "run"
    argv = [
        "pretrain",
        "cpu_tiny32",
        f"data.train={train}",
        "train.max_steps=3",
        "--no-progress",
        "train.batch_size_per_rank=8",
        f"train.output_dir={run}",
        "train.log_every=1",
        f"eval.train={knn_train}",
        f"eval.test={knn_test}",
        "eval.every_n_steps=2",
        "eval.batch_size=32",
        *TINY,
    ]
    args = _parse(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "stopped: max_steps at step 3" in out

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        for term in (
            "loss",
            "dino_local_crops_loss",
            "dino_global_crops_loss",
            "koleo_loss",
            "ibot_loss",
            "lr",
            "teacher_temp",
        ):
            assert math.isfinite(r[term]), (term, r)
    knn = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    assert [s for s, _ in knn] == [0, 2] and all(0.0 <= v <= 1.0 for _, v in knn)
    assert (run / "ckpt" / "step_00000003").is_dir()
    # the saved recipe reproduces the run's recipe
    assert (
        load_recipe(run / "config.yaml").to_dict()
        == load_recipe("cpu_tiny32", argv[2:4] + argv[5:]).to_dict()
    )
    # the encoder (DINOv2: the teacher backbone) is exported in vssl's format and loads alone
    model = create_model(run / "backbone.safetensors")
    assert model.config.embed_dim == 32 and model.config.depth == 2
    feats = model.forward_features(torch.randn(2, 3, 32, 32))["x_norm_clstoken"]
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()

    # the same command with a larger step budget resumes from the checkpoint
    args = _parse([a if a != "train.max_steps=3" else "train.max_steps=4" for a in argv])
    assert args.func(args) == 0
    err = capsys.readouterr().err  # said when resuming starts, not after the run
    assert "resumed from step 3" in err and "step_00000003" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- quickstart
def _weighted_knn_top1(train_x, train_y, test_x, test_y, k, temperature=0.07, n_classes=10):
    """DINOv2's kNN written out with numpy: cosine top-k, softmax(sim/T) weights, class sums."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = te @ tr.T
    hits = 0
    for i in range(len(te)):
        idx = np.argsort(-sims[i], kind="stable")[:k]
        w = np.exp(sims[i, idx] / temperature)
        scores = np.zeros(n_classes)
        np.add.at(scores, train_y[idx], w)
        hits += int(np.argmax(scores) == test_y[i])
    return hits / len(te)


def _pixels(root: Path):
    tf = EvalTransform(32)  # the evaluator's preprocessing (resize 256/224, centre crop)
    xs, ys = [], []
    for ci, c in enumerate(CLASSES):
        for f in sorted((root / c).glob("*.png")):
            xs.append(tf(Image.open(f).convert("RGB")).numpy().ravel())
            ys.append(ci)
    return np.stack(xs).astype(np.float64), np.array(ys)


def test_quickstart_end_to_end_report(tmp_path, capsys):
    from vssl.quickstart import run_quickstart

    data = make_toy_dataset(tmp_path / "toy", n_train=5, n_test=2)  # 50 train / 20 test
    out = tmp_path / "qs"
    result = run_quickstart(str(data), out, minutes=0.2, overrides=TINY_QUICKSTART, progress=False)
    printed = capsys.readouterr().out

    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["steps"] >= 1 and summary["knn_k"] == 20
    knn = summary["knn_top1"]
    assert set(knn) == {"trained", "random_init", "raw_pixels"}
    # the raw-pixel baseline, recomputed here from the images with numpy
    trx, trys = _pixels(data / "train")
    tex, teys = _pixels(data / "test")
    assert knn["raw_pixels"] == pytest.approx(_weighted_knn_top1(trx, trys, tex, teys, k=20))
    assert f"raw pixels {knn['raw_pixels']:.3f}" in printed
    # the plain verdict: learned only with +0.10 over random init and +0.05 over raw pixels
    from vssl.quickstart import verdict

    expected = (
        knn["trained"] >= knn["random_init"] + 0.1 and knn["trained"] >= knn["raw_pixels"] + 0.05
    )
    assert summary["learned"] is expected
    assert verdict(knn, summary["steps"]) in printed

    page = (out / "report.html").read_text()
    for heading in (
        "Loss",
        "kNN accuracy during training",
        "kNN top-1 (k=20, same images, same evaluator)",
        "PCA of patch features",
    ):
        assert f"<h2>{heading}</h2>" in page, heading
    for value in knn.values():
        assert f"<td>{value:.3f}</td>" in page
    # PCA section: 8 test images (one per class first), rows image / pretrained / random init
    assert page.count("data:image/png;base64,") == 3 * 8
    for svg in re.findall(r"<svg .*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # every chart is well-formed
    assert result["report"] == str(out / "report.html")
    # a second quickstart on the same folder replaces the first (no resume of an old run)
    (out / "ckpt").mkdir(exist_ok=True)
    (out / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="already holds other files.*mine.txt"):
        run_quickstart(str(data), out, minutes=0.1, overrides=TINY_QUICKSTART, progress=False)


def test_quickstart_without_labels_skips_knn(tmp_path, capsys):
    from vssl.quickstart import run_quickstart

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        draw_shape(CLASSES[i % len(CLASSES)], rng).save(folder / f"{i}.png")
    result = run_quickstart(
        str(folder), tmp_path / "qs", minutes=0.1, overrides=TINY_QUICKSTART, progress=False
    )
    assert result["knn_top1"] is None and result["steps"] >= 1
    page = (tmp_path / "qs" / "report.html").read_text()
    assert "skipped: the images have no class labels" in page
    assert page.count("data:image/png;base64,") == 3 * 8
    assert "no kNN evaluation" in capsys.readouterr().out


def test_quickstart_splits_class_folders_80_20(tmp_path):
    from vssl.quickstart import _quickstart_data

    root = tmp_path / "classes"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    src = _quickstart_data(str(root), out, seed=0, n_pca=4)
    train = [line.split("\t") for line in (out / "train.txt").read_text().splitlines()]
    test = [line.split("\t") for line in (out / "test.txt").read_text().splitlines()]
    assert len(train) == 16 and len(test) == 4
    assert sorted(c for _, c in test) == ["a", "a", "b", "b"]  # 20% of each class
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert src.labelled and src.train == str(out / "train.txt")
    assert [Path(p).parent.name for p in src.pca_images] == ["a", "b", "a", "b"]


def test_quickstart_verdict_needs_both_margins():
    from vssl.quickstart import learned, verdict

    assert learned({"trained": 0.30, "random_init": 0.20, "raw_pixels": 0.25})
    assert not learned({"trained": 0.29, "random_init": 0.20, "raw_pixels": 0.20})  # +0.09
    assert not learned({"trained": 0.40, "random_init": 0.10, "raw_pixels": 0.36})  # +0.04
    text = verdict({"trained": 0.096, "random_init": 0.100, "raw_pixels": 0.178}, 150)
    assert text.startswith("not learned yet (-0.004 over random init, -0.082 over raw pixels")
    assert "150 steps" in text and "--minutes 20" in text
    assert verdict({"trained": 0.4, "random_init": 0.2, "raw_pixels": 0.3}, 9).startswith(
        "pretraining learned: +0.200 over random init, +0.100 over raw pixels"
    )
