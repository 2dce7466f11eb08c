"""``vssl quickstart``: pretrain the CPU recipe in minutes and see what it learned.

Pretrains ``cpu_simclr32`` (SimCLR on a small ViT for 32-px images) on a generated toy dataset (or
``--data``) within a wall-clock budget, measures kNN for the trained encoder, the same architecture
at random init and raw pixels, and writes ``report.html``: see :func:`run_quickstart`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from .pretrain import BACKBONE_FILE, _count, _intermixed, _say, build_data, build_method

__all__ = ["add_quickstart_parser", "run_quickstart"]

#: SimCLR, not DINOv2: in a few hundred CPU steps DINOv2's head collapsed and its kNN stayed
#: short of the margins below on the toy shapes; this recipe passed them (BENCHMARKS.md,
#: "The quickstart"). ``--recipe cpu_tiny32`` runs DINOv2.
QUICKSTART_RECIPE = "cpu_simclr32"


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
#: Files a quickstart writes into its folder; a rerun on the same folder replaces exactly these.
_QUICKSTART_FILES = (
    "ckpt",
    "metrics.jsonl",
    "config.yaml",
    "report.html",
    "quickstart.json",
    BACKBONE_FILE,
    "teacher_backbone.safetensors",
    "two_tower.safetensors",  # an image-text recipe's towers and tokenizer
    "tokenizer.json",
    "train.txt",
    "test.txt",
)


class _QuickstartData:
    """Where the quickstart's images come from: pretraining source, kNN splits, a description."""

    def __init__(
        self,
        train: str,
        knn_train: str | None,
        knn_test: str | None,
        note: str,
        pca_images: list[Path],
    ):
        self.train, self.knn_train, self.knn_test = train, knn_train, knn_test
        self.note, self.pca_images = note, pca_images

    @property
    def labelled(self) -> bool:
        return self.knn_train is not None


def _one_per_class(items: list[tuple[Path, str | None]], n: int) -> list[Path]:
    """Up to ``n`` images, the first of each class in turn (a varied set for the PCA maps)."""
    by_class: dict = {}
    for p, lab in items:
        by_class.setdefault(lab, []).append(p)
    out, rank = [], 0
    while len(out) < n and any(rank < len(v) for v in by_class.values()):
        out += [
            v[rank] for _, v in sorted(by_class.items(), key=lambda kv: str(kv[0])) if rank < len(v)
        ]
        rank += 1
    return out[:n]


def _images(items):
    return [(p, lab) for p, lab in items if p.suffix.lower() in _IMAGE_SUFFIXES]


def _quickstart_data(data: str | None, out: Path, seed: int, n_pca: int) -> _QuickstartData:
    import random

    from .data.listing import list_inputs

    if data is None:
        from .assets.toy import CLASSES, toy_dataset

        t = time.perf_counter()
        root = toy_dataset(n_train=300, n_test=50)
        took = time.perf_counter() - t
        note = (
            f"generated toy shapes: {len(CLASSES)} classes, 300 train + 50 test images per "
            f"class, 32 px ({root}{f', made in {took:.0f} s' if took > 1 else ', cached'})"
        )
        test = _images(list_inputs(root / "test"))
        return _QuickstartData(
            str(root / "train"),
            str(root / "train"),
            str(root / "test"),
            note,
            _one_per_class(test, n_pca),
        )
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder of images")
    for test_name in ("test", "val"):
        if (root / "train").is_dir() and (root / test_name).is_dir():
            train_items = _images(list_inputs(root / "train"))
            test_items = _images(list_inputs(root / test_name))
            labelled = bool(train_items) and all(
                lab is not None for _, lab in train_items + test_items
            )
            note = (
                f"{root}: train/ ({len(train_items)} images) and {test_name}/ ({len(test_items)})"
            )
            return _QuickstartData(
                str(root / "train"),
                str(root / "train") if labelled else None,
                str(root / test_name) if labelled else None,
                note,
                _one_per_class(test_items, n_pca),
            )
    items = _images(list_inputs(root))
    if not items:
        raise FileNotFoundError(f"--data {data}: no images found (jpg, png, webp, ...)")
    classes = sorted({lab for _, lab in items if lab is not None})
    if len(classes) < 2 or any(lab is None for _, lab in items):
        note = (
            f"{root}: {len(items)} images without class subfolders: pretraining only, no kNN "
            "evaluation (put images in <class>/ subfolders to get one)"
        )
        return _QuickstartData(str(root), None, None, note, _one_per_class(items, n_pca))
    # class subfolders: a seeded 80/20 split per class, written as 'path<TAB>class' lists
    rng = random.Random(seed)
    train, test = [], []
    for c in classes:
        paths = [p for p, lab in items if lab == c]
        rng.shuffle(paths)
        n_test = max(1, len(paths) // 5) if len(paths) > 1 else 0
        test += [(p, c) for p in paths[:n_test]]
        train += [(p, c) for p in paths[n_test:]]
    for name, rows in (("train.txt", train), ("test.txt", test)):
        (out / name).write_text("".join(f"{p}\t{c}\n" for p, c in rows), encoding="utf-8")
    note = (
        f"{root}: {len(classes)} classes, split 80/20 per class into {len(train)} train and "
        f"{len(test)} test images (train.txt / test.txt)"
    )
    return _QuickstartData(
        str(out / "train.txt"),
        str(out / "train.txt"),
        str(out / "test.txt"),
        note,
        _one_per_class(test, n_pca),
    )


class _FirstResult:
    """A monitor whose step-0 result is already known (the random-init baseline, measured
    before training), so the trainer's step-0 evaluation costs nothing."""

    name = "knn"

    def __init__(self, monitor, first: dict):
        self.monitor, self.first = monitor, first
        self.every_n_steps = monitor.every_n_steps
        self.last: tuple[int, dict] | None = None

    def maybe_run(self, step, model):
        if step == 0:
            return dict(self.first)
        out = self.monitor.maybe_run(step, model)
        if out is not None:
            self.last = (step, out)
        return out


def _pixel_knn(monitor, k: int) -> float:
    """kNN top-1 on raw normalized pixels of the monitor's own images (the same evaluator)."""
    import torch

    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from .evaluate.knn import knn_classify

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = {
        s: ((monitor.images[s].float() / 255.0 - mean) / std).flatten(1) for s in ("train", "test")
    }
    r = knn_classify(
        feats["train"],
        monitor.labels["train"],
        feats["test"],
        monitor.labels["test"],
        ks=(k,),
        temperature=monitor.temperature,
        num_classes=len(monitor.classes),
    )
    return r.top1[r.ks[0]]


def _endless(data_obj):
    """The loader's batches epoch after epoch (a small folder may hold fewer batches than the
    probe takes); closing this closes the epoch's loader too."""
    for epoch in itertools.count():
        yield from data_obj.batches(epoch)


def _time_step(method, batches, n: int = 10, warm: int = 4) -> float:
    """Seconds of one whole training step, measured on a copy of ``method`` so the run itself is
    untouched: waiting for the batch, forward, backward, an AdamW step and the EMA update, on
    batches drawn from the run's own loader (its workers compete for the cores as they will).

    The wait for the batch counts: a small model's step can be shorter than the time the loader
    takes to make a multi-crop batch, and then the loader sets the pace (issue 12: a step timed
    without it planned 1838 steps of which the budget allowed 1378). The first ``warm`` steps pay
    for warm-up and use the batches the loader prefetched (2 per worker) while the model was being
    built, so the median of the steps after them is returned."""
    from .methods.base import StepPlan
    from .train.optim import build_optimizer

    probe = copy.deepcopy(method).train()
    probe.plan(StepPlan(total_steps=1000, iters_per_epoch=100))
    # the trainer's AdamW implementation (foreach on CPU); lr 0 leaves the probe's weights as they are
    opt = build_optimizer([{"params": [p for p in probe.student.parameters() if p.requires_grad]}])
    times = []
    for _ in range(n):
        t = time.perf_counter()
        batch = next(batches)
        out = probe(batch, 100)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.after_step(100)
        times.append(time.perf_counter() - t)
    del probe, opt
    return statistics.median(times[warm:])


#: What shows that pretraining learned something (issue 12): kNN top-1 at least this far above
#: the same architecture at random init, and above raw pixels.
MARGIN_RANDOM_INIT, MARGIN_RAW_PIXELS = 0.10, 0.05


def learned(knn: dict[str, float]) -> bool:
    """Whether the trained encoder's kNN clears both baselines by the margins above."""
    return (
        knn["trained"] >= knn["random_init"] + MARGIN_RANDOM_INIT - 1e-9
        and knn["trained"] >= knn["raw_pixels"] + MARGIN_RAW_PIXELS - 1e-9
    )


def verdict(knn: dict[str, float], steps: int) -> str:
    """One plain sentence on what the kNN numbers say, for the terminal and the report."""
    gains = (
        f"{knn['trained'] - knn['random_init']:+.3f} over random init, "
        f"{knn['trained'] - knn['raw_pixels']:+.3f} over raw pixels"
    )
    if learned(knn):
        return f"pretraining learned: {gains}."
    return (
        f"not learned yet ({gains}; learning shows as +{MARGIN_RANDOM_INIT:.2f} and "
        f"+{MARGIN_RAW_PIXELS:.2f}): {steps} steps on this CPU were too few for these images "
        '(BENCHMARKS.md, "The quickstart"). Give it more time (--minutes 20) or a GPU.'
    )


def _restores_torch_threads(fn):
    """The planner may switch torch to one thread (busy cores): put the caller's count back."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _fastest_threads(method, batches) -> float:
    """Time a step with torch's default thread count and with one thread, keep the faster, and
    return its seconds. On a busy machine (other jobs on the cores) OpenMP threads wait for each
    other: one thread then ran 5x faster than two on this project's 2-core machine, so a
    quickstart that kept the default would train a fifth of the steps it could."""
    import torch

    default = torch.get_num_threads()
    t_default = _time_step(method, batches)
    if default == 1:
        return t_default
    torch.set_num_threads(1)
    t_one = _time_step(method, batches)
    if t_one < t_default:
        _say(
            f"one thread: {t_one:.2f} s per step against {t_default:.2f} s with {default} (the "
            "cores are busy): training with one"
        )
        return t_one
    torch.set_num_threads(default)
    return t_default


def _rescale_schedule(recipe, steps: int):
    """The recipe's schedules compressed into ``steps`` optimizer steps (one step per "epoch"),
    so warm-ups, freezes and the cosine decay all happen within the budget: the trainer's and
    the method's (every ``*_epochs`` field of its config)."""
    import dataclasses

    train_cfg = recipe.train
    f = steps / train_cfg.epochs
    recipe.method = dataclasses.replace(
        recipe.method,
        **{
            fl.name: getattr(recipe.method, fl.name) * f
            for fl in dataclasses.fields(recipe.method)
            if fl.name.endswith("_epochs")
        },
    )
    return dataclasses.replace(
        train_cfg,
        epochs=steps,
        iters_per_epoch=1,
        warmup_epochs=train_cfg.warmup_epochs * f,
        log_every=max(1, min(train_cfg.log_every, steps // 50 or 1)),
        max_steps=None,
        checkpoint_every=None,  # no step interval: the wall-clock one (checkpoint_every_s, 10
        # minutes by default) and the final checkpoint cover a budgeted run
        checkpoint_every_s=train_cfg.checkpoint_every_s,
    )


def _clear_quickstart(out: Path) -> None:
    """Remove a previous quickstart's files from ``out`` (a new run must not resume an old one);
    a folder with anything else in it is refused."""
    import shutil

    if not out.exists():
        return
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    foreign = [p.name for p in entries if p.name not in _QUICKSTART_FILES]
    if foreign:
        raise ValueError(
            f"--output {out} already holds other files ({', '.join(sorted(foreign)[:5])}"
            "): choose an empty or new folder"
        )
    for p in entries:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@_restores_torch_threads
def run_quickstart(
    data: str | None = None,
    output: str | os.PathLike = "vssl-quickstart",
    minutes: float = 5.0,
    overrides: Sequence[str] = (),
    *,
    seed: int = 0,
    progress: bool = True,
    n_pca: int = 8,
    knn_images: int = 1000,
    k: int = 20,
    recipe: str = QUICKSTART_RECIPE,
    steps: int | None = None,
) -> dict:
    """Pretrain a CPU recipe (default ``cpu_simclr32``; ``cpu_tiny32``, ``cpu_mae32`` work the
    same) within ``minutes`` (everything included), evaluate and report.

    Data: the generated toy shapes (default), or ``data``: a folder with ``train/`` and
    ``test/``/``val/``, or class subfolders (split 80/20), or unlabelled images (no kNN). kNN
    (k=20, DINOv2's weighted vote, the same ``knn_images``-per-split class-balanced subset) is
    measured for the trained encoder (``method.encoder()``: DINOv2's teacher, SimCLR's backbone),
    the same architecture at its random initialization (the run's own starting point) and raw
    pixels. Writes ``report.html`` (loss and kNN curves, the three numbers, PCA maps of patch
    features) and ``quickstart.json`` into ``output``; returns the summary. ``steps`` trains exactly that many steps instead of planning
    them from the budget (the same run, and the same numbers, on any machine).
    """
    import dataclasses

    import numpy as np
    import torch

    from .data.listing import list_inputs
    from .train.config import load_recipe, save_recipe
    from .train.loop import Trainer, check_output_dir
    from .viz.pca import pca_maps
    from .viz.report import image_table, read_metrics, table, training_report, write_page

    t0 = time.perf_counter()
    budget = float(minutes) * 60.0
    if not budget > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    out = Path(output).expanduser()
    check_output_dir(out)  # a file in the way, no permission, read-only: one line, now
    _clear_quickstart(out)
    out.mkdir(parents=True, exist_ok=True)
    src = _quickstart_data(data, out, seed, n_pca)
    _say(f"vssl quickstart: {src.note}")

    recipe_name = recipe
    recipe = load_recipe(recipe_name, overrides)
    recipe.data.train = src.train
    recipe.train = dataclasses.replace(recipe.train, output_dir=str(out), seed=seed)
    if recipe.data.num_workers > 1:  # 2 CPU cores: one loader worker beside the training
        recipe.data.num_workers = 1

    torch.manual_seed(seed)
    method, _ = build_method(recipe)
    encoder = method.encoder()
    initial = copy.deepcopy(encoder).eval()  # the random-init baseline: this run's start
    n_train = len(_images(list_inputs(src.train)))
    if n_train < recipe.train.batch_size_per_rank:
        _say(
            f"only {n_train} training images: batch size {n_train} instead of "
            f"{recipe.train.batch_size_per_rank}"
        )
        recipe.train = dataclasses.replace(recipe.train, batch_size_per_rank=max(1, n_train))
    data_obj = build_data(recipe, method.views(), device="cpu")

    monitor = None
    knn: dict[str, float] = {}
    t_eval = 0.0
    if src.labelled:
        from .evaluate.monitor import KNNMonitor

        monitor = KNNMonitor(
            src.knn_train,
            src.knn_test,
            every_n_steps=1,
            k=k,
            max_per_split=knn_images,
            num_workers=0,
            seed=seed,
        )
        t = time.perf_counter()
        monitor.prepare(initial.config.img_size)  # decode once; each evaluation is then forwards
        random_init = monitor.run(initial)
        t_eval = random_init["seconds"]
        knn["random_init"] = random_init["knn_top1"]
        knn["raw_pixels"] = _pixel_knn(monitor, k)
        _say(
            f"kNN (k={k}) before training: random init {knn['random_init']:.3f}, raw pixels "
            f"{knn['raw_pixels']:.3f} ({len(monitor.labels['train'])} train / "
            f"{len(monitor.labels['test'])} test images, {time.perf_counter() - t:.1f} s)"
        )

    # plan the run so that training, evaluations and the report fit the budget
    prepare = getattr(method, "prepare", None)
    if prepare is not None:  # what a method derives from data first (SplitMask's vocabulary)
        prepare(data_obj, out)
    batches = _endless(data_obj)
    # + logging and the kNN evaluations' disturbance: real steps took 1.06x and 1.11x the probe
    # in two 20-minute CIFAR runs (a run cut by the time budget ends only its last few steps early)
    t_step = _fastest_threads(method, batches) * 1.08
    batches.close()  # stops its loader workers now
    del batches
    n_evals = 3 if monitor is not None else 0
    # evaluations during and after training, the report, and 10 s for what the command spends
    # outside this function (importing torch, exiting: 5 s more than t0 saw in `time vssl quickstart`)
    reserve = t_eval * (n_evals + 1) + 15.0
    train_seconds = budget - (time.perf_counter() - t0) - reserve
    fixed = steps is not None  # a fixed number of steps: the budget does not stop the run
    if not fixed:
        steps = max(1, int(train_seconds / t_step))
    every = max(1, math.ceil(steps / n_evals)) if n_evals else None
    if monitor is not None:
        monitor.every_n_steps = every
    recipe.train = dataclasses.replace(
        _rescale_schedule(recipe, steps),
        time_budget_s=None if fixed else max(train_seconds + t_eval * n_evals, 1.0),
    )
    # the method was built before the steps were known: it plans from the rescaled config
    # (DINOv2's prototype freeze and teacher warm-up in steps of this run)
    method.cfg = recipe.method
    save_recipe(recipe, out / "config.yaml")
    _say(
        f"plan: {steps} steps of {recipe.train.batch_size_per_rank} images (~{t_step:.2f} s each"
        + (
            ", fixed by --steps)"
            if fixed
            else f") in {max(train_seconds, 0):.0f} s of a {budget:.0f} s budget"
        )
    )

    monitors = [_FirstResult(monitor, random_init)] if monitor is not None else []
    trainer = Trainer(method, data_obj, recipe.train, monitors=monitors, progress=progress)
    summary = trainer.fit()
    del trainer
    from .pretrain import export_encoder, export_extra

    exported = export_encoder(method, out, "none", True)
    export_extra(method, out, "none", True)  # a method's own files (CLIP: its text tower)
    _say(f"trained encoder: {exported}")
    if summary["stopped"] == "interrupted":
        _say(
            f"interrupted by {summary['signal']} at step {summary['step']}: encoder and checkpoint "
            f"saved in {out}; no evaluation or report (a new quickstart starts afresh)"
        )
        return {
            "stopped": "interrupted",
            "signal": summary["signal"],
            "steps": summary["step"],
            "checkpoint": summary["checkpoint"],
            "backbone": str(exported),
        }

    if monitor is not None:
        last = monitors[0].last
        trained = (
            last[1] if last is not None and last[0] == summary["step"] else monitor.run(encoder)
        )
        knn["trained"] = trained["knn_top1"]
        if last is None or last[0] != summary["step"]:  # put the final point on the curve
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "step": summary["step"],
                            "knn_top1": trained["knn_top1"],
                            "knn_top5": trained.get("knn_top5"),
                        }
                    )
                    + "\n"
                )

    # the report
    rows = read_metrics(out / "metrics.jsonl")
    extra = []
    if knn:
        extra.append(
            (
                f"kNN top-1 (k={k}, same images, same evaluator)",
                table(
                    ["features", "kNN top-1"],
                    [
                        ["pretrained encoder", f"{knn['trained']:.3f}"],
                        ["same architecture, random init", f"{knn['random_init']:.3f}"],
                        ["raw pixels", f"{knn['raw_pixels']:.3f}"],
                    ],
                )
                + f'<p class="note">{len(monitor.labels["train"])} train / '
                f"{len(monitor.labels['test'])} test images, DINOv2's weighted vote "
                f"(T={monitor.temperature}) on L2-normalized CLS tokens.</p>",
            )
        )
    else:
        extra.append(
            (
                "kNN",
                '<p class="note">skipped: the images have no class labels (put '
                "them in &lt;class&gt;/ subfolders to get a kNN evaluation)</p>",
            )
        )
    if src.pca_images:
        from .data.decode import open_image
        from .data.transforms import EvalTransform

        res = encoder.config.img_size
        tf = EvalTransform(res, resize_ratio=1.0)
        crops = [np.asarray(tf.crop(tf.resize(open_image(p)))) for p in src.pca_images]
        maps_trained = pca_maps(encoder, src.pca_images)
        maps_random = pca_maps(initial, src.pca_images)
        cols = [Path(p).parent.name if src.labelled else Path(p).stem for p in src.pca_images]
        extra.append(
            (
                "PCA of patch features",
                image_table(
                    cols,
                    [("image", crops), ("pretrained", maps_trained), ("random init", maps_random)],
                    scale=max(1, 96 // res),
                )
                + '<p class="note">First three principal components of the '
                "patch tokens of these images (fitted jointly) as red, green, blue; parts the model "
                "represents alike share a colour (DINOv2's visualization).</p>",
            )
        )
    elapsed = time.perf_counter() - t0
    intro = (
        f"<p>{src.note}.<br>Recipe <code>{recipe_name}</code>: "
        f"{recipe.model.name} ({_count(encoder):,} parameters), {summary['step']} steps of "
        f"{recipe.train.batch_size_per_rank} images in {summary['seconds']:.0f} s "
        f"({summary['images_per_s']:.1f} images/s); {elapsed:.0f} s in all, stopped: "
        f"{summary['stopped']}.</p>"
    )
    if knn:
        import html

        intro += f"<p><b>{html.escape(verdict(knn, summary['step']))}</b></p>"
    baselines = (
        {"random init": knn["random_init"], "raw pixels": knn["raw_pixels"]} if knn else None
    )
    page = training_report(
        rows, title="vssl quickstart", intro=intro, extra_sections=extra, knn_baselines=baselines
    )
    report = write_page(out / "report.html", page)
    result = {
        "data": src.note,
        "output": str(out),
        "report": str(report),
        "steps": summary["step"],
        "stopped": summary["stopped"],
        "train_seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "seconds": time.perf_counter() - t0,
        "budget_seconds": budget,
        "knn_k": k if knn else None,
        "knn_top1": knn or None,
        "learned": learned(knn) if knn else None,
        "checkpoint": summary["checkpoint"],
        "backbone": str(exported),
    }
    (out / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if knn:
        _say(
            f"kNN top-1 (k={k}): trained {knn['trained']:.3f} | random init "
            f"{knn['random_init']:.3f} | raw pixels {knn['raw_pixels']:.3f}"
        )
        _say(verdict(knn, summary["step"]))
    _say(f"report: {report} ({result['seconds']:.0f} s)")
    return result


def _quickstart_cmd(args) -> int:
    from .pretrain import _signal_exit_code

    result = run_quickstart(
        args.data,
        args.output,
        args.minutes,
        args.overrides,
        seed=args.seed,
        progress=not args.no_progress,
        recipe=args.recipe,
        steps=args.steps,
    )
    if result.get("stopped") == "interrupted":
        return _signal_exit_code(result.get("signal"))
    return 0


def add_quickstart_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl quickstart``."""
    p = subparsers.add_parser(
        "quickstart",
        help="pretrain a small ViT in minutes on CPU and see what it learned",
        description="Pretrain the CPU recipe (cpu_simclr32: SimCLR on a small ViT for 32-px "
        "images) on a generated toy dataset of shapes (no download) or on --data, within --minutes on CPU; "
        "then compare kNN accuracy (k=20) of the trained model, the same model at "
        "random init, and raw pixels, and write report.html with loss and kNN curves "
        "and PCA maps of patch features.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  vssl quickstart\n  vssl quickstart --minutes 2 --output qs/\n"
        "  vssl quickstart --data photos/ --minutes 10      # class subfolders -> kNN\n"
        "  vssl quickstart train.batch_size_per_rank=32     # recipe overrides",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="overrides of the recipe (cpu_simclr32 unless --recipe)",
    )
    p.add_argument(
        "--data",
        metavar="FOLDER",
        help="images to use instead of the toy shapes: train/ + test/ (or val/), class "
        "subfolders (split 80/20), or plain images (no kNN)",
    )
    p.add_argument(
        "--output",
        default="vssl-quickstart",
        metavar="DIR",
        help="run folder (default: ./vssl-quickstart; a previous quickstart there is replaced)",
    )
    p.add_argument(
        "--minutes", type=float, default=5.0, help="wall-clock budget for everything (default 5)"
    )
    p.add_argument(
        "--recipe",
        default=QUICKSTART_RECIPE,
        metavar="NAME",
        help="the CPU recipe to run (default cpu_simclr32, SimCLR; cpu_tiny32: DINOv2; "
        "cpu_mae32: MAE)",
    )
    p.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="train exactly N steps instead of planning them from --minutes (the same run, "
        "and the same numbers, on a fast or a slow machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_quickstart_cmd)
    return _intermixed(p)
