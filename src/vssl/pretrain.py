"""``vssl pretrain`` (a recipe -> data, method, monitor, trainer) and ``vssl quickstart``.

``vssl pretrain CONFIG [key=value ...]`` is glue only: the recipe (:mod:`vssl.train.config`) says
what to build, :class:`~vssl.train.data.TrainData` makes the batches, the method
(:class:`~vssl.methods.dinov2.DINOv2`) computes the losses, the optional
:class:`~vssl.evaluate.monitor.KNNMonitor` measures, and :class:`~vssl.train.loop.Trainer` owns the
loop, devices and checkpoints. Under ``torchrun`` every process runs this same code; the trainer's
distributed setup finds the process group. The run folder gets the resolved ``config.yaml``,
``metrics.jsonl``, ``ckpt/step_N/``, ``report.html`` (curves) and ``teacher_backbone.safetensors`` (the teacher
backbone in vssl's format: ``vssl embed RUN/teacher_backbone.safetensors ...`` uses it).

``vssl quickstart`` pretrains the CPU recipe on a generated toy dataset (or ``--data``) within a
time budget and writes ``report.html``: see :func:`run_quickstart`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "add_pretrain_parser", "add_quickstart_parser", "build_data", "build_method", "build_monitor",
    "run_pretrain", "run_quickstart", "schedule_summary",
]

QUICKSTART_RECIPE = "cpu_tiny32"


def _say(*args, main: bool = True, **kw) -> None:
    if main:
        print(*args, **kw, flush=True)


# ------------------------------------------------------------------------------------- building
def _is_zoo_name(name: str) -> bool:
    from .models.zoo import _ZOO

    return name in _ZOO


def build_method(recipe, *, meta: bool = False):
    """The method of ``recipe`` around its backbone; ``(method, load_report or None)``.

    ``model.weights`` (or a checkpoint path as ``model.name``) initializes student and teacher
    from released weights, with the DINO/iBOT heads when the file carries them. ``meta=True``
    builds shapes only (parameter counts of a 7B recipe without allocating it).
    """
    import torch

    from .methods.dinov2 import DINOv2
    from .models.zoo import create_model

    m = recipe.model
    if recipe.method_name != "dinov2":  # pragma: no cover - config validation allows only dinov2
        raise ValueError(f"method {recipe.method_name!r} is not available")
    name_is_zoo = _is_zoo_name(m.name)
    if not name_is_zoo and not Path(m.name).exists():
        create_model(m.name)  # raises "unknown model ... did you mean ..."
    if m.weights is not None and not name_is_zoo:
        raise ValueError(f"model.name={m.name!r} is a checkpoint itself: give model.weights only "
                         "with a zoo name")
    if m.weights is not None and not meta and not Path(m.weights).exists():
        raise FileNotFoundError(f"model.weights: {m.weights} does not exist")

    # a checkpoint path is loaded even for meta=True: its file says what the architecture is
    ctx = torch.device("meta") if meta and name_is_zoo else torch.device("cpu")
    with ctx:
        if name_is_zoo:
            backbone = create_model(m.name, random_init=True, device=ctx, **m.arch)
        else:
            backbone = create_model(m.name, checkpoint_key=m.checkpoint_key, **m.arch)
        method = DINOv2(backbone, recipe.method)
    report = None
    source = m.weights if m.weights is not None else (None if name_is_zoo else m.name)
    if source is not None and not meta:
        from .models.checkpoints import read_checkpoint

        report = method.load_pretrained(read_checkpoint(source, checkpoint_key=m.checkpoint_key))
    return method, report


def _check_source(spec: Any) -> None:
    """A clear error for training data that is not there (before any worker starts)."""
    from .data.sources import URL_SCHEME, expand_shards, is_shard_spec

    if spec is None:
        raise ValueError(
            "data.train is not set: pass the training images, e.g. `vssl pretrain CONFIG "
            "data.train=/path/to/images` (an image folder, a .txt list, a parquet manifest, or "
            "shards such as data.train=shards/{000000..000099}.tar)")
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    for s in specs:
        s = str(s)
        if URL_SCHEME.match(s) and not s.startswith("file:"):
            continue  # remote shards: the stream reports what it cannot open
        if is_shard_spec(s):
            missing = [p for p in expand_shards(s) if not URL_SCHEME.match(p) and not Path(p).exists()]
            if missing:
                raise FileNotFoundError(
                    f"data.train: {len(missing)} shard(s) of {s!r} do not exist, e.g. {missing[0]}")
        elif not Path(s).exists():
            raise FileNotFoundError(f"data.train: {s} does not exist (give an image folder, a "
                                    ".txt list, a parquet manifest or tar shards)")


def build_data(recipe, *, patch_size: int | None, device: Any = "cpu", rank: int | None = None,
               world_size: int | None = None):
    """:class:`TrainData` for ``recipe`` (iBOT masks on the ``patch_size`` grid when iBOT is on)."""
    from .train.data import TrainData

    d, mcfg, t = recipe.data, recipe.method, recipe.train
    _check_source(d.train)
    source = d.train if not isinstance(d.train, list) else [str(x) for x in d.train]
    ibot = getattr(mcfg, "ibot_loss_weight", 0) > 0
    kwargs = {} if d.photometric else {"photometric": None}
    return TrainData(
        source, batch_size=t.batch_size_per_rank, global_size=d.global_size,
        local_size=d.local_size, n_local=d.n_local, global_scale=d.global_scale,
        local_scale=d.local_scale, patch_size=patch_size if ibot else None,
        mask_probability=getattr(mcfg, "mask_probability", 0.5),
        mask_ratio=tuple(getattr(mcfg, "mask_ratio", (0.1, 0.5))), seed=t.seed,
        num_workers=d.num_workers, device=device, rank=rank, world_size=world_size,
        batches_per_epoch=d.batches_per_epoch, epoch_len=d.epoch_len,
        shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, **kwargs)


def build_monitor(recipe, *, num_workers: int | None = None):
    """The kNN monitor of ``recipe.eval`` (None when eval.train/eval.test are not set)."""
    e = recipe.eval
    if not e.enabled:
        return None
    from .evaluate.monitor import KNNMonitor

    for split in ("train", "test"):
        path = getattr(e, split)
        if not Path(path).exists():
            raise FileNotFoundError(f"eval.{split}: {path} does not exist (labelled images: "
                                    "class subfolders or a 'path<TAB>label' list)")
    monitor = KNNMonitor(e.train, e.test, e.every_n_steps, k=e.k, temperature=e.temperature,
                         resolution=e.resolution, max_per_split=e.max_per_split,
                         batch_size=e.batch_size, num_workers=num_workers)
    monitor.name = "knn"
    return monitor


# ------------------------------------------------------------------------------------ schedules
def _schedules(train_cfg, iters_per_epoch: int, world_size: int):
    """The trainer's own per-step schedules for a config (its formulas, not a copy of them)."""
    from .train.loop import Trainer

    ns = types.SimpleNamespace(cfg=train_cfg, iters_per_epoch=iters_per_epoch,
                               total_steps=train_cfg.epochs * iters_per_epoch,
                               world_size=world_size)
    ns.lr_peak = Trainer.lr_peak.fget(ns)
    return Trainer.schedules(ns), ns.lr_peak, ns.total_steps


def schedule_summary(train_cfg, iters_per_epoch: int, world_size: int = 1) -> list[str]:
    """Lines describing the per-step schedules (lr, wd, momentum, teacher temperature, freeze)."""
    s, peak, total = _schedules(train_cfg, iters_per_epoch, world_size)
    batch = train_cfg.batch_size_per_rank * world_size
    warm = int(round(train_cfg.warmup_epochs * iters_per_epoch))
    tt = int(round(train_cfg.warmup_teacher_temp_epochs * iters_per_epoch))
    stop = total if train_cfg.max_steps is None else min(total, train_cfg.max_steps)
    lines = [
        f"schedule: {total:,} steps = {train_cfg.epochs} epochs x {iters_per_epoch:,} iterations; "
        f"{batch:,} images/step ({train_cfg.batch_size_per_rank}/rank x {world_size} rank"
        f"{'s' if world_size > 1 else ''})",
        f"  lr          0 -> {peak:.3g} at step {warm:,} (base_lr {train_cfg.base_lr:g} x "
        f"sqrt({batch}/1024)), cosine to {train_cfg.min_lr:g}",
        f"  weight decay {train_cfg.weight_decay:g} -> {train_cfg.weight_decay_end:g} (cosine)",
        f"  teacher EMA  {train_cfg.momentum_teacher:g} -> {train_cfg.final_momentum_teacher:g} "
        "(cosine)",
        f"  teacher temp {train_cfg.warmup_teacher_temp:g} -> {train_cfg.teacher_temp:g} over "
        f"{tt:,} steps (linear), then constant",
        f"  prototypes frozen for the first {s.freeze_iters:,} steps",
    ]
    if stop < total:
        lines.append(f"  max_steps stops the run at step {stop:,}")
    if train_cfg.time_budget_s is not None:
        lines.append(f"  time budget {train_cfg.time_budget_s:g} s per invocation")
    points = sorted({0, min(warm, total - 1), total // 4, total // 2, 3 * total // 4, total - 1})
    lines.append(f"  {'step':>10} {'lr':>10} {'wd':>8} {'momentum':>9} {'teacher_T':>9}")
    for p in points:
        lines.append(f"  {p:>10,} {s.lr[p]:>10.3g} {s.wd[p]:>8.4f} {s.momentum[p]:>9.5f} "
                     f"{s.teacher_temp[p]:>9.4f}")
    return lines


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _param_lines(method) -> list[str]:
    lines = ["parameters:"]
    for name, mod in method.student.items():
        lines.append(f"  student.{name:<10} {_count(mod):>16,}")
    trainable = sum(p.numel() for p in method.student.parameters() if p.requires_grad)
    lines.append(f"  trainable (student)  {trainable:>16,}")
    lines.append(f"  teacher (EMA copy)   {_count(method.teacher):>16,}")
    return lines


# ------------------------------------------------------------------------------------ pretrain
def _write_config(recipe, out_dir: Path) -> None:
    """Save the resolved recipe; warn when it differs from the one a resumed run was started with."""
    import yaml

    from .train.config import recipe_to_yaml, save_recipe

    path = out_dir / "config.yaml"
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            old = {}
        new = yaml.safe_load(recipe_to_yaml(recipe))
        budget_keys = {"max_steps", "time_budget_s", "log_every", "checkpoint_every"}
        changed = [f"{sec}.{k}" for sec, body in new.items() if isinstance(body, dict)
                   for k, v in body.items()
                   if not (sec == "train" and k in budget_keys)
                   and (old.get(sec) or {}).get(k, v) != v]
        if changed:
            print(f"warning: {path} (an earlier run) differs in {', '.join(changed)}; a resumed "
                  "run continues with the new values", file=sys.stderr, flush=True)
    save_recipe(recipe, path)


def _export_teacher(method, out_dir: Path, strategy: str, is_main: bool) -> Path | None:
    """The teacher backbone as vssl safetensors (gathered from the shards under FSDP2)."""
    from .models.checkpoints import save_vssl

    backbone = method.teacher["backbone"]
    if strategy == "fsdp2":
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from .models.vit import VisionTransformer

        sd = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if not is_main:
            return None
        with torch.device("meta"):
            plain = VisionTransformer(backbone.config)
        plain.load_state_dict(sd, assign=True)
        backbone = plain
    if not is_main:
        return None
    return save_vssl(backbone, out_dir / "teacher_backbone.safetensors")


def run_pretrain(recipe, *, dry_run: bool = False, progress: bool = True,
                 world_size: int | None = None) -> dict:
    """Build everything ``recipe`` describes and train (or, with ``dry_run``, only describe)."""
    import torch

    from .train.config import recipe_to_yaml

    if dry_run:
        ws = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
        print(recipe_to_yaml(recipe), end="")
        method, _ = build_method(recipe, meta=True)
        print("\n".join(_param_lines(method)))
        ipe = recipe.train.iters_per_epoch
        data_note = None
        if ipe is None:
            try:
                data = build_data(recipe, patch_size=_patch_size(method), rank=0, world_size=ws)
                ipe = data.batches_per_epoch
                data_note = f"data: {data!r}"
            except (ValueError, FileNotFoundError) as e:
                data_note = f"data: not read ({e}); assuming 1000 iterations per epoch below"
                ipe = 1000
        if data_note:
            print(data_note)
        print("\n".join(schedule_summary(recipe.train, ipe, ws)))
        if recipe.eval.enabled:
            print(f"kNN monitor: every {recipe.eval.every_n_steps} steps, k={recipe.eval.k}, "
                  f"{recipe.eval.train} -> {recipe.eval.test}")
        return {"dry_run": True, "iters_per_epoch": ipe}

    from .train import distributed as tdist
    from .train.loop import Trainer

    info = tdist.setup()
    main = info.is_main
    trainer = method = None
    try:
        torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
        method, report = build_method(recipe)
        backbone = method.student["backbone"]
        data = build_data(recipe, patch_size=_patch_size(method), device=info.device,
                          rank=info.rank, world_size=info.world_size)
        monitor = build_monitor(recipe) if main or recipe.train.strategy == "fsdp2" else None
        out_dir = Path(recipe.train.output_dir)
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_config(recipe, out_dir)
            _say(f"vssl pretrain: {recipe.model.name} ({_count(backbone):,} backbone "
                 f"parameters), {recipe.method_name}, {data!r}")
            if report is not None:
                loaded = [k for k in ("backbone", "dino_head", "ibot_head") if report.get(k)]
                _say(f"initialized from {report['source']}: {', '.join(loaded)}")
            _say(f"run folder: {out_dir}")
        trainer = Trainer(method, data, recipe.train, monitors=[monitor] if monitor else [],
                          progress=progress)
        summary = trainer.fit()
        strategy = trainer.strategy
        del trainer
        trainer = None
        exported = _export_teacher(method, out_dir, strategy, main)
        if exported is not None:
            summary["teacher_backbone"] = str(exported)
        if main:
            from .viz.report import read_metrics, training_report, write_page

            rows = read_metrics(summary["metrics"]) if Path(summary["metrics"]).exists() else []
            summary["report"] = str(write_page(out_dir / "report.html", training_report(
                rows, title=f"vssl pretrain: {recipe.model.name} ({out_dir.name})")))
            if summary.get("resumed_from"):
                _say(f"resumed from {summary['resumed_from']}")
            _say(f"stopped: {summary['stopped']} at step {summary['step']:,} of "
                 f"{summary['total_steps']:,} ({summary['seconds']:.1f} s, "
                 f"{summary['images_per_s']:.1f} images/s)")
            _say(f"metrics: {summary['metrics']} (curves: {summary['report']})\n"
                 f"checkpoint: {summary['checkpoint']}")
            if exported is not None:
                _say(f"teacher backbone: {exported}")
        return summary
    finally:
        del trainer, method
        tdist.teardown(None)


def _patch_size(method) -> int:
    return method.student["backbone"].config.patch_size


def _pretrain_cmd(args) -> int:
    from .methods.dinov2 import DINOv2  # noqa: F401 - import errors surface before training
    from .train.config import load_recipe
    from .train.loop import NonFiniteLossError

    recipe = load_recipe(args.config, args.overrides)
    try:
        run_pretrain(recipe, dry_run=args.dry_run, progress=not args.no_progress,
                     world_size=args.world_size)
    except NonFiniteLossError as e:
        print(f"vssl pretrain: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """Lets ``KEY=VALUE`` overrides come before and after flags (``pretrain CFG --dry-run
    train.epochs=3``): plain argparse stops collecting positionals at the first flag."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False


def _intermixed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.__class__ = _IntermixedParser  # the subparser object the main parser dispatches to
    return parser


_PRETRAIN_EPILOG = """\
examples:
  vssl pretrain cpu_tiny32 data.train=../shared/data/cifar10-subset/train
  vssl pretrain configs/webdino_vitl14.yaml data.train=shards/{000000..000099}.tar
  vssl pretrain configs/dinov2_vitb14.yaml data.train=imagenet/train \\
      model.weights=dinov2_vitb14_pretrain.pth train.base_lr=1e-4     # continue from weights
  torchrun --nproc-per-node 8 -m vssl pretrain configs/dinov2_vitl14.yaml data.train=...
  vssl pretrain configs/webdino_7b.yaml --dry-run --world-size 512    # what would run

Overrides are SECTION.KEY=VALUE with YAML values (sections: model, data, method, train, eval).
The run folder (train.output_dir) gets config.yaml, metrics.jsonl, ckpt/step_N/ and
teacher_backbone.safetensors; running again on the same folder resumes from its last checkpoint.
"""


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl pretrain``."""
    p = subparsers.add_parser(
        "pretrain", help="self-supervised pretraining from a YAML recipe (DINOv2 / Web-DINO)",
        description="Pretrain a ViT with a recipe: data (folders, lists, parquet, shards), "
                    "method (DINOv2: DINO + iBOT + KoLeo, EMA teacher), trainer (AdamW, cosine "
                    "schedules, DDP/FSDP2 under torchrun, exact resume), optional kNN monitor.",
        epilog=_PRETRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="recipe YAML file, or a shipped recipe name (e.g. cpu_tiny32, "
                                  "webdino_vitl14)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="recipe overrides, e.g. train.epochs=10 data.train=/data/images")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, parameter counts and the schedules; no training")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: show the schedules for N ranks (default: WORLD_SIZE or 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain_cmd)
    return _intermixed(p)


# ---------------------------------------------------------------------------------- quickstart
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
#: Files a quickstart writes into its folder; a rerun on the same folder replaces exactly these.
_QUICKSTART_FILES = ("ckpt", "metrics.jsonl", "config.yaml", "report.html", "quickstart.json",
                     "teacher_backbone.safetensors", "train.txt", "test.txt")


class _QuickstartData:
    """Where the quickstart's images come from: pretraining source, kNN splits, a description."""

    def __init__(self, train: str, knn_train: str | None, knn_test: str | None, note: str,
                 pca_images: list[Path]):
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
        out += [v[rank] for _, v in sorted(by_class.items(), key=lambda kv: str(kv[0]))
                if rank < len(v)]
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
        note = (f"generated toy shapes: {len(CLASSES)} classes, 300 train + 50 test images per "
                f"class, 32 px ({root}{f', made in {took:.0f} s' if took > 1 else ', cached'})")
        test = _images(list_inputs(root / "test"))
        return _QuickstartData(str(root / "train"), str(root / "train"), str(root / "test"),
                               note, _one_per_class(test, n_pca))
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder of images")
    for test_name in ("test", "val"):
        if (root / "train").is_dir() and (root / test_name).is_dir():
            train_items = _images(list_inputs(root / "train"))
            test_items = _images(list_inputs(root / test_name))
            labelled = bool(train_items) and all(l is not None for _, l in train_items + test_items)
            note = f"{root}: train/ ({len(train_items)} images) and {test_name}/ ({len(test_items)})"
            return _QuickstartData(str(root / "train"), str(root / "train") if labelled else None,
                                   str(root / test_name) if labelled else None, note,
                                   _one_per_class(test_items, n_pca))
    items = _images(list_inputs(root))
    if not items:
        raise FileNotFoundError(f"--data {data}: no images found (jpg, png, webp, ...)")
    classes = sorted({lab for _, lab in items if lab is not None})
    if len(classes) < 2 or any(lab is None for _, lab in items):
        note = (f"{root}: {len(items)} images without class subfolders: pretraining only, no kNN "
                "evaluation (put images in <class>/ subfolders to get one)")
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
    note = (f"{root}: {len(classes)} classes, split 80/20 per class into {len(train)} train and "
            f"{len(test)} test images (train.txt / test.txt)")
    return _QuickstartData(str(out / "train.txt"), str(out / "train.txt"), str(out / "test.txt"),
                           note, _one_per_class(test, n_pca))


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
    feats = {s: ((monitor.images[s].float() / 255.0 - mean) / std).flatten(1)
             for s in ("train", "test")}
    r = knn_classify(feats["train"], monitor.labels["train"], feats["test"],
                     monitor.labels["test"], ks=(k,), temperature=monitor.temperature,
                     num_classes=len(monitor.classes))
    return r.top1[r.ks[0]]


def _endless(data_obj):
    """The loader's batches epoch after epoch (a small folder may hold fewer batches than the
    probe takes); closing this closes the epoch's loader too."""
    for epoch in itertools.count():
        yield from data_obj.batches(epoch)


def _time_step(method, batches, n: int = 4) -> float:
    """Seconds of one whole training step, measured on a copy of ``method`` so the run itself is
    untouched: forward, backward, an AdamW step and the EMA update, on batches drawn from the
    run's own loader (so its workers compete for the cores as they will). The median of the
    ``n - 1`` steps after the first (which pays for warm-up)."""
    from .train.optim import build_optimizer

    probe = copy.deepcopy(method).train()
    # the trainer's AdamW implementation (foreach on CPU); lr 0 leaves the probe's weights as they are
    opt = build_optimizer([{"params": [p for p in probe.student.parameters() if p.requires_grad]}])
    times = []
    for _ in range(n):
        batch = next(batches)
        t = time.perf_counter()
        out = probe(batch, teacher_temp=0.04)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.update_teacher(0.99)
        times.append(time.perf_counter() - t)
    del probe, opt
    return statistics.median(times[1:])


def _rescale_schedule(train_cfg, steps: int):
    """The recipe's schedule compressed into ``steps`` optimizer steps (one step per "epoch"),
    so warm-ups, the prototype freeze and the cosine decay all happen within the budget."""
    import dataclasses

    f = steps / train_cfg.epochs
    return dataclasses.replace(
        train_cfg, epochs=steps, iters_per_epoch=1,
        warmup_epochs=train_cfg.warmup_epochs * f,
        warmup_teacher_temp_epochs=train_cfg.warmup_teacher_temp_epochs * f,
        freeze_last_layer_epochs=train_cfg.freeze_last_layer_epochs * f,
        log_every=max(1, min(train_cfg.log_every, steps // 50 or 1)), max_steps=None,
        checkpoint_every=None)


def _clear_quickstart(out: Path) -> None:
    """Remove a previous quickstart's files from ``out`` (a new run must not resume an old one);
    a folder with anything else in it is refused."""
    import shutil

    if not out.exists():
        return
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    foreign = [p.name for p in entries if p.name not in _QUICKSTART_FILES]
    if foreign:
        raise ValueError(f"--output {out} already holds other files ({', '.join(sorted(foreign)[:5])}"
                         "): choose an empty or new folder")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_quickstart(data: str | None = None, output: str | os.PathLike = "vssl-quickstart",
                   minutes: float = 5.0, overrides: Sequence[str] = (), *, seed: int = 0,
                   progress: bool = True, n_pca: int = 8, knn_images: int = 1000,
                   k: int = 20) -> dict:
    """Pretrain the CPU recipe within ``minutes`` (everything included), evaluate and report.

    Data: the generated toy shapes (default), or ``data``: a folder with ``train/`` and
    ``test/``/``val/``, or class subfolders (split 80/20), or unlabelled images (no kNN). kNN
    (k=20, DINOv2's weighted vote, the same ``knn_images``-per-split class-balanced subset) is
    measured for the trained teacher backbone, the same architecture at its random
    initialization (the run's own starting point) and raw pixels. Writes ``report.html`` (loss
    and kNN curves, the three numbers, PCA maps of patch features) and ``quickstart.json`` into
    ``output``; returns the summary.
    """
    import dataclasses

    import numpy as np
    import torch

    from .data.listing import list_inputs
    from .train.config import load_recipe, save_recipe
    from .train.loop import Trainer
    from .viz.pca import pca_maps
    from .viz.report import image_table, read_metrics, table, training_report, write_page

    t0 = time.perf_counter()
    budget = float(minutes) * 60.0
    if not budget > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    out = Path(output).expanduser()
    _clear_quickstart(out)
    out.mkdir(parents=True, exist_ok=True)
    src = _quickstart_data(data, out, seed, n_pca)
    _say(f"vssl quickstart: {src.note}")

    recipe = load_recipe(QUICKSTART_RECIPE, overrides)
    recipe.data.train = src.train
    recipe.train = dataclasses.replace(recipe.train, output_dir=str(out), seed=seed)
    if recipe.data.num_workers > 1:  # 2 CPU cores: one loader worker beside the training
        recipe.data.num_workers = 1

    torch.manual_seed(seed)
    method, _ = build_method(recipe)
    teacher = method.teacher["backbone"]
    initial = copy.deepcopy(teacher).eval()  # the random-init baseline: this run's start
    n_train = len(_images(list_inputs(src.train)))
    if n_train < recipe.train.batch_size_per_rank:
        _say(f"only {n_train} training images: batch size {n_train} instead of "
             f"{recipe.train.batch_size_per_rank}")
        recipe.train = dataclasses.replace(recipe.train, batch_size_per_rank=max(1, n_train))
    data_obj = build_data(recipe, patch_size=_patch_size(method), device="cpu")

    monitor = None
    knn: dict[str, float] = {}
    t_eval = 0.0
    if src.labelled:
        from .evaluate.monitor import KNNMonitor

        monitor = KNNMonitor(src.knn_train, src.knn_test, every_n_steps=1, k=k,
                             max_per_split=knn_images, num_workers=0, seed=seed)
        t = time.perf_counter()
        monitor.prepare(initial.config.img_size)  # decode once; each evaluation is then forwards
        random_init = monitor.run(initial)
        t_eval = random_init["seconds"]
        knn["random_init"] = random_init["knn_top1"]
        knn["raw_pixels"] = _pixel_knn(monitor, k)
        _say(f"kNN (k={k}) before training: random init {knn['random_init']:.3f}, raw pixels "
             f"{knn['raw_pixels']:.3f} ({len(monitor.labels['train'])} train / "
             f"{len(monitor.labels['test'])} test images, {time.perf_counter() - t:.1f} s)")

    # plan the run so that training, evaluations and the report fit the budget
    batches = _endless(data_obj)
    # + logging and the kNN evaluations' disturbance: real steps took 1.06x and 1.11x the probe
    # in two 20-minute CIFAR runs (a run cut by the time budget ends only its last few steps early)
    t_step = _time_step(method, batches) * 1.08
    batches.close()  # stops its loader workers now
    del batches
    n_evals = 3 if monitor is not None else 0
    # evaluations during and after training, the report, and 10 s for what the command spends
    # outside this function (importing torch, exiting: 5 s more than t0 saw in `time vssl quickstart`)
    reserve = t_eval * (n_evals + 1) + 15.0
    train_seconds = budget - (time.perf_counter() - t0) - reserve
    steps = max(1, int(train_seconds / t_step))
    every = max(1, math.ceil(steps / n_evals)) if n_evals else None
    if monitor is not None:
        monitor.every_n_steps = every
    recipe.train = dataclasses.replace(_rescale_schedule(recipe.train, steps),
                                       time_budget_s=max(train_seconds + t_eval * n_evals, 1.0))
    save_recipe(recipe, out / "config.yaml")
    _say(f"plan: {steps} steps of {recipe.train.batch_size_per_rank} images (~{t_step:.2f} s "
         f"each) in {max(train_seconds, 0):.0f} s of a {budget:.0f} s budget")

    monitors = [_FirstResult(monitor, random_init)] if monitor is not None else []
    trainer = Trainer(method, data_obj, recipe.train, monitors=monitors, progress=progress)
    summary = trainer.fit()
    del trainer

    if monitor is not None:
        last = monitors[0].last
        trained = last[1] if last is not None and last[0] == summary["step"] else \
            monitor.run(teacher)
        knn["trained"] = trained["knn_top1"]
        if last is None or last[0] != summary["step"]:  # put the final point on the curve
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": summary["step"], "knn_top1": trained["knn_top1"],
                                    "knn_top5": trained.get("knn_top5")}) + "\n")

    # the report
    rows = read_metrics(out / "metrics.jsonl")
    extra = []
    if knn:
        extra.append((f"kNN top-1 (k={k}, same images, same evaluator)", table(
            ["features", "kNN top-1"],
            [["pretrained teacher backbone", f"{knn['trained']:.3f}"],
             ["same architecture, random init", f"{knn['random_init']:.3f}"],
             ["raw pixels", f"{knn['raw_pixels']:.3f}"]]) +
            f'<p class="note">{len(monitor.labels["train"])} train / '
            f'{len(monitor.labels["test"])} test images, DINOv2\'s weighted vote '
            f'(T={monitor.temperature}) on L2-normalized CLS tokens.</p>'))
    else:
        extra.append(("kNN", '<p class="note">skipped: the images have no class labels (put '
                             'them in &lt;class&gt;/ subfolders to get a kNN evaluation)</p>'))
    if src.pca_images:
        from PIL import Image

        from .data.decode import open_image
        from .data.transforms import EvalTransform

        res = teacher.config.img_size
        tf = EvalTransform(res, resize_ratio=1.0)
        crops = [np.asarray(tf.crop(tf.resize(open_image(p)))) for p in src.pca_images]
        maps_trained = pca_maps(teacher, src.pca_images)
        maps_random = pca_maps(initial, src.pca_images)
        cols = [Path(p).parent.name if src.labelled else Path(p).stem for p in src.pca_images]
        extra.append(("PCA of patch features", image_table(
            cols, [("image", crops), ("pretrained", maps_trained), ("random init", maps_random)],
            scale=max(1, 96 // res)) + '<p class="note">First three principal components of the '
            'patch tokens of these images (fitted jointly) as red, green, blue; parts the model '
            'represents alike share a colour (DINOv2\'s visualization).</p>'))
    elapsed = time.perf_counter() - t0
    intro = (f'<p>{src.note}.<br>Recipe <code>{QUICKSTART_RECIPE}</code>: '
             f'{recipe.model.name} ({_count(teacher):,} parameters), {summary["step"]} steps of '
             f'{recipe.train.batch_size_per_rank} images in {summary["seconds"]:.0f} s '
             f'({summary["images_per_s"]:.1f} images/s); {elapsed:.0f} s in all, stopped: '
             f'{summary["stopped"]}.</p>')
    baselines = {"random init": knn["random_init"], "raw pixels": knn["raw_pixels"]} if knn \
        else None
    page = training_report(rows, title="vssl quickstart", intro=intro, extra_sections=extra,
                           knn_baselines=baselines)
    report = write_page(out / "report.html", page)
    result = {
        "data": src.note, "output": str(out), "report": str(report), "steps": summary["step"],
        "stopped": summary["stopped"], "train_seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"], "seconds": time.perf_counter() - t0,
        "budget_seconds": budget, "knn_k": k if knn else None,
        "knn_top1": knn or None, "checkpoint": summary["checkpoint"],
    }
    (out / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if knn:
        _say(f"kNN top-1 (k={k}): trained {knn['trained']:.3f} | random init "
             f"{knn['random_init']:.3f} | raw pixels {knn['raw_pixels']:.3f}")
    _say(f"report: {report} ({result['seconds']:.0f} s)")
    return result


def _quickstart_cmd(args) -> int:
    run_quickstart(args.data, args.output, args.minutes, args.overrides, seed=args.seed,
                   progress=not args.no_progress)
    return 0


def add_quickstart_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl quickstart``."""
    p = subparsers.add_parser(
        "quickstart", help="pretrain a small ViT in minutes on CPU and see what it learned",
        description="Pretrain the CPU recipe (cpu_tiny32: DINOv2 on 32-px images) on a generated "
                    "toy dataset of shapes (no download) or on --data, within --minutes on CPU; "
                    "then compare kNN accuracy (k=20) of the trained model, the same model at "
                    "random init, and raw pixels, and write report.html with loss and kNN curves "
                    "and PCA maps of patch features.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  vssl quickstart\n  vssl quickstart --minutes 2 --output qs/\n"
               "  vssl quickstart --data photos/ --minutes 10      # class subfolders -> kNN\n"
               "  vssl quickstart train.batch_size_per_rank=32     # recipe overrides")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="overrides of the cpu_tiny32 recipe")
    p.add_argument("--data", metavar="FOLDER",
                   help="images to use instead of the toy shapes: train/ + test/ (or val/), class "
                        "subfolders (split 80/20), or plain images (no kNN)")
    p.add_argument("--output", default="vssl-quickstart", metavar="DIR",
                   help="run folder (default: ./vssl-quickstart; a previous quickstart there is "
                        "replaced)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="wall-clock budget for everything (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_quickstart_cmd)
    return _intermixed(p)
