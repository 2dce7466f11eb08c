#!/usr/bin/env python
"""The small-data study of issue 12: DINOv2, MAE, SplitMask and no pretraining on one small dataset.

SplitMask's claim (El-Nouby et al. 2021): on a small dataset of the target domain alone, a
denoising autoencoder (SplitMask) pretrains better than DINO, judged by fine-tuning. This runs
that comparison on ``cifar10-subset`` (10 000 real 32-px images) on a CPU:

1. each CPU recipe (``cpu_tiny32`` DINOv2, ``cpu_mae32`` MAE, ``cpu_splitmask32`` SplitMask)
   pretrains on ``train/`` for the same wall-clock budget (``--minutes``, through
   ``vssl quickstart --data``'s planner: the schedule is compressed into the steps that fit), and
   its encoder is judged by kNN (k=20) on ``test/``, beside its own random init and raw pixels;
2. every encoder, and each architecture at random init (the "no pretraining" rows), is fine-tuned
   with `vssl finetune`'s protocol (MAE's recipe at 32 px) for the same ``--epochs`` on
   ``--per-class`` training images per class, and tested on ``test/``.

The CPU seconds each pretraining used are printed beside it (the machine may be shared: equal
wall-clock is equal CPU only when nothing else runs). Prints a markdown table for BENCHMARKS.md.

    python benchmarks/small_data.py --minutes 10 --epochs 10
    python benchmarks/small_data.py --minutes 2 --epochs 2 --per-class 100   # a short look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-subset"
RECIPES = ("cpu_tiny32", "cpu_mae32", "cpu_splitmask32")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(x.ru_utime + x.ru_stime for x in r)


def _finetune(model: str, args, out: Path, random_init: bool) -> dict:
    from vssl.finetune import add_finetune_parser, config_from_args, finetune, record_result

    train = args.data / "train"
    if args.per_class:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from finetune_cifar import subset

        train = subset(train, out.parent / f"{out.name}-train", args.per_class)
    parser = argparse.ArgumentParser(prog="vssl")
    add_finetune_parser(parser.add_subparsers())
    argv = ["finetune", model, "--train", str(train), "--test", str(args.data / "test")]
    argv += ["--img-size", "32", "--epochs", str(args.epochs), "--output", str(out)]
    argv += ["--results", str(args.results), "--dataset", "cifar10-subset", "--no-progress"]
    if random_init:
        argv.append("--random-init")
    cfg = config_from_args(parser.parse_args(argv))
    t0 = time.perf_counter()
    result = finetune(cfg)
    record_result(cfg, result)
    return {"top1": result.top1, "best": result.best_top1, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="train/ and test/ class folders"
    )
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--minutes", type=float, default=10.0, help="pretraining budget per recipe")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per encoder")
    ap.add_argument("--per-class", type=int, default=None, help="fine-tuning images per class")
    ap.add_argument("--knn-images", type=int, default=10000, help="kNN images per split")
    ap.add_argument("--output", type=Path, default=None, help="folder for the runs (default: temp)")
    ap.add_argument(
        "--results", type=Path, default=None, help="results file (default: OUTPUT/results.jsonl)"
    )
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"no {args.data}/train: pass --data", file=sys.stderr)
        return 2
    import torch

    from vssl.quickstart import run_quickstart
    from vssl.train.config import load_recipe

    out = args.output or Path(tempfile.mkdtemp(prefix="vssl-small-data-"))
    out.mkdir(parents=True, exist_ok=True)
    args.results = args.results or out / "results.jsonl"
    rows, loads = [], [os.getloadavg()[0]]
    for recipe in args.recipes:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        res = run_quickstart(
            str(args.data),
            out / recipe,
            args.minutes,
            knn_images=args.knn_images,
            progress=False,
            recipe=recipe,
        )
        cpu = _cpu_seconds() - cpu0
        loads.append(os.getloadavg()[0])
        ft = _finetune(str(out / recipe), args, out / f"{recipe}-finetune", random_init=False)
        rnd = _finetune(str(out / recipe), args, out / f"{recipe}-scratch", random_init=True)
        loads.append(os.getloadavg()[0])
        knn = res["knn_top1"]
        model = load_recipe(recipe).model.name
        rows.append((recipe, model, res["steps"], time.perf_counter() - t0, cpu, knn, ft, rnd))
        print(
            f"{recipe}: {res['steps']} steps, kNN {knn['trained']:.3f} (random "
            f"{knn['random_init']:.3f}, pixels {knn['raw_pixels']:.3f}); fine-tune "
            f"{ft['top1']:.3f}, from scratch {rnd['top1']:.3f}",
            flush=True,
        )
    cmd = "python " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)
    )
    print(
        f"\nCommand: `{cmd}`  \nDate: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average "
        f"{min(loads):.1f}-{max(loads):.1f}  \nPretraining {args.minutes:g} min per recipe on "
        f"{args.data}/train; fine-tuning {args.epochs} epochs on "
        f"{args.per_class or 'all'} images per class; kNN (k=20) and top-1 on test/\n"
    )
    print(
        "| pretraining | architecture | steps | CPU s | kNN top-1 | kNN random init | kNN raw pixels "
        "| fine-tune top-1 | from scratch (same architecture) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for recipe, model, steps, _, cpu, knn, ft, rnd in rows:
        print(
            f"| {recipe} | {model} | {steps} | {cpu:.0f} | {knn['trained']:.3f} | "
            f"{knn['random_init']:.3f} | {knn['raw_pixels']:.3f} | {ft['top1']:.3f} | "
            f"{rnd['top1']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
