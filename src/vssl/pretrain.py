"""``vssl pretrain``: a recipe -> data, method, monitor, trainer.

``vssl pretrain CONFIG [key=value ...]`` is glue only: the recipe (:mod:`vssl.train.config`) says
what to build, the method (``method.name`` from :mod:`vssl.methods`' registry) computes the losses
and declares its views, :class:`~vssl.train.data.TrainData` makes those batches, the optional
:class:`~vssl.evaluate.monitor.KNNMonitor` measures ``method.encoder()``, and
:class:`~vssl.train.loop.Trainer` owns the loop, devices and checkpoints. Under ``torchrun`` every
process runs this same code; the trainer's distributed setup finds the process group. The run
folder gets the resolved ``config.yaml``, ``metrics.jsonl``, ``ckpt/step_N/``, ``report.html``
(curves) and ``backbone.safetensors`` (the method's encoder in vssl's format: ``vssl embed
RUN/backbone.safetensors ...`` uses it). ``vssl quickstart`` lives in :mod:`vssl.quickstart`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "BACKBONE_FILE",
    "add_pretrain_parser",
    "build_data",
    "build_method",
    "build_monitor",
    "export_encoder",
    "run_pretrain",
    "schedule_summary",
]


def _say(*args, main: bool = True, **kw) -> None:
    if main:
        print(*args, **kw, flush=True)


# ------------------------------------------------------------------------------------- building
def _is_zoo_name(name: str) -> bool:
    from .models.zoo import _ZOO

    return name in _ZOO


def build_method(recipe, *, meta: bool = False):
    """The recipe's method (``method.name``, from the registry) around its backbone;
    ``(method, load_report or None)``.

    ``model.weights`` (or a checkpoint path as ``model.name``) initializes the method from released
    weights (``method.load_pretrained``: DINOv2 reads its heads, MAE its decoder, when the file
    carries them). ``meta=True`` builds shapes only (parameter counts of a 7B recipe without
    allocating it).
    """
    import torch

    from .methods.base import get_method
    from .models.zoo import create_model

    m = recipe.model
    method_cls = get_method(recipe.method_name)
    name_is_zoo = _is_zoo_name(m.name)
    if not name_is_zoo and not Path(m.name).exists():
        create_model(m.name)  # raises "unknown model ... did you mean ..."
    if m.weights is not None and not name_is_zoo:
        raise ValueError(
            f"model.name={m.name!r} is a checkpoint itself: give model.weights only with a zoo name"
        )
    if m.weights is not None and not meta and not Path(m.weights).exists():
        raise FileNotFoundError(f"model.weights: {m.weights} does not exist")

    # a checkpoint path is loaded even for meta=True: its file says what the architecture is
    ctx = torch.device("meta") if meta and name_is_zoo else torch.device("cpu")
    with ctx:
        if name_is_zoo:
            backbone = create_model(m.name, random_init=True, device=ctx, **m.arch)
        else:
            backbone = create_model(m.name, checkpoint_key=m.checkpoint_key, **m.arch)
        method = method_cls(backbone, recipe.method)
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
            "shards such as data.train=shards/{000000..000099}.tar)"
        )
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    for s in specs:
        s = str(s)
        if URL_SCHEME.match(s) and not s.startswith("file:"):
            continue  # remote shards: the stream reports what it cannot open
        if is_shard_spec(s):
            missing = [
                p for p in expand_shards(s) if not URL_SCHEME.match(p) and not Path(p).exists()
            ]
            if missing:
                raise FileNotFoundError(
                    f"data.train: {len(missing)} shard(s) of {s!r} do not exist, e.g. {missing[0]}"
                )
        elif not Path(s).exists():
            raise FileNotFoundError(
                f"data.train: {s} does not exist (give an image folder, a "
                ".txt list, a parquet manifest or tar shards)"
            )


def build_data(
    recipe, views, *, device: Any = "cpu", rank: int | None = None, world_size: int | None = None
):
    """:class:`TrainData` for ``recipe`` making the ``views`` the method declares
    (``method.views()``: a :class:`~vssl.data.views.ViewSpec`)."""
    from .train.data import TrainData

    d, t = recipe.data, recipe.train
    _check_source(d.train)
    source = d.train if not isinstance(d.train, list) else [str(x) for x in d.train]
    if d.photometric:  # DINOv2's per-group recipe with the recipe's colour settings
        from .data.augment import MultiCropPhotometric

        groups = {
            k: v for k, v in (("blur_p", d.blur_p), ("solarize_p", d.solarize_p)) if v is not None
        }
        photometric = MultiCropPhotometric(
            jitter=tuple(d.color_jitter),
            jitter_p=d.color_jitter_p,
            grayscale_p=d.grayscale_p,
            **groups,
        )
    else:
        photometric = None
    return TrainData(
        source,
        batch_size=t.batch_size_per_rank,
        global_size=d.global_size,
        local_size=d.local_size,
        n_local=d.n_local,
        global_scale=d.global_scale,
        local_scale=d.local_scale,
        views=views,
        seed=t.seed,
        num_workers=d.num_workers,
        device=device,
        rank=rank,
        world_size=world_size,
        batches_per_epoch=d.batches_per_epoch,
        epoch_len=d.epoch_len,
        shuffle_buffer=d.shuffle_buffer,
        resampled=d.resampled,
        captions=d.captions,
        photometric=photometric,
    )


def build_monitor(recipe, *, num_workers: int | None = None):
    """The kNN monitor of ``recipe.eval`` (None when eval.train/eval.test are not set)."""
    e = recipe.eval
    if not e.enabled:
        return None
    from .evaluate.monitor import KNNMonitor

    for split in ("train", "test"):
        path = getattr(e, split)
        if not Path(path).exists():
            raise FileNotFoundError(
                f"eval.{split}: {path} does not exist (labelled images: "
                "class subfolders or a 'path<TAB>label' list)"
            )
    monitor = KNNMonitor(
        e.train,
        e.test,
        e.every_n_steps,
        k=e.k,
        temperature=e.temperature,
        resolution=e.resolution,
        max_per_split=e.max_per_split,
        batch_size=e.batch_size,
        num_workers=num_workers,
    )
    monitor.name = "knn"
    return monitor


# ------------------------------------------------------------------------------------ schedules
def schedule_summary(
    train_cfg, iters_per_epoch: int, world_size: int = 1, method=None
) -> list[str]:
    """Lines describing the per-step schedules: the trainer's (lr, wd) and, with ``method``, the
    method's own (its ``scheduled(step)`` values, and its ``schedule_lines()`` when it has them)."""
    from .methods.base import StepPlan
    from .train.loop import peak_lr, train_schedules

    s = train_schedules(train_cfg, iters_per_epoch, world_size)
    peak = peak_lr(train_cfg, world_size)
    total = train_cfg.epochs * iters_per_epoch
    batch = train_cfg.batch_size_per_rank * world_size
    warm = int(round(train_cfg.warmup_epochs * iters_per_epoch))
    stop = total if train_cfg.max_steps is None else min(total, train_cfg.max_steps)
    rule = {
        "sqrt": f"x sqrt({batch}/{train_cfg.lr_base_batch})",
        "linear": f"x {batch}/{train_cfg.lr_base_batch}",
        "none": "unscaled",
    }
    lines = [
        f"schedule: {total:,} steps = {train_cfg.epochs} epochs x {iters_per_epoch:,} iterations; "
        f"{batch:,} images/step ({train_cfg.batch_size_per_rank}/rank x {world_size} rank"
        f"{'s' if world_size > 1 else ''})",
        f"  lr          0 -> {peak:.3g} at step {warm:,} (base_lr {train_cfg.base_lr:g} "
        f"{rule[train_cfg.lr_scaling]}), cosine to {train_cfg.min_lr:g}",
        f"  weight decay {train_cfg.weight_decay:g} -> {train_cfg.weight_decay_end:g} (cosine)",
    ]
    own: list[str] = []
    if method is not None:
        method.plan(StepPlan(total, iters_per_epoch, batch))
        if hasattr(method, "schedule_lines"):
            lines += method.schedule_lines()
        own = list(method.scheduled(0))
    if stop < total:
        lines.append(f"  max_steps stops the run at step {stop:,}")
    if train_cfg.time_budget_s is not None:
        lines.append(f"  time budget {train_cfg.time_budget_s:g} s per invocation")
    when = [f"every {train_cfg.checkpoint_every:,} steps"] if train_cfg.checkpoint_every else []
    if train_cfg.checkpoint_every_s:
        when.append(f"every {train_cfg.checkpoint_every_s:g} s of wall-clock time")
    lines.append(f"  checkpoints {', '.join(when + ['at the end and on Ctrl-C / SIGTERM'])}")
    points = sorted({0, min(warm, total - 1), total // 4, total // 2, 3 * total // 4, total - 1})
    lines.append(f"  {'step':>10} {'lr':>10} {'wd':>8}" + "".join(f" {k[:12]:>12}" for k in own))
    for p in points:
        vals = method.scheduled(p) if own else {}
        lines.append(
            f"  {p:>10,} {s.lr[p]:>10.3g} {s.wd[p]:>8.4f}"
            + "".join(f" {vals[k]:>12.5g}" for k in own)
        )
    return lines


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _param_lines(method) -> list[str]:
    lines = ["parameters:"]
    for name, mod in method.student.items():
        lines.append(f"  student.{name:<10} {_count(mod):>16,}")
    trainable = sum(p.numel() for p in method.student.parameters() if p.requires_grad)
    lines.append(f"  trainable (student)  {trainable:>16,}")
    for name, mod in method.named_children():
        if name != "student" and any(True for _ in mod.parameters()):
            lines.append(f"  {name + ' (not trained)':<20} {_count(mod):>16,}")
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
        budget_keys = {
            "max_steps",
            "time_budget_s",
            "log_every",
            "checkpoint_every",
            "checkpoint_every_s",
            "keep_checkpoints",
            "loggers",
        }
        changed = [
            f"{sec}.{k}"
            for sec, body in new.items()
            if isinstance(body, dict)
            for k, v in body.items()
            if not (sec == "train" and k in budget_keys) and (old.get(sec) or {}).get(k, v) != v
        ]
        if changed:
            print(
                f"warning: {path} (an earlier run) differs in {', '.join(changed)}; a resumed "
                "run continues with the new values",
                file=sys.stderr,
                flush=True,
            )
    save_recipe(recipe, path)


def export_encoder(method, out_dir: Path, strategy: str, is_main: bool) -> Path | None:
    """``method.encoder()`` as vssl safetensors, ``backbone.safetensors`` (gathered from the
    shards under FSDP2): what ``vssl embed``, ``vssl info`` and ``vssl convert`` read."""
    from .models.checkpoints import save_vssl

    backbone = method.encoder()
    if strategy == "fsdp2":
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from .models.vit import VisionTransformer

        sd = get_model_state_dict(
            backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not is_main:
            return None
        with torch.device("meta"):
            plain = VisionTransformer(backbone.config)
        plain.load_state_dict(sd, assign=True)
        backbone = plain
    if not is_main:
        return None
    return save_vssl(backbone, out_dir / BACKBONE_FILE)


def export_extra(method, out_dir: Path, strategy: str, is_main: bool) -> Path | None:
    """A method's own export beside the encoder (optional ``method.export(out_dir, state)``,
    e.g. CLIP's text tower), given the full state dict of ``method.student``."""
    if not hasattr(method, "export"):
        return None
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(
            method.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        sd = method.student.state_dict()
    return method.export(out_dir, sd) if is_main else None


#: The trained encoder in every run folder (runs from before the method contract wrote
#: ``teacher_backbone.safetensors``; ``models.checkpoints.run_backbone`` reads both).
BACKBONE_FILE = "backbone.safetensors"


def run_pretrain(
    recipe, *, dry_run: bool = False, progress: bool = True, world_size: int | None = None
) -> dict:
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
                data = build_data(recipe, method.views(), rank=0, world_size=ws)
                ipe = data.batches_per_epoch
                data_note = f"data: {data!r}"
            except (ValueError, FileNotFoundError) as e:
                data_note = f"data: not read ({e}); assuming 1000 iterations per epoch below"
                ipe = 1000
        if data_note:
            print(data_note)
        print("\n".join(schedule_summary(recipe.train, ipe, ws, method)))
        if recipe.eval.enabled:
            print(
                f"kNN monitor: every {recipe.eval.every_n_steps} steps, k={recipe.eval.k}, "
                f"{recipe.eval.train} -> {recipe.eval.test}"
            )
        return {"dry_run": True, "iters_per_epoch": ipe}

    from .train import distributed as tdist
    from .train.loop import Trainer, check_output_dir

    info = tdist.setup()
    main = info.is_main
    trainer = method = None
    try:
        # a read-only, missing-permission or file-in-the-way output folder: one line, now
        check_output_dir(recipe.train.output_dir, info)
        torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
        method, report = build_method(recipe)
        backbone = method.student["backbone"]
        data = build_data(
            recipe, method.views(), device=info.device, rank=info.rank, world_size=info.world_size
        )
        monitor = build_monitor(recipe) if main or recipe.train.strategy == "fsdp2" else None
        out_dir = Path(recipe.train.output_dir)
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_config(recipe, out_dir)
            _say(
                f"vssl pretrain: {recipe.model.name} ({_count(backbone):,} backbone "
                f"parameters), {recipe.method_name}, {data!r}"
            )
            if report is not None:
                loaded = [k for k in ("backbone", "dino_head", "ibot_head") if report.get(k)]
                _say(f"initialized from {report['source']}: {', '.join(loaded)}")
            _say(f"run folder: {out_dir}")
        trainer = Trainer(
            method, data, recipe.train, monitors=[monitor] if monitor else [], progress=progress
        )
        summary = trainer.fit()
        strategy = trainer.strategy
        del trainer
        trainer = None
        exported = export_encoder(method, out_dir, strategy, main)
        if exported is not None:
            summary["backbone"] = str(exported)
        extra = export_extra(method, out_dir, strategy, main)
        if extra is not None:
            summary["exported"] = str(extra)
        if main:
            from .viz.report import read_metrics, training_report, write_page

            rows = read_metrics(summary["metrics"]) if Path(summary["metrics"]).exists() else []
            summary["report"] = str(
                write_page(
                    out_dir / "report.html",
                    training_report(
                        rows, title=f"vssl pretrain: {recipe.model.name} ({out_dir.name})"
                    ),
                )
            )
            _say(
                f"stopped: {summary['stopped']} at step {summary['step']:,} of "
                f"{summary['total_steps']:,} ({summary['seconds']:.1f} s, "
                f"{summary['images_per_s']:.1f} images/s)"
            )
            _say(
                f"metrics: {summary['metrics']} (curves: {summary['report']})\n"
                f"checkpoint: {summary['checkpoint']}"
            )
            if exported is not None:
                _say(f"trained encoder: {exported} (vssl embed {exported} --input ...)")
            if summary["stopped"] == "interrupted":
                _say(
                    f"interrupted by {summary['signal']} at step {summary['step']:,}: the "
                    f"checkpoint above holds it. To resume, run the same command again on the "
                    f"same train.output_dir ({out_dir}):\n  {_resume_command()}"
                )
        return summary
    finally:
        del trainer, method
        tdist.teardown(None)


def _resume_command() -> str:
    """The command line that started this process (resuming is running it again)."""
    import shlex

    if os.environ.get("TORCHELASTIC_RUN_ID") or "LOCAL_RANK" in os.environ:
        return "the same torchrun command (every rank resumes from the checkpoint)"
    argv = sys.argv[1:]
    if argv[:1] != ["pretrain"]:  # called from Python, not the command line
        return "the same call (the same train.output_dir)"
    return shlex.join(["vssl", *argv])


#: Exit codes of a run stopped by a signal: the shell's 128 + signal number (SIGINT 130, SIGTERM 143).
def _signal_exit_code(name: str | None) -> int:
    import signal

    try:
        return 128 + int(signal.Signals[name])
    except (KeyError, TypeError):
        return 1


def _pretrain_cmd(args) -> int:
    from .train.config import load_recipe
    from .train.loop import NonFiniteLossError, TrainingAborted

    recipe = load_recipe(args.config, args.overrides)
    try:
        summary = run_pretrain(
            recipe, dry_run=args.dry_run, progress=not args.no_progress, world_size=args.world_size
        )
    except NonFiniteLossError as e:
        print(f"vssl pretrain: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    except TrainingAborted as e:
        print(
            f"vssl pretrain: {e}: stopped at once; the last checkpoint in "
            f"{recipe.train.output_dir}/ckpt holds the run (running the same command resumes it)",
            file=sys.stderr,
            flush=True,
        )
        return e.exit_code
    except KeyboardInterrupt:  # before training started, or while exporting after it
        print(
            f"vssl pretrain: interrupted; the last checkpoint in {recipe.train.output_dir}/ckpt "
            "(if any) holds the run",
            file=sys.stderr,
            flush=True,
        )
        return 130
    if summary.get("stopped") == "interrupted":
        return _signal_exit_code(summary.get("signal"))
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
  vssl pretrain cpu_mae32 data.train=../shared/data/cifar10-subset/train train.max_steps=200
  vssl pretrain configs/mae_vitb16.yaml data.train=imagenet/train          # MAE ViT-B/16
  vssl pretrain configs/webdino_vitl14.yaml data.train=shards/{000000..000099}.tar
  vssl pretrain configs/dinov2_vitb14.yaml data.train=imagenet/train \\
      model.weights=dinov2_vitb14_pretrain.pth train.base_lr=1e-4     # continue from weights
  torchrun --nproc-per-node 8 -m vssl pretrain configs/dinov2_vitl14.yaml data.train=...
  vssl pretrain configs/webdino_7b.yaml --dry-run --world-size 512    # what would run

Overrides are SECTION.KEY=VALUE with YAML values (sections: model, data, method, train, eval).
Methods: dinov2 (DINOv2 / Web-DINO), mae (MAE / Web-MAE); method.name picks one.
The run folder (train.output_dir) gets config.yaml, metrics.jsonl, ckpt/step_N/ and
backbone.safetensors (the trained encoder); running again on the same folder resumes from its
last checkpoint.
"""


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl pretrain``."""
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining from a YAML recipe (DINOv2 / Web-DINO, MAE / Web-MAE)",
        description="Pretrain a ViT with a recipe: data (folders, lists, parquet, shards), "
        "method (dinov2: DINO + iBOT + KoLeo, EMA teacher; mae: masked autoencoder "
        "on normalized pixels), trainer (AdamW, cosine "
        "schedules, DDP/FSDP2 under torchrun, exact resume), optional kNN monitor.",
        epilog=_PRETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        help="recipe YAML file, or a shipped recipe name (e.g. cpu_tiny32, webdino_vitl14)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="recipe overrides, e.g. train.epochs=10 data.train=/data/images",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved recipe, parameter counts and the schedules; no training",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="with --dry-run: show the schedules for N ranks (default: WORLD_SIZE or 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain_cmd)
    return _intermixed(p)
