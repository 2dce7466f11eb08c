#!/usr/bin/env python
"""How far the CPU recipe's backbone gets *with labels* on the same images: a ceiling for kNN.

``pretrain_cifar.py`` asks whether self-supervised pretraining of ``cpu_tiny32``'s ViT reaches
50% kNN top-1 on ``cifar10-subset`` within 20 CPU minutes. This script answers the question
beneath it: with the labels, and the same backbone, images and evaluator (k=20, DINOv2's weighted
vote on the CLS token of :class:`vssl.evaluate.monitor.KNNMonitor`'s images), how many epochs
does it take?
A self-supervised objective learns from less than the labels, so at an equal number of epochs
it is not expected to do better.

Supervised training here: cross-entropy through a linear head on the CLS token, AdamW (lr 1e-3,
weight decay 0.05), batch 64, the standard CIFAR augmentation (4-px reflect-pad random crop,
horizontal flip). kNN and the head's accuracy on the test split after every epoch.

    python benchmarks/supervised_ceiling.py --epochs 20
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-subset"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="a folder with train/ and test/"
    )
    ap.add_argument("--model", default="vit-tiny-p8-32", help="zoo name (cpu_tiny32's backbone)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--stem", default="patch", choices=["patch", "conv"], help="the ViT's stem (model.stem)"
    )
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"no {args.data}/train: pass --data", file=sys.stderr)
        return 2
    import torch
    import torch.nn.functional as F

    from vssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from vssl.evaluate.knn import knn_classify
    from vssl.evaluate.monitor import KNNMonitor
    from vssl.models import create_model

    torch.manual_seed(args.seed)
    model = create_model(args.model, random_init=True, stem=args.stem)
    # the images, labels and CLS features of pretrain_cifar.py's evaluator (KNNMonitor)
    monitor = KNNMonitor(
        args.data / "train",
        args.data / "test",
        every_n_steps=1,
        resolution=model.config.img_size,
        seed=args.seed,
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    xtr = (monitor.images["train"].float() / 255.0 - mean) / std
    ytr, yte = monitor.labels["train"], monitor.labels["test"]
    size = xtr.shape[-1]
    head = torch.nn.Linear(model.embed_dim, len(monitor.classes))
    opt = torch.optim.AdamW(
        [*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05
    )
    g = torch.Generator().manual_seed(args.seed)

    def evaluate() -> tuple[float, float]:
        feats = monitor.features(model)
        knn = knn_classify(
            feats["train"],
            ytr,
            feats["test"],
            yte,
            ks=(monitor.k,),
            temperature=monitor.temperature,
        ).top1[monitor.k]
        with torch.no_grad():
            acc = (head(feats["test"]).argmax(1) == yte).float().mean().item()
        return knn, acc

    rows = [(0, 0.0, *evaluate())]
    print(f"epoch 0: kNN {rows[0][2]:.3f}", flush=True)
    train_s, bs = 0.0, args.batch_size
    model.train()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=g)
        for k in range(0, len(xtr) - bs + 1, bs):
            x = F.pad(xtr[perm[k : k + bs]], (4, 4, 4, 4), mode="reflect")
            i, j = torch.randint(0, 9, (2,), generator=g).tolist()
            x = x[:, :, i : i + size, j : j + size]
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(3)
            loss = F.cross_entropy(
                head(model.forward_features(x)["x_norm_clstoken"]), ytr[perm[k : k + bs]]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t0  # evaluation time is not training time
        rows.append((epoch, train_s, *evaluate()))
        print(
            f"epoch {epoch}: {train_s:.0f} s, loss {loss.item():.3f}, kNN {rows[-1][2]:.3f}, "
            f"head accuracy {rows[-1][3]:.3f}",
            flush=True,
        )

    cmd = "python " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    )
    print(
        f"\nCommand: `{cmd}`  \nDate: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}\n"
    )
    print("| epochs | training s | kNN top-1 (k=20) | linear head top-1 |\n|---:|---:|---:|---:|")
    for epoch, s, knn, acc in rows:
        print(f"| {epoch} | {s:.0f} | {knn:.3f} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
