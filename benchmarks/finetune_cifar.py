#!/usr/bin/env python
"""Fine-tuning top-1 of a backbone on real CIFAR-10 images: the small-data study's judge (issue 12).

Fine-tunes RUN_OR_MODEL (a `vssl pretrain` run folder, any checkpoint vssl loads, or a zoo name)
end to end on ``cifar10-subset/train`` (1000 images per class, or the first ``--per-class``) and
tests on ``cifar10-subset/test`` after every epoch, with `vssl finetune`'s protocol (MAE's recipe:
layer decay, drop path, Mixup/CutMix, label smoothing, RandAugment, warm-up + cosine) at 32 px.
``--random-init`` keeps the architecture with random weights: the "no pretraining" row.
Any other `vssl finetune` option is passed through (``--blr 1e-3 --layer-decay 0.75``...).

    python benchmarks/finetune_cifar.py runs/cpu_tiny32 --epochs 5
    python benchmarks/finetune_cifar.py runs/cpu_tiny32 --random-init --epochs 5
    python benchmarks/finetune_cifar.py runs/cpu_mae32 --per-class 100 --epochs 20

Prints one line per run: final and best top-1, epochs, wall-clock seconds and the load average
(the CPU is shared: compare runs measured side by side).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-subset"


def subset(src: Path, dst: Path, per_class: int) -> Path:
    """``dst/<class>/`` with symlinks to the first ``per_class`` files of each ``src/<class>/``."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / cls.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            os.symlink(f, out / f.name)
    return dst


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "src"))
    from vssl.finetune import add_finetune_parser, config_from_args, finetune, record_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", metavar="RUN_OR_MODEL")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/ and test/")
    ap.add_argument("--per-class", type=int, default=None, help="training images per class")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--output", type=Path, default=None, help="run folder (default: a temp dir)")
    ap.add_argument("--results", default="-", help="results file to append to (default: none)")
    args, rest = ap.parse_known_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="finetune_cifar_")
    train = args.data / "train"
    if args.per_class:
        train = subset(train, Path(tmp.name) / "train", args.per_class)
    out = args.output or Path(tmp.name) / "run"
    parser = argparse.ArgumentParser(prog="vssl")
    add_finetune_parser(parser.add_subparsers())
    ft_argv = ["finetune", args.model, "--train", str(train), "--test", str(args.data / "test")]
    ft_argv += ["--img-size", "32", "--epochs", str(args.epochs), "--output", str(out)]
    ft_argv += ["--warmup-epochs", str(args.warmup_epochs), "--results", args.results]
    ft_argv += ["--dataset", "cifar10-subset", *rest]
    cfg = config_from_args(parser.parse_args(ft_argv))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = finetune(cfg)
    seconds = time.perf_counter() - t0
    record_result(cfg, result)
    what = f"{args.model}{' (random init)' if cfg.random_init else ''}"
    per_class = args.per_class or "all"
    print(
        f"{what}: finetune top-1 {result.top1:.4f} (best {result.best_top1:.4f} at epoch "
        f"{result.best_epoch}), top-5 {result.top5:.4f}; {args.epochs} epochs, {per_class} train "
        f"images per class, {seconds:.0f} s, load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
