"""`vssl compare` on three methods (DINOv2, MAE, CLIP) at a handful of steps on real CIFAR images:
one row per method, every number in the results file and recomputable, runs reused."""

from __future__ import annotations

import json
import os

import pytest

from vssl.compare import evaluate_run, run_compare

SMALL = [
    "train.batch_size_per_rank=8",
    "model.depth=1",
    "train.log_every=1",
]


def _subset(src, dst, classes, per_class):
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted(os.listdir(src / c))[:per_class]:
            os.symlink(src / c / f, dst / c / f)
    return dst


@pytest.fixture
def cifar_small(shared_data, tmp_path):
    root = shared_data / "cifar10-subset"
    classes = ["airplane", "cat", "frog"]
    return (
        _subset(root / "train", tmp_path / "train", classes, 16),
        _subset(root / "test", tmp_path / "test", classes, 6),
    )


def test_compare_three_methods(cifar_small, tmp_path):
    train, test = cifar_small
    out, results = tmp_path / "cmp", tmp_path / "results.jsonl"
    rows = run_compare(
        ["cpu_tiny32", "cpu_mae32", "cpu_clip32"],
        str(train),
        str(test),
        5.0,
        str(out),
        overrides=SMALL,
        results_file=str(results),
        steps=2,
        c_grid=[0.1, 1.0],
    )
    assert [r["label"] for r in rows] == ["cpu_tiny32", "cpu_mae32", "cpu_clip32"]
    assert [r["method"] for r in rows] == ["dinov2", "mae", "clip"]
    assert [r["steps"] for r in rows] == [2, 2, 2]
    # the language-supervised run has zero-shot; the others do not
    assert "zeroshot" in rows[2]["metrics"] and "zeroshot" not in rows[0]["metrics"]
    assert "templates" in rows[2]["note"]
    md = (out / "compare.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| cpu_")]
    assert len(table) == 3 and "zero-shot top-1" in md
    html = (out / "compare.html").read_text()
    assert html.count("<svg") >= 3 and "cpu_clip32" in html
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 3 * 2 + 1
    by = {(r["model"], r["protocol"]): r["value"] for r in lines}
    for r in rows:
        for protocol, vals in r["metrics"].items():
            assert by[(r["label"], protocol)] == pytest.approx(vals["top1"])
            assert f"{vals['top1']:.4f}" in md

    # the numbers are the evaluators' on the run's exported encoder: recompute one
    again = evaluate_run(out / "runs" / "cpu_mae32", str(train), str(test), c_grid=[0.1, 1.0])
    assert again["knn"]["top1"] == pytest.approx(rows[1]["metrics"]["knn"]["top1"])

    # a second compare on the same output reuses the runs; a run folder given as a path works
    mtime = (out / "runs" / "cpu_tiny32" / "backbone.safetensors").stat().st_mtime
    rows2 = run_compare(
        ["cpu_tiny32", str(out / "runs" / "cpu_clip32")],
        str(train),
        str(test),
        0.03,
        str(out),
        overrides=SMALL,
        results_file="-",
        c_grid=[0.1, 1.0],
    )
    assert rows2[0]["note"] == "reused run" and rows2[1]["note"] == "given run"
    assert rows2[1]["metrics"] == rows[2]["metrics"] and rows2[0]["steps"] == rows[0]["steps"]
    assert (out / "runs" / "cpu_tiny32" / "backbone.safetensors").stat().st_mtime == mtime


def test_compare_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        run_compare(["cpu_tiny32"], str(tmp_path / "nope"), str(tmp_path), 1, str(tmp_path / "o"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="same name"):
        run_compare(
            ["cpu_tiny32", "cpu_tiny32"],
            str(tmp_path / "d"),
            str(tmp_path / "d"),
            1,
            str(tmp_path / "o"),
        )
