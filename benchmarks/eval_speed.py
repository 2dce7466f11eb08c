#!/usr/bin/env python
"""Speed and peak memory of the frozen-feature evaluators at ImageNet-like scale.

(knn)    ``knn_classify`` (k in {10, 20, 100, 200}, T=0.07) with N_train x N_test x D features
         (default 100k x 100k x 768), against the named peer: faiss-cpu ``IndexFlatIP`` exact
         search for the 200 neighbours + the same vote in torch. A full similarity matrix would
         need N_train x N_test x 4 bytes (40 GB at 100k): both ways are blocked.
(linear) ``train_linear_grid``, DINOv2's grid of 2 block choices x avgpool on/off x 13 learning
         rates = 52 heads on N x (4 blocks + avgpool) x D features (default 50k, 768-d, 100
         classes, 10 epochs), all heads in one pass; the peer is the same heads trained one at a
         time (what a loop over configurations does), timed on ``--peer-heads`` heads and scaled
         to 52.
(logreg) ``sweep_logreg``, DINOv2's logistic-regression protocol: 45 values of C, L-BFGS,
         float64, tol 1e-6, at most 1000 iterations per fit, on N x D CLS-like features (default
         10k x 384, 10 classes; class clusters with a mean offset and uneven feature scales); the
         peer is scikit-learn's ``LogisticRegression`` (lbfgs, same tol and max_iter,
         ``warm_start=True`` along the same increasing C) on the same split, refit included.

Features are synthetic but structured (Gaussian class clusters), so accuracies are meaningful.
Each part runs in a fresh process, so its peak resident memory (VmHWM) is its own; the features'
own size is printed beside it. Usage:

    python benchmarks/eval_speed.py                       # the real measurement (long on 2 cores)
    python benchmarks/eval_speed.py --quick               # smoke run
    python benchmarks/eval_speed.py --parts knn --knn-train 50000 --knn-test 10000
    python benchmarks/eval_speed.py --parts logreg --logreg-n 900 --logreg-dim 192
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _clusters(n: int, d: int, classes: int, seed: int, noise: float = 2.0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).standard_normal((classes, d)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x = centers[labels] + noise * rng.standard_normal((n, d), dtype=np.float32)
    return x, labels.astype(np.int64)


def _knn_faiss(train, ytrain, test, ytest, ks, temperature, classes):
    import faiss
    import numpy as np
    import torch

    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(tr.shape[1])
    index.add(tr)
    sims, idx = index.search(te, max(ks))
    w = torch.from_numpy(sims / temperature).softmax(dim=1)  # DINOv2: softmax over max-k
    votes_lab = torch.from_numpy(ytrain)[torch.from_numpy(idx)]
    out = {}
    for k in ks:
        scores = torch.zeros(len(te), classes).scatter_add_(1, votes_lab[:, :k], w[:, :k])
        out[k] = float((scores.argmax(1).numpy() == ytest).mean())
    return out


def child_knn(args) -> dict:
    import torch

    from vssl.evaluate.knn import knn_classify

    torch.set_num_threads(args.threads)
    train, ytrain = _clusters(args.knn_train, args.dim, args.classes, 0)
    test, ytest = _clusters(args.knn_test, args.dim, args.classes, 1)
    feat_bytes = train.nbytes + test.nbytes
    base = _hwm()
    ks = (10, 20, 100, 200)
    t0 = time.perf_counter()
    if args.way == "vssl":
        r = knn_classify(train, ytrain, test, ytest, ks=ks, num_classes=args.classes)
        acc = {k: r.top1[k] for k in r.ks}
    else:
        acc = _knn_faiss(train, ytrain, test, ytest, ks, 0.07, args.classes)
    dt = time.perf_counter() - t0
    flops = 2.0 * args.knn_train * args.knn_test * args.dim
    return {
        "seconds": dt,
        "gflops": flops / dt / 1e9,
        "top1@20": acc[20],
        "peak_bytes": _hwm(),
        "peak_over_start": _hwm() - base,
        "feature_bytes": feat_bytes,
    }


def child_linear(args) -> dict:
    from types import SimpleNamespace

    import torch

    from vssl.evaluate.linear import DINOV2_LRS, train_linear_grid

    torch.set_num_threads(args.threads)

    def split(n, seed):
        x, y = _clusters(n, args.dim * 5, args.classes, seed, noise=6.0)
        return SimpleNamespace(
            layers=x[:, : 4 * args.dim].reshape(n, 4, args.dim).copy(),
            avgpool=x[:, 4 * args.dim :].copy(),
            cls=x[:, 3 * args.dim : 4 * args.dim],
            labels=y,
        )

    train, test = split(args.linear_n, 0), split(max(1000, args.linear_n // 5), 1)
    feat_bytes = (
        train.layers.nbytes + train.avgpool.nbytes + test.layers.nbytes + test.avgpool.nbytes
    )
    base = _hwm()
    t0 = time.perf_counter()
    if args.way == "vssl":
        r = train_linear_grid(train, test, epochs=args.epochs, num_classes=args.classes)
        heads, acc = len(r.heads), r.test_top1
    else:  # one head at a time: the first --peer-heads of the grid, scaled to the whole grid
        grid = [(n, a, lr) for n in (1, 4) for a in (False, True) for lr in DINOV2_LRS]
        for n, a, lr in grid[-args.peer_heads :]:
            r = train_linear_grid(
                train,
                test,
                n_blocks=(n,),
                avgpool=(a,),
                lrs=(lr,),
                epochs=args.epochs,
                num_classes=args.classes,
            )
        heads, acc = args.peer_heads, r.test_top1
    dt = time.perf_counter() - t0
    total = dt * (52 / heads) if args.way != "vssl" else dt
    return {
        "seconds": total,
        "measured_seconds": dt,
        "heads_timed": heads,
        "test_top1": acc,
        "peak_bytes": _hwm(),
        "peak_over_start": _hwm() - base,
        "feature_bytes": feat_bytes,
    }


def child_logreg(args) -> dict:
    import warnings
    from types import SimpleNamespace

    import numpy as np
    import torch

    from vssl.evaluate.linear import stratified_split
    from vssl.evaluate.logreg import C_GRID, sweep_logreg

    torch.set_num_threads(args.threads)
    n, d, k = args.logreg_n, args.logreg_dim, args.logreg_classes
    rng = np.random.default_rng(0)
    offset = 3.0 * rng.standard_normal(d).astype(np.float32)  # CLS embeddings are not centred
    scale = np.exp(0.5 * rng.standard_normal(d)).astype(np.float32)  # nor evenly scaled

    def split(m, seed):
        x, y = _clusters(m, d, k, seed, noise=6.0)
        return SimpleNamespace(cls=x * scale + offset, labels=y, classes=None)

    train, test = split(n, 0), split(max(1000, n // 5), 1)
    base = _hwm()
    t0 = time.perf_counter()
    if args.way == "vssl":
        r = sweep_logreg(train, test, num_classes=k)
        best_C, acc = r.best_C, r.test_top1
        iters = sum(s["n_iter"] for s in r.sweep) + r.model.n_iter
    else:  # scikit-learn, the same protocol: warm starts along increasing C, refit on all
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        warnings.simplefilter("ignore", ConvergenceWarning)
        x, y = train.cls.astype(np.float64), train.labels
        tr, val = stratified_split(y, 0.1, 0)
        sk = LogisticRegression(tol=1e-6, max_iter=1000, warm_start=True)
        best, iters = None, 0
        for C in C_GRID:
            sk.set_params(C=C).fit(x[tr], y[tr])
            iters += int(sk.n_iter_.max())
            a = float((sk.predict(x[val]) == y[val]).mean())
            if best is None or a > best[0]:
                best = (a, C)
        best_C = best[1]
        sk = LogisticRegression(C=best_C, tol=1e-6, max_iter=1000).fit(x, y)
        iters += int(sk.n_iter_.max())
        acc = float((sk.predict(test.cls.astype(np.float64)) == test.labels).mean())
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "iterations": iters,
        "best_C": best_C,
        "test_top1": acc,
        "peak_bytes": _hwm(),
        "peak_over_start": _hwm() - base,
        "feature_bytes": train.cls.nbytes + test.cls.nbytes,
    }


def _run_child(part: str, way: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--way", way] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k
        in (
            "knn_train",
            "knn_test",
            "dim",
            "classes",
            "linear_n",
            "epochs",
            "peer_heads",
            "threads",
            "logreg_n",
            "logreg_dim",
            "logreg_classes",
        )
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", default="knn,linear")
    ap.add_argument("--knn-train", type=int, default=100_000)
    ap.add_argument("--knn-test", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--linear-n", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--peer-heads", type=int, default=4)
    ap.add_argument("--logreg-n", type=int, default=10_000)
    ap.add_argument("--logreg-dim", type=int, default=384)
    ap.add_argument("--logreg-classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--way", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = {"knn": child_knn, "linear": child_linear, "logreg": child_logreg}[args.child](args)
        print(json.dumps(res))
        return 0
    if args.quick:
        args.knn_train, args.knn_test, args.linear_n, args.epochs, args.peer_heads = (
            5000,
            2000,
            3000,
            2,
            2,
        )
        args.logreg_n, args.logreg_dim = 900, 192
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    rows = []
    gib = 1024**3
    if "knn" in parts:
        for way in ("vssl", "faiss"):
            r = _run_child("knn", way, args)
            rows.append(
                (
                    f"knn {args.knn_train}x{args.knn_test}x{args.dim}, 4 k's",
                    "vssl knn_classify" if way == "vssl" else "faiss IndexFlatIP + vote (peer)",
                    r["seconds"],
                    r["peak_bytes"] / gib,
                    r["feature_bytes"] / gib,
                    f"{r['gflops']:.0f} GFLOP/s, top1@20 {r['top1@20']:.3f}",
                )
            )
            print(rows[-1], file=sys.stderr)
    if "linear" in parts:
        for way in ("vssl", "one-at-a-time"):
            r = _run_child("linear", way, args)
            note = f"test top1 {r['test_top1']:.3f}"
            if way != "vssl":
                note += f"; {r['heads_timed']} heads timed ({r['measured_seconds']:.1f} s), x{52 / r['heads_timed']:.0f}"
            rows.append(
                (
                    f"linear grid 52 heads, {args.linear_n}x(4+1)x{args.dim}, {args.classes} classes, "
                    f"{args.epochs} epochs",
                    "vssl train_linear_grid" if way == "vssl" else "heads one at a time (peer)",
                    r["seconds"],
                    r["peak_bytes"] / gib,
                    r["feature_bytes"] / gib,
                    note,
                )
            )
            print(rows[-1], file=sys.stderr)
    if "logreg" in parts:
        for way in ("vssl", "scikit-learn"):
            r = _run_child("logreg", way, args)
            rows.append(
                (
                    f"logreg 45 C's, {args.logreg_n}x{args.logreg_dim}, "
                    f"{args.logreg_classes} classes",
                    "vssl sweep_logreg" if way == "vssl" else "scikit-learn lbfgs, warm (peer)",
                    r["seconds"],
                    r["peak_bytes"] / gib,
                    r["feature_bytes"] / gib,
                    f"{r['iterations']} L-BFGS iterations, best C {r['best_C']:.3g}, "
                    f"test top1 {r['test_top1']:.3f}",
                )
            )
            print(rows[-1], file=sys.stderr)
    cmd = "python " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    )
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    print(
        f"\nCommand: `{cmd}`  \nMachine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads  \nDate: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
    )
    print(
        "| task | way | seconds | peak RSS GiB | features GiB | note |\n|---|---|---:|---:|---:|---|"
    )
    for task, way, s, peak, feat, note in rows:
        print(f"| {task} | {way} | {s:.1f} | {peak:.2f} | {feat:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
