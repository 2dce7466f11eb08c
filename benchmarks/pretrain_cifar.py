#!/usr/bin/env python
"""Quality and speed of a CPU pretraining recipe on real CIFAR-10 images (issues 5 and 11).

Runs ``--recipe`` (default ``cpu_tiny32``, DINOv2: DINO + iBOT + KoLeo on a ViT with 8-px patches;
``cpu_mae32``: MAE on a ViT with 4-px patches) on
``cifar10-subset/train`` for a fixed wall-clock budget (``--minutes``, everything included:
data, training, evaluations), through the same code as ``vssl quickstart --data``: the schedule is
compressed into the number of steps that fit the budget. Then kNN (k=20, DINOv2's weighted vote)
on ``cifar10-subset/test`` for the trained encoder (``method.encoder()``), the same architecture at
its random initialization (the run's own starting point) and raw pixels, with the same evaluator
and images; and a linear probe (multinomial logistic regression, scikit-learn's L-BFGS, on
standardized CLS features, C=1: MAE's linear probe is BatchNorm + linear) on the same three.
The loss curve is printed too (for MAE: the reconstruction loss).

Also the speed of a training step: images/s over the run, and model FLOP/s (forward + backward
FLOPs of one step, counted with ``torch.utils.flop_counter``, times steps per second) over this
machine's fp32 matmul rate (a 2048^3 matmul, best of several).

    python benchmarks/pretrain_cifar.py                 # 20 minutes (the issue's budget)
    python benchmarks/pretrain_cifar.py --minutes 2     # a short look
    python benchmarks/pretrain_cifar.py --recipe cpu_mae32
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-subset"


def matmul_peak(n: int = 2048, repeats: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(
    overrides: list[str], data: Path, recipe_name: str = "cpu_tiny32"
) -> tuple[float, int]:
    """(forward + backward FLOPs of one training step, batch size) for the recipe on ``data``."""
    from torch.utils.flop_counter import FlopCounterMode

    from vssl.methods.base import StepPlan
    from vssl.pretrain import build_data, build_method
    from vssl.train.config import load_recipe

    recipe = load_recipe(recipe_name, overrides)
    recipe.data.train = str(data / "train")
    recipe.data.num_workers = 0
    method, _ = build_method(recipe)
    method.plan(StepPlan(total_steps=1000, iters_per_epoch=100))
    batches = build_data(recipe, method.views(), device="cpu").batches(0)
    batch = next(batches)
    batches.close()
    counter = FlopCounterMode(display=False)
    with counter:
        out = method(batch, 0)
        out["loss"].backward()
    return float(counter.get_total_flops()), recipe.train.batch_size_per_rank


def linear_probes(args, res) -> dict[str, float]:
    """Linear-probe top-1 of the trained encoder, its random init and raw pixels, on the CLS
    features of the same class-balanced images the kNN used."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from vssl.evaluate.monitor import KNNMonitor
    from vssl.models.zoo import create_model
    from vssl.pretrain import build_method
    from vssl.train.config import load_recipe

    trained = create_model(res["backbone"]).eval()
    torch.manual_seed(args.seed)  # run_quickstart's own initialization
    initial = build_method(load_recipe(args.recipe, list(args.overrides)))[0].encoder().eval()
    monitor = KNNMonitor(
        args.data / "train",
        args.data / "test",
        every_n_steps=1,
        max_per_split=args.knn_images,
        num_workers=0,
        seed=args.seed,
    )
    monitor.prepare(trained.config.img_size)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = {
        "trained": monitor.features(trained),
        "random_init": monitor.features(initial),
        "raw_pixels": {
            s: ((monitor.images[s].float() / 255 - mean) / std).flatten(1)
            for s in ("train", "test")
        },
    }
    y = {s: monitor.labels[s].numpy() for s in ("train", "test")}
    out = {}
    for name, f in feats.items():
        xtr, xte = (np.asarray(f[s].cpu(), dtype=np.float64) for s in ("train", "test"))
        scaler = StandardScaler().fit(xtr)
        clf = LogisticRegression(max_iter=3000, C=1.0).fit(scaler.transform(xtr), y["train"])
        out[name] = float(clf.score(scaler.transform(xte), y["test"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="a folder with train/ and test/ class subfolders",
    )
    ap.add_argument(
        "--knn-images",
        type=int,
        default=10000,
        help="images per split for kNN (class-balanced; default: all of CIFAR subset)",
    )
    ap.add_argument("--output", type=Path, default=None, help="run folder (default: a temp dir)")
    ap.add_argument(
        "--recipe",
        default="cpu_tiny32",
        help="cpu_tiny32 (DINOv2), cpu_mae32 (MAE) or cpu_splitmask32 (SplitMask)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train exactly this many steps instead of planning them from --minutes",
    )
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.base_lr=3e-3")
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"no {args.data}/train: pass --data", file=sys.stderr)
        return 2
    import torch

    from vssl.quickstart import run_quickstart

    peak = matmul_peak()
    flops, batch = step_flops(list(args.overrides), args.data, args.recipe)
    out = args.output or Path(tempfile.mkdtemp(prefix="vssl-pretrain-cifar-"))
    res = run_quickstart(
        str(args.data),
        out,
        args.minutes,
        list(args.overrides),
        knn_images=args.knn_images,
        progress=False,
        recipe=args.recipe,
        seed=args.seed,
        steps=args.steps,
    )
    probe = linear_probes(args, res)
    steps_per_s = res["steps"] / res["train_seconds"]
    curve = [
        (r["step"], r["knn_top1"])
        for r in (json.loads(line) for line in open(Path(res["output"]) / "metrics.jsonl"))
        if r.get("knn_top1") is not None
    ]
    knn = res["knn_top1"]
    cmd = "python " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    )
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    print(
        f"\nCommand: `{cmd}`  \nMachine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}  \n"
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}  \n"
        f"Run: {res['steps']} steps of {batch} images in {res['train_seconds']:.0f} s of training "
        f"({res['seconds']:.0f} s in all, budget {res['budget_seconds']:.0f} s); "
        f"stopped: {res['stopped']}; run folder {res['output']}\n"
    )
    print("| features | kNN top-1 (k=20) | linear probe top-1 |\n|---|---:|---:|")
    print(
        f"| {args.recipe} encoder after {args.minutes:g} min | **{knn['trained']:.3f}** | "
        f"**{probe['trained']:.3f}** |"
    )
    print(
        f"| same architecture, random init | {knn['random_init']:.3f} | "
        f"{probe['random_init']:.3f} |"
    )
    print(f"| raw pixels | {knn['raw_pixels']:.3f} | {probe['raw_pixels']:.3f} |")
    print(f"\nkNN curve (step: top-1): {', '.join(f'{s}: {v:.3f}' for s, v in curve)}")
    losses = [
        (r["step"], r["loss"])
        for r in (json.loads(line) for line in open(Path(res["output"]) / "metrics.jsonl"))
        if r.get("loss") is not None
    ]
    picks = sorted({losses[int(i * (len(losses) - 1) / 9)] for i in range(10)}) if losses else []
    print(f"loss curve (step: loss): {', '.join(f'{s}: {v:.4f}' for s, v in picks)}\n")
    print("| speed | value |\n|---|---:|")
    print(f"| training images/s (whole run) | {res['images_per_s']:.1f} |")
    print(f"| FLOPs per step (forward + backward, batch {batch}) | {flops / 1e9:.1f} G |")
    print(f"| model FLOP/s | {flops * steps_per_s / 1e9:.1f} G |")
    print(f"| fp32 matmul rate of this machine (2048^3) | {peak / 1e9:.1f} G |")
    print(f"| model FLOP/s over matmul rate | {flops * steps_per_s / peak:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
