"""The training loop every method shares: schedules, precision, devices, clipping, checkpoints, logs.

A method (DESIGN.md section 2) is an ``nn.Module`` with:

- ``student``: the modules the optimizer trains (a ``ModuleDict`` such as ``{"backbone",
  "dino_head"}``; the child named ``backbone`` gets layer-wise lr decay);
- ``forward(batch, teacher_temp=...) -> {"loss": scalar, <term>: detached scalar, ...}``
  (``teacher_temp`` is passed only when ``forward`` accepts it);
- optionally ``update_teacher(momentum)`` (called after every optimizer step),
  ``prototype_parameters()`` (frozen for ``freeze_last_layer_epochs``) and ``teacher`` (whose
  ``backbone`` the monitors evaluate).

The trainer never computes a loss. Per step ``i`` (0-based) it sets, as DINOv2's ``train.py``:
lr ``lr_schedule[i] * lr_multiplier`` (cosine with linear warm-up from 0, peak ``base_lr *
sqrt(total_batch / 1024)``), weight decay ``wd_schedule[i] * wd_multiplier`` (cosine
``weight_decay -> weight_decay_end``), teacher momentum (cosine ``momentum_teacher -> 1``) and
teacher temperature (linear warm-up, then constant); the prototypes get lr 0 and zeroed gradients
during the freeze; gradients are clipped per student sub-module (DINOv2 clips each of backbone,
DINO head, iBOT head to ``clip_grad``). The global torch RNG is re-seeded from ``(seed, step, rank)``
at every step (drop-path masks), and the data are a function of ``(seed, epoch, step, rank)``
(:mod:`vssl.train.data`), so a resumed run continues exactly as an uninterrupted one.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON line per logged step: step, epoch, every loss
term, lr, wd, momentum, teacher_temp, grad_norm, images_per_s, seconds, and monitor results) and
``ckpt/step_<N>/`` checkpoints (:mod:`vssl.train.checkpoint`), written every ``checkpoint_every``
steps, at the end, and when the time budget or the step budget stops the run. A run started on an
``output_dir`` that holds a checkpoint resumes from the newest one.

A non-finite loss term (or gradient norm) stops the run with :class:`NonFiniteLossError` naming the
step and the terms, before the optimizer step and without writing a checkpoint: the last good one
stays the newest.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_write
from . import distributed as tdist
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import derive_seed
from .optim import build_optimizer, param_groups
from .schedules import CosineSchedule

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer"]

PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("auto",) + tdist.STRATEGIES


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN/inf; ``step`` and ``terms`` say where."""

    def __init__(self, message: str, step: int, terms: dict[str, float]):
        super().__init__(message)
        self.step = step
        self.terms = terms


@dataclass
class TrainConfig:
    """Trainer settings; recipe defaults are DINOv2's ViT-S/B ones (DESIGN.md section 4).

    Epochs are ``iters_per_epoch`` optimizer steps (DINOv2's ``OFFICIAL_EPOCH_LENGTH``; None: one
    pass of the data, ``len(data)``). Epoch counts for warm-ups and the freeze may be fractional.
    ``max_steps``: stop (and checkpoint) once this many steps are done in total, the schedules
    still spanning ``epochs`` (a budget, resumable). ``time_budget_s``: stop (and checkpoint) before
    this many seconds of this invocation are exceeded. ``checkpoint_every``: steps (None: only at
    the end / on a budget stop).
    """

    epochs: int = 100
    iters_per_epoch: int | None = 1250
    batch_size_per_rank: int = 64
    base_lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    freeze_last_layer_epochs: float = 1
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
    keep_checkpoints: int | None = 3
    max_steps: int | None = None
    time_budget_s: float | None = None
    log_every: int = 10
    output_dir: str = "runs/pretrain"

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"train config {name}={getattr(self, name)!r}: {why}")

        for name in ("epochs", "batch_size_per_rank", "log_every"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        for name in ("iters_per_epoch", "checkpoint_every", "max_steps", "keep_checkpoints"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                bad(name, "must be >= 1 or null")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs",
                     "min_lr", "weight_decay", "weight_decay_end"):
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
        for name in ("momentum_teacher", "final_momentum_teacher"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be in [0, 1]")
        if self.precision not in PRECISIONS:
            bad("precision", f"allowed: {list(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"allowed: {list(STRATEGIES)}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
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
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    freeze_iters: int


def _epochs_to_iters(epochs: float, iters_per_epoch: int) -> int:
    return int(round(epochs * iters_per_epoch))


class Trainer:
    """Train ``method`` on ``data`` (:class:`vssl.train.data.TrainData` or anything with
    ``batch_size``, ``batches_per_epoch`` and ``batches(epoch, start_step)``) with ``cfg``.

    ``monitors``: objects with ``maybe_run(step, model) -> dict | None`` (e.g.
    :class:`vssl.evaluate.monitor.KNNMonitor`), called with the teacher backbone (the student's
    when there is no teacher) at step 0 of a fresh run and after every step; their results go
    into ``metrics.jsonl``. They run on rank 0 only (on every rank under FSDP2, whose weights are
    sharded; FSDP2 skips the step-0 evaluation because its root forward must come first), while
    the other ranks wait in the next collective: keep an evaluation well inside the process
    group's timeout. ``progress``: a tqdm bar on rank 0.
    """

    def __init__(self, method: nn.Module, data: Any, cfg: TrainConfig, *,
                 monitors: Sequence[Any] = (), progress: bool = True):
        if not isinstance(getattr(method, "student", None), nn.Module):
            raise TypeError(f"{type(method).__name__} has no `student` module: a method exposes "
                            "what the optimizer trains as `method.student`")
        self.cfg = cfg
        self.data = data
        self.monitors = list(monitors)
        self.progress = progress
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.info = tdist.setup()
        if getattr(data, "batch_size", cfg.batch_size_per_rank) != cfg.batch_size_per_rank:
            raise ValueError(f"the data's batch_size {data.batch_size} differs from "
                             f"batch_size_per_rank {cfg.batch_size_per_rank}: set them equal")
        self.device = self.info.device
        self.method = method.to(self.device)
        self.strategy = cfg.strategy if cfg.strategy != "auto" else (
            "ddp" if self.info.distributed else "none")
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision

        if cfg.grad_checkpointing:
            for m in method.student.modules():
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = True
        if cfg.compile:
            for m in method.modules():
                if isinstance(getattr(m, "blocks", None), nn.ModuleList):
                    for blk in m.blocks:
                        blk.compile()
        self.model = tdist.wrap(method, self.strategy, self.info,
                                find_unused_parameters=cfg.find_unused_parameters)
        # parameters exist in their final (possibly sharded) form only after wrapping
        protos = list(method.prototype_parameters()) if hasattr(method, "prototype_parameters") \
            else None
        self.groups = param_groups(
            method.student, layer_decay=cfg.layer_decay,
            patch_embed_lr_mult=cfg.patch_embed_lr_mult, num_layers=_num_layers(method.student),
            last_layer_params=protos)
        self.prototypes = protos or []
        self.optimizer = build_optimizer(self.groups, betas=(cfg.adamw_beta1, cfg.adamw_beta2))
        self._clip_sets = _clip_sets(method.student)
        try:
            params = inspect.signature(method.forward).parameters
            self._pass_temp = "teacher_temp" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            self._pass_temp = True

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
        """``base_lr * sqrt(total batch / 1024)`` (DINOv2's ``sqrt_wrt_1024`` rule)."""
        return self.cfg.base_lr * math.sqrt(self.cfg.batch_size_per_rank * self.world_size / 1024.0)

    def schedules(self) -> _Schedules:
        c, e = self.cfg, self.iters_per_epoch
        total = self.total_steps
        tt_iters = _epochs_to_iters(c.warmup_teacher_temp_epochs, e)
        return _Schedules(
            lr=CosineSchedule(self.lr_peak, c.min_lr, total,
                              warmup_iters=_epochs_to_iters(c.warmup_epochs, e)),
            wd=CosineSchedule(c.weight_decay, c.weight_decay_end, total),
            momentum=CosineSchedule(c.momentum_teacher, c.final_momentum_teacher, total),
            teacher_temp=CosineSchedule(c.teacher_temp, c.teacher_temp, tt_iters,
                                        warmup_iters=tt_iters,
                                        start_warmup_value=c.warmup_teacher_temp),
            freeze_iters=_epochs_to_iters(c.freeze_last_layer_epochs, e),
        )

    # -- pieces of a step
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _apply_schedules(self, sched: _Schedules, step: int) -> tuple[float, float]:
        lr, wd = sched.lr[step], sched.wd[step]
        frozen = step < sched.freeze_iters
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0 if (frozen and g["is_last_layer"]) else lr * g["lr_multiplier"]
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

    def _teacher_backbone(self) -> nn.Module:
        teacher = getattr(self.method, "teacher", None)
        for container in (teacher, self.method.student):
            if isinstance(container, nn.ModuleDict) and "backbone" in container:
                return container["backbone"]
        return self.method.student

    def _run_monitors(self, step: int) -> dict:
        if not self.monitors:
            return {}
        # sharded weights need every rank in the forward; otherwise rank 0 evaluates alone
        if self.strategy != "fsdp2" and not self.info.is_main:
            return {}
        out: dict = {}
        model = self._teacher_backbone()
        for mon in self.monitors:
            result = mon.maybe_run(step, model)
            if not result:
                continue
            tag = getattr(mon, "name", None) or type(mon).__name__.lower().removesuffix("monitor")
            for k, v in result.items():
                out[k if k not in out and k not in _RESERVED else f"{tag}_{k}"] = v
        return out if self.info.is_main else {}

    # -- the loop
    def fit(self) -> dict:
        """Train until the schedule ends or a budget stops the run; returns a summary dict.

        One call per Trainer (it releases its DDP wrapper and, if it started it, the process group
        at the end); to continue, build a new Trainer on the same ``output_dir``: it resumes.
        """
        if self.model is None:
            raise RuntimeError("this Trainer already ran fit(); build a new Trainer with the same "
                               "output_dir to continue (it resumes from the latest checkpoint)")
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
        resume_from = latest_checkpoint(out_dir)
        if resume_from is not None:
            meta = load_checkpoint(resume_from, state)
            start_step = int(meta["step"])
            prior_seconds = float(meta.get("seconds", 0.0))
            if meta.get("world_size") != self.world_size or meta.get("batch_size_per_rank") != \
                    cfg.batch_size_per_rank:
                _warn(info, f"resuming {resume_from} saved with world_size "
                            f"{meta.get('world_size')} x batch {meta.get('batch_size_per_rank')}, "
                            f"now {self.world_size} x {cfg.batch_size_per_rank}: the data order "
                            f"differs from an uninterrupted run")
        metrics_path = out_dir / "metrics.jsonl"
        if info.is_main:  # a fresh run drops what a run that never checkpointed left behind
            _truncate_metrics(metrics_path, start_step if resume_from is not None else -1)
        last_saved = start_step if resume_from is not None else None
        last_ckpt = resume_from

        self.method.train()
        t0 = time.perf_counter()
        step = start_step
        reason = None if step < stop_at else ("completed" if step >= total else "max_steps")
        bar = None
        if self.progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=start_step, desc="pretrain", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
        metrics_file = open(metrics_path, "a") if info.is_main else None
        batches = None
        try:
            # FSDP2 must run its root forward first (lazy init): no step-0 evaluation there
            if step == 0 and self.monitors and self.strategy != "fsdp2":
                res = self._run_monitors(0)
                if res and metrics_file is not None:
                    _write_line(metrics_file, {"step": 0, "epoch": 0, **res})
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
                if log_now or mon:
                    line = {"step": step, "epoch": (step - 1) // self.iters_per_epoch}
                    if log_now:
                        now = time.perf_counter()
                        ips = window_steps * cfg.batch_size_per_rank * self.world_size / max(
                            now - window_t, 1e-9)
                        window_t, window_steps = now, 0
                        line.update(record)
                        line["images_per_s"] = ips
                        line["seconds"] = prior_seconds + now - t0
                        if bar is not None:
                            post = {k: f"{record[k]:.4g}" for k in self._term_names(record)}
                            post.update(lr=f"{record['lr']:.2e}", img_s=f"{ips:.1f}")
                            bar.set_postfix(ordered_dict=post, refresh=False)
                    line.update(mon)
                    if metrics_file is not None:
                        _write_line(metrics_file, line)

                if step >= stop_at:
                    reason = "completed" if step >= total else "max_steps"
                elif cfg.time_budget_s is not None and self._over_budget(
                        time.perf_counter() - t0 + last_step_s):
                    reason = "time_budget"
                if reason is not None or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    if last_saved != step:
                        last_ckpt = self._save(out_dir, step, prior_seconds + time.perf_counter() - t0)
                        last_saved = step
        finally:
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
            "resumed_from": str(resume_from) if resume_from is not None else None,
            "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
            "seconds": seconds,
            "images_per_s": done * cfg.batch_size_per_rank * self.world_size / max(seconds, 1e-9),
            "metrics": str(metrics_path),
        }

    @staticmethod
    def _term_names(record: dict) -> list[str]:
        """The loss and the method's terms in a step record (what is not a trainer value)."""
        return [k for k in record if k not in _RESERVED or k == "loss"]

    def _over_budget(self, projected: float) -> bool:
        """True on every rank when any rank projects past the time budget after its next step."""
        flag = torch.tensor([1.0 if projected >= self.cfg.time_budget_s else 0.0],
                            device=self.device)
        if self.info.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _step(self, batch: dict, sched: _Schedules, step: int) -> dict:
        """One optimizer step at schedule index ``step``; returns the logged values."""
        torch.manual_seed(derive_seed(self.cfg.seed, "step", step, self.info.rank))
        lr, wd = self._apply_schedules(sched, step)
        temp = sched.teacher_temp[step]
        kwargs = {"teacher_temp": temp} if self._pass_temp else {}
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                 for k, v in batch.items()}  # a no-op when the data already live there
        with self._autocast():
            out = self.model(batch, **kwargs)
        if not isinstance(out, dict) or "loss" not in out:
            raise TypeError(f"{type(self.method).__name__}.forward must return a dict with 'loss' "
                            f"(and named loss terms), got {type(out).__name__}")
        loss = out["loss"]
        names = ["loss"] + [k for k in out if k != "loss"]
        loss.backward()
        if step < sched.freeze_iters:
            for p in self.prototypes:
                if p.grad is not None:
                    p.grad.zero_()
        grad_norm = self._grad_norm_and_clip()
        stats = torch.stack([torch.as_tensor(out[k], device=self.device).detach().float().reshape(())
                             for k in names])
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
                f"step.", step=step + 1, terms=bad or {"grad_norm": gnorm})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        momentum = sched.momentum[step]
        if hasattr(self.method, "update_teacher"):
            self.method.update_teacher(momentum)
        record = dict(terms)
        record.update(lr=lr, wd=wd, momentum=momentum, teacher_temp=temp, grad_norm=gnorm)
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
        return save_checkpoint(checkpoint_path(out_dir, step),
                               {"model": self.method, "optimizer": self.optimizer, "meta": meta},
                               keep_last=self.cfg.keep_checkpoints)


_RESERVED = {"step", "epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm",
             "images_per_s", "seconds"}


def _num_layers(student: nn.Module) -> int:
    for m in ([student] + [c for c in student.children()]):
        if isinstance(getattr(m, "blocks", None), nn.ModuleList):
            return len(m.blocks)
    return 0


def _clip_sets(student: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter sets clipped separately: each child of the student (DINOv2), plus its own."""
    sets = [[p for p in child.parameters() if p.requires_grad] for child in student.children()]
    own = [p for p in student.parameters(recurse=False) if p.requires_grad]
    return [s for s in sets + [own] if s]


def _write_line(f, record: dict) -> None:
    f.write(json.dumps(record, default=float) + "\n")
    f.flush()


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
    text = "".join(l + "\n" for l in keep)
    atomic_write(path, lambda p: Path(p).write_text(text))


def _warn(info: tdist.DistInfo, msg: str) -> None:
    if info.is_main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)
