"""The training loop every method shares: schedules, precision, devices, clipping, checkpoints, logs.

The trainer knows no method: it drives anything that keeps the contract of
:mod:`vssl.methods.base` (docs/architecture.md, "The method contract"):

- ``method.student``: the modules the optimizer trains (a ``ModuleDict``; the child named
  ``backbone`` gets layer-wise lr decay);
- ``method.plan(StepPlan)`` once before training; the optional ``method.prepare(data, run_dir)``
  before the first step of every start (a method that must see data first); ``method(batch, step) -> {"loss": scalar,
  <term>: detached scalar, ...}`` every step; ``method.after_step(step)`` after every optimizer
  step; ``method.scheduled(step)`` (the method's own scheduled values, logged);
  ``method.frozen_parameters()`` (held still until a step); ``method.encoder()`` (what the
  monitors evaluate).

The trainer never computes a loss. Per step ``i`` (0-based) it sets lr ``lr_schedule[i] *
lr_multiplier`` (cosine with linear warm-up from 0 to the peak ``base_lr`` scaled by the total
batch: ``sqrt(B / lr_base_batch)`` as DINOv2, ``B / lr_base_batch`` as MAE, or unscaled) and
weight decay ``wd_schedule[i] * wd_multiplier`` (cosine ``weight_decay -> weight_decay_end``);
frozen parameters get lr 0 and zeroed gradients; gradients are clipped per student sub-module (as
DINOv2 clips each of its backbone and heads to ``clip_grad``). The global torch RNG is re-seeded
from ``(seed, step, rank)`` at every step (drop-path masks), and the data are a function of
``(seed, epoch, step, rank)`` (:mod:`vssl.train.data`), so a resumed run continues exactly as an
uninterrupted one.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON line per logged step, written and flushed
as the step ends, so ``tail -f`` follows it: step, epoch, every loss term, lr, wd, the method's
scheduled values, grad_norm, images_per_s, seconds, and monitor results; optionally mirrored to
TensorBoard / Weights & Biases, ``loggers``) and ``ckpt/step_<N>/`` checkpoints
(:mod:`vssl.train.checkpoint`), written every ``checkpoint_every`` steps, every
``checkpoint_every_s`` seconds of wall-clock time (default 10 minutes), at the end, and when the
time budget, the step budget or an interrupt stops the run. The output folder is checked for
writing before anything else (one clear error for a read-only, missing-permission or file-in-the-
way path). A run started on an ``output_dir`` that holds a checkpoint resumes from the newest
intact one; newer damaged ones are skipped with a message saying why.

Interrupts: during :meth:`Trainer.fit` the first SIGINT (Ctrl-C) or SIGTERM (SLURM preemption)
lets the current step finish, writes a checkpoint and returns with ``stopped="interrupted"``
(``signal`` names it); a second one (a second later or more) raises :class:`TrainingAborted` at
once. Under torchrun every rank learns of a signal any rank received in the same step (one
all-reduce per step, shared with the time-budget and wall-clock checkpoint decisions), so all
ranks stop after the same step and write one consistent checkpoint. The previous handlers come
back when ``fit`` returns; outside the main thread no handler is installed.

A non-finite loss term (or gradient norm) stops the run with :class:`NonFiniteLossError` naming the
step and the terms, before the optimizer step and without writing a checkpoint: the last good one
stays the newest.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_write
from ..methods.base import StepPlan
from . import distributed as tdist
from .checkpoint import (
    CheckpointDamagedError,
    CheckpointError,
    checkpoint_path,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data import derive_seed
from .optim import build_optimizer, param_groups
from .schedules import CosineSchedule

__all__ = [
    "NonFiniteLossError",
    "OutputDirError",
    "TrainConfig",
    "Trainer",
    "TrainingAborted",
    "check_output_dir",
]

PRECISIONS = ("auto", "fp32", "bf16")
LOGGERS = ("tensorboard", "wandb")
LR_SCALINGS = ("sqrt", "linear", "none")
STRATEGIES = ("auto",) + tdist.STRATEGIES


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN/inf; ``step`` and ``terms`` say where."""

    def __init__(self, message: str, step: int, terms: dict[str, float]):
        super().__init__(message)
        self.step = step
        self.terms = terms


class TrainingAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during :meth:`Trainer.fit`: stopped at once, without a checkpoint
    of the current state. ``signum``; ``exit_code`` is the shell's ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"aborted by a second {signal.Signals(self.signum).name}")


class OutputDirError(ValueError, OSError):
    """``output_dir`` cannot be written (a file in the way, no permission, read-only or full
    file system); the message says which path and what to do."""


@dataclass
class TrainConfig:
    """Trainer settings; defaults are DINOv2's ViT-S/B ones (docs/architecture.md, "Recipes").

    Epochs are ``iters_per_epoch`` optimizer steps (DINOv2's ``OFFICIAL_EPOCH_LENGTH``; None: one
    pass of the data, ``len(data)``). Epoch counts for warm-ups and the freeze may be fractional.
    ``max_steps``: stop (and checkpoint) once this many steps are done in total, the schedules
    still spanning ``epochs`` (a budget, resumable). ``time_budget_s``: stop (and checkpoint) before
    this many seconds of this invocation are exceeded. ``checkpoint_every``: steps (None: only at
    the end / on a budget stop). ``checkpoint_every_s``: also checkpoint when this many seconds of
    wall-clock time passed since the last save (None: off), so a crash or a kill loses at most
    that much. ``loggers``: mirror ``metrics.jsonl`` to ``"tensorboard"`` (``output_dir/
    tensorboard``; needs the tensorboard package) and/or ``"wandb"`` (needs wandb).
    ``lr_scaling``: how the peak lr follows the total batch B:
    ``sqrt`` (``base_lr * sqrt(B / lr_base_batch)``, DINOv2 with 1024), ``linear`` (``base_lr * B
    / lr_base_batch``, MAE with 256) or ``none`` (``base_lr`` as is).
    """

    epochs: int = 100
    iters_per_epoch: int | None = 1250
    batch_size_per_rank: int = 64
    base_lr: float = 4e-3
    lr_scaling: str = "sqrt"
    lr_base_batch: int = 1024
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float | None = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    grad_checkpointing: bool = False
    strategy: str = "auto"  # auto: ddp when WORLD_SIZE > 1, else none
    find_unused_parameters: bool = False
    seed: int = 0
    checkpoint_every: int | None = None
    checkpoint_every_s: float | None = 600.0
    keep_checkpoints: int | None = 3
    max_steps: int | None = None
    time_budget_s: float | None = None
    log_every: int = 10
    output_dir: str = "runs/pretrain"
    loggers: list[str] = field(default_factory=list)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"train config {name}={getattr(self, name)!r}: {why}")

        for name in ("epochs", "batch_size_per_rank", "log_every", "lr_base_batch"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        for name in ("iters_per_epoch", "checkpoint_every", "max_steps", "keep_checkpoints"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                bad(name, "must be >= 1 or null")
        for name in ("warmup_epochs", "min_lr", "weight_decay", "weight_decay_end"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not self.base_lr > 0:
            bad("base_lr", "must be > 0")
        if not self.layer_decay > 0 or not self.patch_embed_lr_mult >= 0:
            bad("layer_decay", "layer_decay must be > 0 and patch_embed_lr_mult >= 0")
        if self.clip_grad is not None and not self.clip_grad > 0:
            bad("clip_grad", "must be > 0 or null (no clipping)")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            bad("time_budget_s", "must be > 0 or null")
        if self.checkpoint_every_s is not None and not self.checkpoint_every_s > 0:
            bad("checkpoint_every_s", "must be > 0 (seconds) or null (off)")
        if isinstance(self.loggers, str):
            self.loggers = [self.loggers]
        self.loggers = list(self.loggers or [])
        unknown = [x for x in self.loggers if x not in LOGGERS]
        if unknown:
            bad("loggers", f"unknown {unknown}; allowed: {list(LOGGERS)}")
        if self.lr_scaling not in LR_SCALINGS:
            bad("lr_scaling", f"allowed: {list(LR_SCALINGS)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"allowed: {list(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"allowed: {list(STRATEGIES)}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a mapping; an unknown key is an error that lists the allowed ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; allowed: {known}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Schedules:
    lr: CosineSchedule
    wd: CosineSchedule


def _epochs_to_iters(epochs: float, iters_per_epoch: int) -> int:
    return int(round(epochs * iters_per_epoch))


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """The peak learning rate for ``cfg`` on ``world_size`` ranks (``cfg.lr_scaling``)."""
    ratio = cfg.batch_size_per_rank * world_size / float(cfg.lr_base_batch)
    if cfg.lr_scaling == "sqrt":
        return cfg.base_lr * math.sqrt(ratio)
    if cfg.lr_scaling == "linear":
        return cfg.base_lr * ratio
    return cfg.base_lr


def train_schedules(cfg: TrainConfig, iters_per_epoch: int, world_size: int) -> _Schedules:
    """The trainer's per-step lr and weight-decay schedules for ``cfg``."""
    total = cfg.epochs * iters_per_epoch
    return _Schedules(
        lr=CosineSchedule(
            peak_lr(cfg, world_size),
            cfg.min_lr,
            total,
            warmup_iters=_epochs_to_iters(cfg.warmup_epochs, iters_per_epoch),
        ),
        wd=CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total),
    )


class Trainer:
    """Train ``method`` on ``data`` (:class:`vssl.train.data.TrainData` or anything with
    ``batch_size``, ``batches_per_epoch`` and ``batches(epoch, start_step)``) with ``cfg``.

    ``monitors``: objects with ``maybe_run(step, model) -> dict | None`` (e.g.
    :class:`vssl.evaluate.monitor.KNNMonitor`), called with ``method.encoder()`` at step 0 of a
    fresh run and after every step; their results go into ``metrics.jsonl``. They run on rank 0
    only (on every rank under FSDP2, whose weights are sharded; FSDP2 skips the step-0 evaluation
    because its root forward must come first), while the other ranks wait in the next collective:
    keep an evaluation well inside the process group's timeout. ``progress``: a tqdm bar on rank 0.
    """

    def __init__(
        self,
        method: nn.Module,
        data: Any,
        cfg: TrainConfig,
        *,
        monitors: Sequence[Any] = (),
        progress: bool = True,
    ):
        if not isinstance(getattr(method, "student", None), nn.Module):
            raise TypeError(
                f"{type(method).__name__} has no `student` module: a method exposes "
                "what the optimizer trains as `method.student` (vssl.methods.base)"
            )
        missing = [h for h in _HOOKS if not callable(getattr(method, h, None))]
        if missing:
            raise TypeError(
                f"{type(method).__name__} lacks {', '.join(missing)} of the method "
                "contract (vssl.methods.base.Method; MethodBase gives the defaults)"
            )
        self.cfg = cfg
        self.data = data
        self.monitors = list(monitors)
        self.progress = progress
        _check_loggers(cfg.loggers)
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.info = tdist.setup()
        check_output_dir(cfg.output_dir, self.info)  # one clear error before any work
        if getattr(data, "batch_size", cfg.batch_size_per_rank) != cfg.batch_size_per_rank:
            raise ValueError(
                f"the data's batch_size {data.batch_size} differs from "
                f"batch_size_per_rank {cfg.batch_size_per_rank}: set them equal"
            )
        self.device = self.info.device
        self.method = method.to(self.device)
        self.strategy = (
            cfg.strategy if cfg.strategy != "auto" else ("ddp" if self.info.distributed else "none")
        )
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        method.plan(
            StepPlan(
                self.total_steps, self.iters_per_epoch, cfg.batch_size_per_rank * self.world_size
            )
        )

        if cfg.grad_checkpointing:
            for m in method.student.modules():
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = True
        if cfg.compile:
            n_blocks = 0
            for m in method.modules():
                if isinstance(getattr(m, "blocks", None), nn.ModuleList):
                    for blk in m.blocks:
                        blk.compile()
                        n_blocks += 1
            # each block's drop-path rate is a constant to the compiler (a graph per distinct
            # rate): without room for them all, blocks past the 8th would silently stay eager
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, n_blocks + 8)
        self.model = tdist.wrap(
            method, self.strategy, self.info, find_unused_parameters=cfg.find_unused_parameters
        )
        # parameters exist in their final (possibly sharded) form only after wrapping
        self.frozen = [(list(f.params), int(f.until)) for f in method.frozen_parameters()]
        self.groups = param_groups(
            method.student,
            layer_decay=cfg.layer_decay,
            patch_embed_lr_mult=cfg.patch_embed_lr_mult,
            num_layers=_num_layers(method.student),
            frozen=self.frozen,
        )
        self.optimizer = build_optimizer(self.groups, betas=(cfg.adamw_beta1, cfg.adamw_beta2))
        self._clip_sets = _clip_sets(method.student)
        self._reserved = _RESERVED | set(method.scheduled(0))

    # -- sizes and schedules
    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def iters_per_epoch(self) -> int:
        return int(self.cfg.iters_per_epoch or self.data.batches_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    @property
    def lr_peak(self) -> float:
        """``base_lr`` scaled by the total batch (``cfg.lr_scaling``)."""
        return peak_lr(self.cfg, self.world_size)

    def schedules(self) -> _Schedules:
        return train_schedules(self.cfg, self.iters_per_epoch, self.world_size)

    # -- pieces of a step
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _apply_schedules(self, sched: _Schedules, step: int) -> tuple[float, float]:
        lr, wd = sched.lr[step], sched.wd[step]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0 if step < g["frozen_until"] else lr * g["lr_multiplier"]
            g["weight_decay"] = wd * g["wd_multiplier"]
        return lr, wd

    def _grad_norm_and_clip(self) -> torch.Tensor:
        """Total gradient norm before clipping; clips each student sub-module to ``clip_grad``."""
        squares = []
        for params in self._clip_sets:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if self.cfg.clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.clip_grad, norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: DTensor -> the norm over all shards
                norm = norm.full_tensor()
            squares.append(norm.float().square())
        if not squares:
            return torch.zeros((), device=self.device)
        return torch.stack(squares).sum().sqrt()

    def _run_monitors(self, step: int) -> dict:
        if not self.monitors:
            return {}
        # sharded weights need every rank in the forward; otherwise rank 0 evaluates alone
        if self.strategy != "fsdp2" and not self.info.is_main:
            return {}
        out: dict = {}
        model = self.method.encoder()
        for mon in self.monitors:
            result = mon.maybe_run(step, model)
            if not result:
                continue
            tag = getattr(mon, "name", None) or type(mon).__name__.lower().removesuffix("monitor")
            for k, v in result.items():
                out[k if k not in out and k not in self._reserved else f"{tag}_{k}"] = v
        return out if self.info.is_main else {}

    # -- the loop
    def fit(self) -> dict:
        """Train until the schedule ends or a budget stops the run; returns a summary dict.

        One call per Trainer (it releases its DDP wrapper and, if it started it, the process group
        at the end); to continue, build a new Trainer on the same ``output_dir``: it resumes.
        """
        if self.model is None:
            raise RuntimeError(
                "this Trainer already ran fit(); build a new Trainer with the same "
                "output_dir to continue (it resumes from the latest checkpoint)"
            )
        ok = False
        try:
            summary = self._fit()
            ok = True
            return summary
        finally:
            wrapped, self.model = self.model, None
            if self._owns_group and self.info.distributed:
                tdist.teardown(wrapped, barrier=ok)
            else:
                del wrapped

    def _fit(self) -> dict:
        cfg, info = self.cfg, self.info
        out_dir = Path(cfg.output_dir)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        sched = self.schedules()
        total = self.total_steps
        stop_at = total if cfg.max_steps is None else min(total, cfg.max_steps)
        state = {"model": self.method, "optimizer": self.optimizer}

        start_step, prior_seconds = 0, 0.0
        resume_from, meta = self._resume(out_dir, state)
        if resume_from is not None:
            start_step = int(meta["step"])
            prior_seconds = float(meta.get("seconds", 0.0))
            if (
                meta.get("world_size") != self.world_size
                or meta.get("batch_size_per_rank") != cfg.batch_size_per_rank
            ):
                _warn(
                    info,
                    f"resuming {resume_from} saved with world_size "
                    f"{meta.get('world_size')} x batch {meta.get('batch_size_per_rank')}, "
                    f"now {self.world_size} x {cfg.batch_size_per_rank}: the data order "
                    f"differs from an uninterrupted run",
                )
            _say(info, f"resumed from step {start_step:,} ({resume_from})")
        self._prepare(out_dir)
        metrics_path = out_dir / "metrics.jsonl"
        if info.is_main:  # a fresh run drops what a run that never checkpointed left behind
            _truncate_metrics(metrics_path, start_step if resume_from is not None else -1)
        last_saved = start_step if resume_from is not None else None
        last_ckpt = resume_from

        self.method.train()
        t0 = time.perf_counter()
        last_save_t = t0
        step = start_step
        reason = None if step < stop_at else ("completed" if step >= total else "max_steps")
        bar = None
        if self.progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=stop_at,
                initial=start_step,
                desc="pretrain",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        metrics_file = open(metrics_path, "a") if info.is_main else None
        loggers = _open_loggers(cfg, out_dir) if info.is_main else []
        batches = None
        self.stop_signal = None
        interrupts = _Interrupts()
        try:
            interrupts.__enter__()
            # FSDP2 must run its root forward first (lazy init): no step-0 evaluation there
            if step == 0 and self.monitors and self.strategy != "fsdp2":
                res = self._run_monitors(0)
                if res:
                    _say(info, "step 0: " + _brief(res), bar)
                if res and metrics_file is not None:
                    _write_line(metrics_file, {"step": 0, "epoch": 0, **res}, loggers)
            n_data = int(self.data.batches_per_epoch)
            data_epoch, within = divmod(step, n_data)
            batches = iter(self.data.batches(data_epoch, within)) if reason is None else None
            window_t, window_steps = time.perf_counter(), 0
            last_step_s = 0.0
            while reason is None:
                t_step = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    data_epoch += 1
                    batches = iter(self.data.batches(data_epoch, 0))
                    batch = next(batches)
                record = self._step(batch, sched, step)
                step += 1
                window_steps += 1
                last_step_s = time.perf_counter() - t_step
                if bar is not None:
                    bar.update(1)

                log_now = step % cfg.log_every == 0 or step == stop_at
                mon = self._run_monitors(step)
                if mon:  # monitor results as they come, above the bar
                    _say(info, f"step {step:,}: " + _brief(mon), bar)
                if log_now or mon:
                    line = {"step": step, "epoch": (step - 1) // self.iters_per_epoch}
                    if log_now:
                        now = time.perf_counter()
                        ips = (
                            window_steps
                            * cfg.batch_size_per_rank
                            * self.world_size
                            / max(now - window_t, 1e-9)
                        )
                        window_t, window_steps = now, 0
                        line.update(record)
                        line["images_per_s"] = ips
                        line["seconds"] = prior_seconds + now - t0
                        if bar is not None:
                            bar.set_postfix(self._postfix(record, ips), refresh=False)
                    line.update(mon)
                    if metrics_file is not None:
                        _write_line(metrics_file, line, loggers)

                now = time.perf_counter()
                over, signum, due = self._stop_flags(
                    over_budget=cfg.time_budget_s is not None
                    and now - t0 + last_step_s >= cfg.time_budget_s,
                    signum=interrupts.signum,
                    due=cfg.checkpoint_every_s is not None
                    and now - last_save_t >= cfg.checkpoint_every_s,
                )
                if step >= stop_at:
                    reason = "completed" if step >= total else "max_steps"
                    if reason == "max_steps":
                        _say(
                            info,
                            f"stopping at step {step:,} of {total:,}: train.max_steps="
                            f"{cfg.max_steps} reached; run again with a larger max_steps (or "
                            "none) to continue",
                            bar,
                        )
                elif signum:
                    reason = "interrupted"
                    self.stop_signal = signal.Signals(signum).name
                    _say(
                        info,
                        f"{self.stop_signal}: stopping after step {step:,} of {total:,} and "
                        "saving a checkpoint (send it again to abort at once)",
                        bar,
                    )
                elif over:
                    reason = "time_budget"
                    _say(
                        info,
                        f"stopping at step {step:,} of {total:,}: the time budget "
                        f"train.time_budget_s={cfg.time_budget_s:g} s is spent; the checkpoint "
                        "is saved (`vssl pretrain` with the same output_dir continues from it)",
                        bar,
                    )
                if (
                    reason is not None
                    or due
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                ):
                    if last_saved != step:
                        last_ckpt = self._save(
                            out_dir, step, prior_seconds + time.perf_counter() - t0
                        )
                        last_saved = step
                    last_save_t = time.perf_counter()
        finally:
            interrupts.__exit__()
            for lg in loggers:
                with contextlib.suppress(Exception):
                    lg.close()
            if batches is not None and hasattr(batches, "close"):
                batches.close()  # stops DataLoader workers now, not at garbage collection
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
        seconds = time.perf_counter() - t0
        done = step - start_step
        return {
            "step": step,
            "epoch": step / self.iters_per_epoch,
            "total_steps": total,
            "stopped": reason,
            "signal": self.stop_signal,
            "resumed_from": str(resume_from) if resume_from is not None else None,
            "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
            "seconds": seconds,
            "images_per_s": done * cfg.batch_size_per_rank * self.world_size / max(seconds, 1e-9),
            "metrics": str(metrics_path),
        }

    def _term_names(self, record: dict) -> list[str]:
        """The loss and the method's terms in a step record (what is not a scheduled value)."""
        return [k for k in record if k not in self._reserved or k == "loss"]

    def _stop_flags(self, *, over_budget: bool, signum: int | None, due: bool):
        """``(over_budget, signum or 0, checkpoint_due)`` as every rank sees them: under torchrun
        one all-reduce (max) per step, so a budget, a signal or a wall-clock checkpoint that any
        rank sees stops or saves every rank after the same step."""
        values = [1.0 if over_budget else 0.0, float(signum or 0), 1.0 if due else 0.0]
        if self.info.distributed:
            flags = torch.tensor(values, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            values = flags.tolist()
        return bool(values[0]), int(values[1]), bool(values[2])

    def _prepare(self, out_dir: Path) -> None:
        """Before the first step of every start (fresh or resumed, after the checkpoint is
        loaded) the method may derive what it needs from the data (the optional
        ``method.prepare(data, run_dir)``: SplitMask's patch vocabulary, CLIP's tokenizer). Each
        rank saw its own images, so the method's buffers are then taken from rank 0."""
        prepare = getattr(self.method, "prepare", None)
        if prepare is None:
            return
        with torch.no_grad():
            prepare(self.data, out_dir)
        if self.info.distributed:
            for buf in self.method.buffers():
                dist.broadcast(buf, src=0)

    def _resume(self, out_dir: Path, state: dict) -> tuple[Path | None, dict]:
        """Load the newest intact checkpoint of ``out_dir`` into ``state``; newer damaged ones
        (and one that fails to load) are skipped with a message. ``(path or None, meta)``."""
        found, skipped = find_checkpoint(out_dir)
        for p, why in skipped:
            _warn(self.info, f"skipping checkpoint {p}: {why}")
        while found is not None:
            try:
                return found, load_checkpoint(found, state)
            except CheckpointDamagedError as e:
                _warn(self.info, f"skipping checkpoint {found}: {e}")
                skipped.append((found, str(e)))
                step = int(found.name.removeprefix("step_"))
                found, more = find_checkpoint(out_dir, before=step)
                for p, why in more:
                    _warn(self.info, f"skipping checkpoint {p}: {why}")
                skipped += more
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint in {out_dir / 'ckpt'} to resume from ("
                + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                + f"). Move {out_dir / 'ckpt'} aside to start afresh, or set train.output_dir "
                "to a new folder"
            )
        return None, {}

    def _postfix(self, record: dict, ips: float) -> dict:
        """The progress bar's numbers: the loss, two loss terms at most, lr, images/s; short."""
        post = {"loss": f"{record['loss']:.4g}"}
        for k in [k for k in self._term_names(record) if k != "loss"][:2]:
            short = k.removesuffix("_loss").replace("_crops", "")
            post[short[:12]] = f"{record[k]:.3g}"
        post["lr"] = f"{record['lr']:.1e}"
        post["img/s"] = f"{ips:.0f}"
        return post

    def _step(self, batch: dict, sched: _Schedules, step: int) -> dict:
        """One optimizer step at schedule index ``step``; returns the logged values."""
        torch.manual_seed(derive_seed(self.cfg.seed, "step", step, self.info.rank))
        lr, wd = self._apply_schedules(sched, step)
        batch = {
            k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()
        }  # a no-op when the data already live there
        with self._autocast():
            out = self.model(batch, step)
        if not isinstance(out, dict) or "loss" not in out:
            raise TypeError(
                f"{type(self.method).__name__}.forward must return a dict with 'loss' "
                f"(and named loss terms), got {type(out).__name__}"
            )
        loss = out["loss"]
        names = ["loss"] + [k for k in out if k != "loss"]
        loss.backward()
        for params, until in self.frozen:
            if step < until:
                for p in params:
                    if p.grad is not None:
                        p.grad.zero_()
        grad_norm = self._grad_norm_and_clip()
        stats = torch.stack(
            [
                torch.as_tensor(out[k], device=self.device).detach().float().reshape(())
                for k in names
            ]
        )
        if self.info.distributed:
            dist.all_reduce(stats)
            stats = stats / self.world_size
        values = torch.cat([stats, grad_norm.detach().float().reshape(1).to(self.device)]).tolist()
        terms = dict(zip(names, values[:-1]))
        gnorm = values[-1]
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        if bad or not math.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            what = ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else f"grad_norm={gnorm}"
            last = latest_checkpoint(self.cfg.output_dir)
            raise NonFiniteLossError(
                f"non-finite {'loss' if bad else 'gradient'} at step {step + 1} (epoch "
                f"{step // self.iters_per_epoch}): {what}. The run stopped before the optimizer "
                f"step and wrote no checkpoint of this state; the last good checkpoint is "
                f"{last if last is not None else 'none (no checkpoint was written yet)'}. Lower "
                f"base_lr or lengthen warmup_epochs, check clip_grad, or inspect the data of this "
                f"step.",
                step=step + 1,
                terms=bad or {"grad_norm": gnorm},
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(step)
        record = dict(terms)
        record.update(lr=lr, wd=wd)
        record.update(self.method.scheduled(step))
        record["grad_norm"] = gnorm
        return record

    def _save(self, out_dir: Path, step: int, seconds: float) -> Path:
        meta = {
            "step": step,
            "epoch": step / self.iters_per_epoch,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "batch_size_per_rank": self.cfg.batch_size_per_rank,
            "strategy": self.strategy,
            "seconds": seconds,
            "rng": "re-seeded every step from (seed, step, rank): nothing to restore",
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(
            checkpoint_path(out_dir, step),
            {"model": self.method, "optimizer": self.optimizer, "meta": meta},
            keep_last=self.cfg.keep_checkpoints,
        )


#: What a step record holds besides the method's loss terms (plus its scheduled values).
_RESERVED = {"step", "epoch", "loss", "lr", "wd", "grad_norm", "images_per_s", "seconds"}
_HOOKS = ("plan", "after_step", "scheduled", "frozen_parameters", "encoder")


def _num_layers(student: nn.Module) -> int:
    for m in [student] + [c for c in student.children()]:
        if isinstance(getattr(m, "blocks", None), nn.ModuleList):
            return len(m.blocks)
    return 0


def _clip_sets(student: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter sets clipped separately: each child of the student (as DINOv2), plus its own."""
    sets = [[p for p in child.parameters() if p.requires_grad] for child in student.children()]
    own = [p for p in student.parameters(recurse=False) if p.requires_grad]
    return [s for s in sets + [own] if s]


def _write_line(f, record: dict, loggers: Sequence[Any] = ()) -> None:
    """One metrics.jsonl line, flushed at once (``tail -f`` follows the run), and the loggers."""
    f.write(json.dumps(record, default=float) + "\n")
    f.flush()
    for lg in loggers:
        lg.log(record)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only lines up to ``step`` (lines a crashed run wrote after its last checkpoint would
    otherwise repeat steps once the resumed run logs them again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
    text = "".join(line + "\n" for line in keep)
    atomic_write(path, lambda p: Path(p).write_text(text))


def _warn(info: tdist.DistInfo, msg: str) -> None:
    if info.is_main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _brief(values: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )


def _say(info: tdist.DistInfo, msg: str, bar: Any = None) -> None:
    """A line on rank 0's stderr (above the progress bar when there is one)."""
    if not info.is_main:
        return
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ interrupts
class _Interrupts:
    """SIGINT / SIGTERM handlers for the duration of ``fit``: the first signal only records its
    number (the loop stops after the current step and saves); a second one, at least
    ``REPEAT_S`` later, restores the previous handlers and raises :class:`TrainingAborted`. A
    repeat within ``REPEAT_S`` is the same interrupt delivered twice (a terminal's Ctrl-C reaches
    every process of the group, and torchrun forwards it too) and is ignored. Nothing is printed
    from the handler (it may run inside a write to the same stream)."""

    REPEAT_S = 1.0

    def __init__(self):
        self.signum: int | None = None
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in ("SIGINT", "SIGTERM"):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main interpreter, or not allowed
                continue
        return self

    def __exit__(self, *exc) -> None:
        old, self._old = self._old, {}
        for sig, handler in old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = int(signum), now
            return
        if now - self._at < self.REPEAT_S:
            return
        self.__exit__()
        raise TrainingAborted(signum)


# ------------------------------------------------------------------------------- output folder
def check_output_dir(path: str | os.PathLike, info: tdist.DistInfo | None = None) -> Path:
    """Create ``path`` and write (then remove) a probe file in it, on every rank; raise
    :class:`OutputDirError` (one line: which path, why, what to do) on every rank when any rank
    cannot. Called before the first step, so a bad ``train.output_dir`` costs no training."""
    out = Path(path).expanduser()
    rank = info.rank if info is not None else 0
    error = None
    try:
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(blocker))
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".vssl_write_probe.{os.getpid()}.{rank}"
        try:
            with open(probe, "wb") as f:
                f.write(b"vssl")
                f.flush()
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as e:
        error = _output_dir_message(out, e)
    failed = error is not None
    if info is not None and info.distributed:
        flag = torch.tensor([1.0 if failed else 0.0], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if failed:
        raise OutputDirError(error or f"train.output_dir={out}: another rank cannot write there")
    return out


def _output_dir_message(out: Path, e: OSError) -> str:
    where = Path(e.filename) if getattr(e, "filename", None) else out
    fix = "choose another with train.output_dir=FOLDER"
    if isinstance(e, (NotADirectoryError, FileExistsError)) or e.errno in (
        errno.ENOTDIR,
        errno.EEXIST,
    ):
        return f"train.output_dir={out}: {where} is a file, not a folder; move it away or {fix}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"train.output_dir={out}: permission denied writing to {where}; {fix}"
    if e.errno == errno.EROFS:
        return f"train.output_dir={out}: {where} is on a read-only file system; {fix}"
    if e.errno == errno.ENOSPC:
        return f"train.output_dir={out}: no space left on device at {where}; free space or {fix}"
    return f"train.output_dir={out}: cannot write to {where} ({e.strerror or e}); {fix}"


# --------------------------------------------------------------------------------------- loggers
def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _check_loggers(names: Sequence[str]) -> None:
    """A clear error before any work when a logger's package is not installed."""
    for name in names:
        pkg = _LOGGER_PACKAGES[name]
        if not _importable(pkg):
            raise ValueError(
                f"train.loggers: {name!r} needs the {pkg} package, which is not installed: "
                f"pip install {pkg} (or drop {name!r} from train.loggers; metrics.jsonl is "
                "always written)"
            )


def _numbers(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class _TensorBoard:
    def __init__(self, out_dir: Path, cfg: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        for k, v in _numbers(record).items():
            self.writer.add_scalar(k, v, int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out_dir: Path, cfg: TrainConfig):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vssl"),
            name=out_dir.name,
            dir=str(out_dir),
            config=cfg.to_dict(),
        )

    def log(self, record: dict) -> None:
        self.run.log(_numbers(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _open_loggers(cfg: TrainConfig, out_dir: Path) -> list[Any]:
    return [{"tensorboard": _TensorBoard, "wandb": _WandB}[n](out_dir, cfg) for n in cfg.loggers]
