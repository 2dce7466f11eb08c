#!/usr/bin/env python
"""GPU check: vssl's speed and memory on one CUDA GPU, in under 8 minutes, for BENCHMARKS.md.

The project's GPU time comes in short leases (15 minutes of device time per task, machine start
included), so this is one prepared script that measures what the GPU rows of BENCHMARKS.md need
and always finishes: every section has a time share, every part checks the clock before it
starts (a part that would not fit is skipped with a note), a watchdog stops the run at
``--budget-s`` + 25 s whatever happens, and the JSON is rewritten after every section so a run
killed from outside still leaves its numbers.

What it measures (bf16 autocast everywhere, SDPA attention, random weights):

(a) **Embedding throughput** (images/s, forward only, ``torch.inference_mode``) of vssl's
    ``VisionTransformer`` against ``transformers.Dinov2Model`` with the same weights (exported by
    ``vssl.models.checkpoints.export_hf``, loaded with ``attn_implementation="sdpa"``; their fp32
    outputs are checked to agree before any timing) for ViT-L/14 (``dinov2-vitl14``, random init;
    its config's img_size is 518) at 224 and at 518 px; eager, then with ``torch.compile`` on
    every transformer block of both (regional compilation: ``blk.compile()`` on vssl's
    ``blocks`` and on transformers' ``encoder.layer``; the compiled vssl output is checked
    against the eager one). vssl and transformers alternate rounds (A B, B A, ...).
(b) **Training steps**, as ``vssl.train.Trainer`` runs them (per-group lr / weight decay, bf16
    autocast forward, backward, frozen-prototype handling, per-module gradient clipping when the
    recipe clips, fused AdamW, ``after_step`` = DINOv2's EMA teacher update), on synthetic
    normalized batches:

    - DINOv2 ViT-S/14 (recipe ``dinov2_vits14``: 2 x 224 px global + 8 x 98 px local crops per
      image, iBOT block masks from ``vssl.data.collate.collate_multicrop`` +
      ``BlockMaskGenerator`` as the data pipeline draws them, 65536 prototypes, KoLeo);
    - MAE ViT-B/16 (recipe ``mae_vitb16``: 224 px, 75% random mask, 512-d x 8 decoder);

    eager, then with the trainer's ``train.compile=true`` (``blk.compile()`` on the ``blocks`` of
    every backbone: student and teacher for DINOv2, the encoder for MAE -- not MAE's decoder).

Reported: step time, images/s, model FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward, SDPA forced onto its MATH backend during the count so attention is counted;
DINOv2's teacher forward included; the embedding FLOPs are ``vit_forward_flops`` of
``benchmarks/embed_throughput.py``, which agrees exactly with the counter), **MFU** = achieved
model FLOP/s over the GPU's dense bf16 peak (from the table ``BF16_PEAK_TFLOPS`` by device name;
an unknown GPU falls back to a measured bf16 matmul, and the report says so), the share of a
measured 8192^3 bf16 matmul, and peak memory (``torch.cuda.max_memory_allocated`` over the timed
steps; for (a) with both models resident).

Run (on the GPU machine; ~7.5 minutes)::

    python benchmarks/gpu_check.py --json gpu_check.json --markdown gpu_check.md
    python benchmarks/gpu_check.py --device cpu --quick      # every code path, tiny, CPU, <1 min
    python benchmarks/gpu_check.py --sections mae,dinov2 --budget-s 240   # training steps only

``--device cpu --quick`` runs every path with ``vit-test-p14`` and tiny recipes and no compile
(``--compile on --compile-backend eager`` also walks the compile path through dynamo cheaply).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here (imports included)

import argparse
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import build_hf, vit_forward_flops, vssl_sequence
from mae_speed import command_line, count_flops, machine_info, matmul_rate, sync

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. Matched as
# substrings of torch.cuda.get_device_name(), first match wins (specific names before general).
BF16_PEAK_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
]
AGREE_TOL = 2e-3  # max |vssl - transformers| over LayerNormed tokens, fp32 (GPU kernels differ)
# Each section's share of the time left when it starts. MAE runs before DINOv2: DINOv2's compile
# is the slowest and least predictable part (many block variants), so it goes last.
SHARES = {"embed": 0.5, "mae": 0.2, "dinov2": 0.3}
WATCHDOG_GRACE_S = 25


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


class TimeUp(BaseException):
    """The watchdog fired: the run is past its budget. A BaseException, so that no ``except
    Exception`` inside torch (dynamo, inductor) swallows it."""


class Clock:
    def __init__(self, budget_s: float):
        self.end = START + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()


def bf16_peak(device: torch.device, measured: float) -> tuple[float, str]:
    """(FLOP/s, where it came from): the data-sheet number for a known GPU, else the measured
    bf16 matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in BF16_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"data sheet ({key}: {tflops:g} TFLOP/s dense bf16)"
        return measured, f"measured bf16 matmul ({name} is not in BF16_PEAK_TFLOPS)"
    return measured, "measured bf16 matmul (CPU: no data-sheet peak)"


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def peak_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_blocks(blocks, args) -> None:
    """Regional compilation: each block's forward through torch.compile (blocks share code,
    so one graph serves all blocks whose guards pass: same shapes, dtypes, grad mode, and the
    same values of the Python scalars the forward reads)."""
    for blk in blocks:
        blk.compile(backend=args.compile_backend, dynamic=False)


class DynamoWatch(logging.Handler):
    """Collects dynamo's "hit config.recompile_limit" warnings: past the limit, the frames that
    needed another graph run eagerly, so a "compiled" timing is then only partly compiled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits: list[str] = []
        logging.getLogger("torch._dynamo").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "recompile_limit" in msg or "cache_size_limit" in msg:
            self.hits.append(
                msg.splitlines()[0]
                + " | "
                + " ".join(line.strip() for line in msg.splitlines()[1:3])
            )

    def start(self) -> None:
        """A fresh dynamo (caches of earlier sections' models dropped) and no hits yet."""
        from torch import _dynamo

        _dynamo.reset()
        _dynamo.utils.counters.clear()
        self.hits = []

    def summary(self) -> dict:
        from torch import _dynamo

        c = _dynamo.utils.counters
        return {
            "unique_graphs": int(c["stats"]["unique_graphs"]),
            "frames_total": int(c["frames"]["total"]),
            "frames_ok": int(c["frames"]["ok"]),
            "recompile_limit": int(_dynamo.config.recompile_limit),
            "limit_hits": list(self.hits),
        }


DYNAMO: DynamoWatch | None = None


def compiled_note(what: str, report: dict) -> dict:
    """Dynamo's counters after a compiled timing; a note when the recompile limit was hit."""
    info = DYNAMO.summary()
    if info["limit_hits"]:
        report["notes"].append(
            f"{what}: dynamo hit its recompile limit ({info['recompile_limit']}; "
            f"{info['unique_graphs']} graphs): frames past it ran eagerly, so this compiled row is "
            f"only partly compiled (first warning: {info['limit_hits'][0]}). "
            "--recompile-limit raises the limit."
        )
        log("  " + report["notes"][-1])
    return info


# ------------------------------------------------------------------------------ (a) embedding
def measure_embed(
    runners: dict,
    batch: int,
    device: torch.device,
    deadline: float,
    round_s: float,
    rounds: int,
    warmup: int,
) -> dict:
    """Warm every runner up (compilation happens here), then alternating rounds (A B, B A, ...)
    of the same number of forwards each, until ``rounds`` rounds or the deadline."""
    first, mem, last = {}, {}, {}
    for name, run in runners.items():
        reset_mem(device)
        t = time.perf_counter()
        run(1)
        sync(device)
        first[name] = time.perf_counter() - t
        for _ in range(max(0, warmup - 1)):
            run(1)
        sync(device)
        t = time.perf_counter()
        run(1)
        sync(device)
        last[name] = time.perf_counter() - t
        mem[name] = peak_mem_gib(device)
        log(
            f"    warm-up {name}: first call {first[name]:.2f} s, then {last[name] * 1e3:.1f} "
            "ms/batch"
        )
    iters = max(1, int(round_s / max(max(last.values()), 1e-6)))
    samples: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        if r >= 1 and time.perf_counter() + 2 * len(order) * iters * max(last.values()) > deadline:
            break
        for name in order if r % 2 == 0 else order[::-1]:
            sync(device)
            t = time.perf_counter()
            runners[name](iters)
            sync(device)
            samples[name].append(batch * iters / (time.perf_counter() - t))
    log(
        "    "
        + ", ".join(
            f"{k} best {max(v):.1f} img/s over {len(v)} rounds of {iters}"
            for k, v in samples.items()
        )
    )
    return {
        k: {
            "images_per_s": max(v),
            "median_images_per_s": statistics.median(v),
            "rounds": v,
            "iters_per_round": iters,
            "first_call_s": first[k],
            "peak_mem_gib": mem[k],
        }
        for k, v in samples.items()
    }


def make_embed_runner(kind: str, module, x: torch.Tensor, device: torch.device):
    def run(n: int) -> None:
        with torch.inference_mode(), autocast(device):
            for _ in range(n):
                if kind == "transformers":
                    module(pixel_values=x)
                else:
                    module(x)

    return run


def section_embed(args, device, deadline: float, peak: float, report: dict) -> None:
    """Per resolution: a model built at that img_size (so neither implementation resamples its
    position embedding: vssl's DINOv2 resampling, with its +0.1 offset, and transformers' resize
    to the grid give different outputs at other sizes), its transformers twin, the agreement
    check, eager timing, then compiled timing."""
    for i, res in enumerate(args.embed_res):
        left = deadline - time.perf_counter()
        if left < args.est_embed_setup + args.est_embed_part:
            report["notes"].append(f"(a) @{res}: skipped, {left:.0f} s left in the section")
            log("  " + report["notes"][-1])
            continue
        # later resolutions keep their share of what is left
        share = 1.0 / (len(args.embed_res) - i)
        embed_one(res, args, device, time.perf_counter() + left * share, peak, report)
        free(device)


def embed_one(res: int, args, device, deadline: float, peak: float, report: dict) -> None:
    import vssl

    name, batch, notes = args.embed_model, args.embed_batch[res], report["notes"]
    torch.manual_seed(0)
    model = vssl.create_model(name, random_init=True, img_size=res).eval()
    cfg = model.config
    with tempfile.TemporaryDirectory(prefix="vssl-gpu-check-hf-") as tmp:
        hf = build_hf(model, tmp).to(device).eval()
    model.to(device)
    log(
        f"  {name} @{res}: vssl and transformers built "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)"
    )
    g = torch.Generator().manual_seed(res)
    x = torch.randn(1 if res >= 448 else 2, cfg.in_chans, res, res, generator=g).to(device)
    with torch.inference_mode():
        a = vssl_sequence(model, x).float()
        b = hf(pixel_values=x).last_hidden_state.float()
        with autocast(device):
            d16 = float(
                (vssl_sequence(model, x).float() - hf(pixel_values=x).last_hidden_state.float())
                .abs()
                .max()
            )
    diff = float((a - b).abs().max())
    ok = diff <= AGREE_TOL
    report["checks"].append(
        {
            "what": f"{name}@{res} vssl vs transformers, fp32",
            "max_abs_diff": diff,
            "tol": AGREE_TOL,
            "ok": ok,
            "max_abs_value": float(a.abs().max()),
            "bf16_autocast_max_abs_diff": d16,
        }
    )
    log(
        f"  vssl vs transformers fp32 max|diff| {diff:.2e} ({'OK' if ok else 'MISMATCH'}, "
        f"tol {AGREE_TOL:g}); bf16 autocast {d16:.2e}"
    )
    if not ok:
        notes.append(
            f"{name}@{res}: vssl and transformers disagree (max |diff| {diff:.2e} > "
            f"{AGREE_TOL:g}): their timings compare different computations"
        )
    del a, b
    x = torch.randn(
        batch, cfg.in_chans, res, res, generator=torch.Generator().manual_seed(res + 1)
    ).to(device)
    flops = vit_forward_flops(cfg, res)["total"]
    ref_cls = None
    for mode in ["eager"] + (["compiled"] if args.compile else []):
        left = deadline - time.perf_counter()
        need = args.est_compile_embed if mode == "compiled" else args.est_embed_part
        if left < need:
            notes.append(
                f"(a) {mode} @{res}: skipped, {left:.0f} s left for this resolution "
                f"(needs ~{need:.0f} s)"
            )
            log("  " + notes[-1])
            continue
        if mode == "compiled":
            DYNAMO.start()
            compile_blocks(model.blocks, args)
            compile_blocks(hf.encoder.layer, args)
        log(f"  [{mode}] @{res}, batch {batch} ...")
        runners = {
            "vssl": make_embed_runner("vssl", model, x, device),
            "transformers": make_embed_runner("transformers", hf, x, device),
        }
        res_t = measure_embed(
            runners, batch, device, deadline, args.embed_round_s, args.embed_rounds, args.warmup
        )
        with torch.inference_mode(), autocast(device):
            cls = model(x[:2]).float()
        if ref_cls is None:
            ref_cls = cls
        else:
            d = float((cls - ref_cls).abs().max())
            report["checks"].append(
                {"what": f"{name}@{res} compiled vs eager vssl, bf16 CLS", "max_abs_diff": d}
            )
            log(f"    compiled vs eager vssl CLS (bf16): max|diff| {d:.2e}")
        dynamo = compiled_note(f"(a) compiled @{res}", report) if mode == "compiled" else None
        hf_ips = res_t["transformers"]["images_per_s"]
        for impl, r in res_t.items():
            achieved = r["images_per_s"] * flops
            report["embed"].append(
                {
                    "model": name,
                    "res": res,
                    "batch": batch,
                    "impl": impl,
                    "mode": mode,
                    "gflop_per_img": flops / 1e9,
                    "tflops": achieved / 1e12,
                    "mfu_pct": 100 * achieved / peak,
                    "vs_transformers": r["images_per_s"] / hf_ips,
                    "dynamo": dynamo,
                    **r,
                }
            )
    del model, hf, x


# ------------------------------------------------------------------------------ (b) training
def dinov2_batch(recipe, method, batch_size: int) -> dict:
    """A synthetic DINOv2 batch: normalized random crops in the multi-crop layout and iBOT block
    masks, collated as the data pipeline collates them."""
    from vssl.data.collate import collate_multicrop
    from vssl.data.masking import BlockMaskGenerator

    d, spec = recipe.data, method.views()
    g = torch.Generator().manual_seed(0)
    samples = [
        {
            "global": torch.randn(2, 3, d.global_size, d.global_size, generator=g),
            "local": torch.randn(d.n_local, 3, d.local_size, d.local_size, generator=g),
        }
        for _ in range(batch_size)
    ]
    mask_gen = None
    if spec.mask == "block":
        grid = d.global_size // spec.patch_size
        mask_gen = BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    return collate_multicrop(
        samples,
        mask_generator=mask_gen,
        mask_probability=spec.mask_probability,
        mask_ratio=tuple(spec.mask_ratio),
        generator=random.Random(0),
    )


def mae_batch(method, batch_size: int) -> dict:
    """A synthetic MAE batch: normalized random images and MAE's random masks."""
    from vssl.data.masking import random_masking

    bcfg = method.student["backbone"].config
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, bcfg.in_chans, bcfg.img_size, bcfg.img_size, generator=g)
    ids_keep, ids_restore, mask = random_masking(
        batch_size, bcfg.num_patches, method.cfg.mask_ratio, generator=g
    )
    return {"image": images, "ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask}


class TrainerStep:
    """One optimizer step as ``vssl.train.Trainer._step`` runs it (without its logging and
    non-finite checks): lr / weight decay per group, bf16 autocast forward, backward, frozen
    parameters' gradients zeroed, per-module clipping when ``clip_grad`` is set, AdamW (fused on
    CUDA), zero grads, ``method.after_step``."""

    def __init__(self, method, train_cfg, batch: dict, device: torch.device, step: int):
        from vssl.train.optim import build_optimizer, param_groups

        self.method, self.cfg, self.device, self.step_index = method, train_cfg, device, step
        self.batch = {
            k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()
        }
        self.frozen = [(list(f.params), int(f.until)) for f in method.frozen_parameters()]
        groups = param_groups(
            method.student,
            layer_decay=train_cfg.layer_decay,
            patch_embed_lr_mult=train_cfg.patch_embed_lr_mult,
            num_layers=len(method.student["backbone"].blocks),
            frozen=self.frozen,
        )
        self.opt = build_optimizer(groups, betas=(train_cfg.adamw_beta1, train_cfg.adamw_beta2))
        for g in self.opt.param_groups:
            g["lr"] = 0.0 if step < g["frozen_until"] else train_cfg.base_lr * g["lr_multiplier"]
            g["weight_decay"] = train_cfg.weight_decay * g["wd_multiplier"]
        self.clip_sets = [
            [p for p in c.parameters() if p.requires_grad] for c in method.student.children()
        ]
        self.clip_sets = [s for s in self.clip_sets if s]

    def forward_backward(self) -> torch.Tensor:
        with autocast(self.device):
            loss = self.method(self.batch, self.step_index)["loss"]
        loss.backward()
        return loss

    def __call__(self) -> torch.Tensor:
        loss = self.forward_backward()
        for params, until in self.frozen:
            if self.step_index < until:
                for p in params:
                    if p.grad is not None:
                        p.grad.zero_()
        if self.cfg.clip_grad is not None:
            for params in self.clip_sets:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.method.after_step(self.step_index)
        return loss


def compile_like_trainer(method, args) -> int:
    """``train.compile=true``: ``blk.compile()`` for the blocks of every module that has
    ``blocks`` (backbones; MAE's decoder keeps ``decoder_blocks`` eager). Returns how many."""
    n = 0
    for m in method.modules():
        if isinstance(getattr(m, "blocks", None), nn.ModuleList):
            compile_blocks(m.blocks, args)
            n += len(m.blocks)
    return n


def time_steps(
    step: TrainerStep,
    device: torch.device,
    *,
    warmup: int,
    seconds: float,
    min_steps: int,
    max_steps: int,
    deadline: float,
) -> dict:
    first = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - first
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    reset_mem(device)
    times, t_end = [], min(deadline, time.perf_counter() + seconds)
    while len(times) < min_steps or (len(times) < max_steps and time.perf_counter() < t_end):
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    return {
        "first_step_s": first,
        "steps": len(times),
        "best_s": min(times),
        "median_s": statistics.median(times),
        "mean_s": sum(times) / len(times),
        "peak_mem_gib": peak_mem_gib(device),
        "loss": float(loss.detach()),
    }


def section_train(kind: str, args, device, deadline: float, peak: float, report: dict) -> None:
    from vssl.methods.base import StepPlan
    from vssl.pretrain import build_method
    from vssl.train.config import load_recipe

    notes = report["notes"]
    recipe_name = "dinov2_vits14" if kind == "dinov2" else "mae_vitb16"
    overrides = list(args.quick_overrides[kind]) if args.quick else []
    batch_size = args.dino_batch if kind == "dinov2" else args.mae_batch
    recipe = load_recipe(recipe_name, overrides)
    batch_size = batch_size or recipe.train.batch_size_per_rank
    torch.manual_seed(0)
    method, _ = build_method(recipe)
    method.to(device).train()
    method.plan(StepPlan(total_steps=1000, iters_per_epoch=100, global_batch_size=batch_size))
    batch = (
        dinov2_batch(recipe, method, batch_size)
        if kind == "dinov2"
        else mae_batch(method, batch_size)
    )
    step_index = 500  # past the prototype freeze (100 steps): every parameter trains
    step = TrainerStep(method, recipe.train, batch, device, step_index)
    label = f"{recipe_name} ({recipe.model.name}, batch {batch_size}" + (
        f": {2 * batch_size} x {recipe.data.global_size} px + {recipe.data.n_local * batch_size}"
        f" x {recipe.data.local_size} px crops)"
        if kind == "dinov2"
        else f" x {recipe.data.global_size} px, mask {method.cfg.mask_ratio:g})"
    )
    log(f"  {label}")
    flops = count_flops(step.forward_backward)
    step.opt.zero_grad(set_to_none=True)
    log(f"  {flops / 1e12:.3f} TFLOP per step (forward + backward, FlopCounterMode)")
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        left = deadline - time.perf_counter()
        need = args.est_compile_train if mode == "compiled" else args.est_train_part
        if left < need:
            notes.append(
                f"({kind}) {mode}: skipped, {left:.0f} s left in the section (needs ~{need:.0f} s)"
            )
            log("  " + notes[-1])
            continue
        if mode == "compiled":
            DYNAMO.start()
            n = compile_like_trainer(method, args)
            log(f"  compiling {n} blocks (first steps compile) ...")
        r = time_steps(
            step,
            device,
            warmup=args.warmup,
            seconds=args.train_part_s,
            min_steps=args.min_steps,
            max_steps=args.max_steps,
            deadline=deadline,
        )
        if mode == "compiled":
            r["dynamo"] = compiled_note(f"({kind}) compiled", report)
        achieved = flops / r["best_s"]
        row = {
            "method": kind,
            "recipe": recipe_name,
            "label": label,
            "model": recipe.model.name,
            "batch": batch_size,
            "mode": mode,
            "images_per_s": batch_size / r["best_s"],
            "tflop_per_step": flops / 1e12,
            "tflops": achieved / 1e12,
            "mfu_pct": 100 * achieved / peak,
            **r,
        }
        report["train"].append(row)
        log(
            f"  [{mode}] {r['best_s'] * 1e3:.1f} ms/step best (median {r['median_s'] * 1e3:.1f}, "
            f"{r['steps']} steps; first {r['first_step_s']:.1f} s), {row['images_per_s']:.1f} img/s, "
            f"MFU {row['mfu_pct']:.1f}%, peak mem {r['peak_mem_gib'] or 0:.2f} GiB"
        )
    del step, method, batch
    free(device)


# ------------------------------------------------------------------------------------ report
def fmt(v, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def render(report: dict) -> str:
    m, pk = report["machine"], report["peak"]
    gpu = (
        f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB, {m.get('sms')} SMs), CUDA {m.get('cuda')}"
        if "gpu" in m
        else "no GPU (CPU run)"
    )
    lines = [
        "## GPU check: embedding throughput and training steps (bf16 autocast, SDPA)",
        "",
        f"Command: `{report['command']}`  ",
        (
            f"Machine: {gpu}; host {m['cpu']}, {m['usable_cpus']} cores; torch {m['torch']}, "
            f"transformers {m.get('transformers')}, Python {m['python']}; {m['date']}  "
        ),
        (
            f"MFU peak: {pk['bf16_peak_tflops']:.4g} TFLOP/s, {pk['source']}; measured bf16 matmul "
            f"{pk['matmul_bf16_tflops']:.4g} TFLOP/s ({pk['matmul_n']}^3, "
            f"{100 * pk['matmul_bf16_tflops'] / pk['bf16_peak_tflops']:.0f}% of that peak).  "
        ),
        f"Run time {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
    ]
    if report["embed"]:
        lines += [
            "",
            "### (a) Embedding throughput: vssl vs `transformers.Dinov2Model` (same weights)",
            "",
            (
                "| model | res | batch | impl | compile | images/s | GFLOP/img | TFLOP/s | MFU % | "
                "vs transformers | peak mem GiB |"
            ),
            "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["embed"]:
            lines.append(
                f"| {r['model']} | {r['res']} | {r['batch']} | {r['impl']} | {r['mode']} | "
                f"{r['images_per_s']:.1f} | {r['gflop_per_img']:.4g} | {r['tflops']:.4g} | "
                f"{r['mfu_pct']:.1f} | {r['vs_transformers']:.2f} | {fmt(r['peak_mem_gib'], '.2f')} |"
            )
    if report["train"]:
        lines += [
            "",
            "### (b) Training steps (forward + backward + clipping + AdamW + EMA, as the trainer)",
            "",
            (
                "| recipe | batch (images) | compile | step ms (best / median) | images/s | "
                "TFLOP/step | TFLOP/s | MFU % | peak mem GiB |"
            ),
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["train"]:
            lines.append(
                f"| {r['label']} | {r['batch']} | {r['mode']} | {r['best_s'] * 1e3:.1f} / "
                f"{r['median_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | {r['tflop_per_step']:.4g} | "
                f"{r['tflops']:.4g} | {r['mfu_pct']:.1f} | {fmt(r['peak_mem_gib'], '.2f')} |"
            )
    checks = [c for c in report["checks"]]
    if checks:
        lines += [
            "",
            "Checks: "
            + "; ".join(
                f"{c['what']}: max |diff| {c['max_abs_diff']:.2e}"
                + (f" ({'OK' if c['ok'] else 'MISMATCH'}, tol {c['tol']:g})" if "ok" in c else "")
                for c in checks
            )
            + ".",
        ]
    if report["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines)


def write_outputs(report: dict, args) -> str:
    report["elapsed_s"] = time.perf_counter() - START
    text = render(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return text


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for every path (vit-test-p14, tiny recipes and batches)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="total time budget in seconds (default 450; a watchdog stops the run "
        f"{WATCHDOG_GRACE_S} s after it)",
    )
    p.add_argument(
        "--sections",
        default="embed,mae,dinov2",
        help="comma-separated subset of embed,mae,dinov2, run in this order",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time torch.compile'd blocks (auto: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (default inductor; 'eager' walks the code path "
        "through dynamo only)",
    )
    p.add_argument(
        "--recompile-limit",
        type=int,
        default=None,
        help="torch._dynamo.config.recompile_limit for the run (default: torch's, "
        "as the trainer runs)",
    )
    p.add_argument("--embed-model", default=None, help="zoo name (default dinov2-vitl14)")
    p.add_argument("--embed-res", default=None, help="resolutions (default 224,518)")
    p.add_argument(
        "--embed-batch",
        default=None,
        help="batch per resolution, e.g. 224:128,518:32 (the default)",
    )
    p.add_argument(
        "--dino-batch",
        type=int,
        default=None,
        help="images per step (default: the recipe's batch_size_per_rank, 64)",
    )
    p.add_argument(
        "--mae-batch",
        type=int,
        default=None,
        help="images per step (default: the recipe's batch_size_per_rank, 64)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=Path("gpu_check.json"),
        metavar="PATH",
        help="every number (default gpu_check.json; rewritten after each section)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the markdown report here (it always goes to stdout)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.compile = {"on": True, "off": False}.get(
        args.compile, torch.device(args.device).type == "cuda"
    )
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(args.sections) - set(SHARES))
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {','.join(SHARES)}")
    args.embed_model = args.embed_model or ("vit-test-p14" if q else "dinov2-vitl14")
    args.embed_res = [int(s) for s in (args.embed_res or ("28,56" if q else "224,518")).split(",")]
    default_batch = {r: (2 if q else (128 if r <= 256 else 32)) for r in args.embed_res}
    if args.embed_batch:
        for item in args.embed_batch.split(","):
            r, _, b = item.partition(":")
            default_batch[int(r)] = int(b)
    args.embed_batch = default_batch
    if q:
        args.dino_batch = args.dino_batch or 2
        args.mae_batch = args.mae_batch or 2
    args.quick_overrides = {
        "dinov2": [
            "model.name=vit-test-p14",
            "model.img_size=56",
            "data.global_size=56",
            "data.local_size=28",
            "data.n_local=2",
            "method.n_prototypes=64",
            "method.hidden_dim=32",
            "method.bottleneck_dim=16",
            "method.ibot_n_prototypes=64",
        ],
        "mae": [
            "model.name=vit-test-p14",
            "data.global_size=56",
            "method.decoder_embed_dim=32",
            "method.decoder_depth=1",
            "method.decoder_num_heads=2",
        ],
    }
    # time allowances (seconds): what a part needs before it may start, and how long it times
    args.warmup = 2 if q else 3
    args.embed_round_s, args.embed_rounds = (0.0, 2) if q else (1.0, 4)
    args.est_embed_setup = 1.0 if q else 25.0  # build, export, load, agreement check
    args.est_embed_part = 1.0 if q else 12.0
    args.est_compile_embed = 5.0 if q else 60.0
    args.train_part_s = 1.0 if q else 8.0
    args.min_steps, args.max_steps = (2, 5) if q else (5, 100)
    args.est_train_part = 1.0 if q else 12.0
    args.est_compile_train = 5.0 if q else 60.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or --device cpu --quick")
    clock = Clock(args.budget_s)

    def on_alarm(signum, frame):
        raise TimeUp(
            f"watchdog at {time.perf_counter() - START:.0f} s (budget "
            f"{args.budget_s:.0f} s + {WATCHDOG_GRACE_S} s grace)"
        )

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, int(clock.left() + WATCHDOG_GRACE_S)))

    global DYNAMO
    if args.compile:
        from torch import _dynamo

        DYNAMO = DynamoWatch()
        if args.recompile_limit:
            _dynamo.config.recompile_limit = args.recompile_limit
    import transformers

    machine = machine_info(device)
    machine["transformers"] = transformers.__version__
    report = {
        "command": command_line(),
        "machine": machine,
        "budget_s": args.budget_s,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "embed": [],
        "train": [],
        "checks": [],
        "notes": [],
        "sections_s": {},
        "errors": [],
    }
    log(f"machine: {machine}")
    n = 512 if args.quick else 8192
    mm = matmul_rate(device, torch.bfloat16, n, 3 if args.quick else 10)
    peak, source = bf16_peak(device, mm["flops"])
    report["peak"] = {
        "bf16_peak_tflops": peak / 1e12,
        "source": source,
        "matmul_bf16_tflops": mm["flops"] / 1e12,
        "matmul_n": n,
        "matmul": mm,
    }
    log(
        f"bf16 matmul {mm['flops'] / 1e12:.1f} TFLOP/s; MFU peak {peak / 1e12:.1f} TFLOP/s ({source})"
    )

    fns = {
        "embed": lambda dl: section_embed(args, device, dl, peak, report),
        "dinov2": lambda dl: section_train("dinov2", args, device, dl, peak, report),
        "mae": lambda dl: section_train("mae", args, device, dl, peak, report),
    }
    timed_out, name = False, "setup"
    try:
        for i, name in enumerate(args.sections):
            share = SHARES[name] / sum(SHARES[s] for s in args.sections[i:])
            left = clock.left()
            deadline = time.perf_counter() + max(0.0, left) * share
            if left < 10:
                report["notes"].append(f"{name}: skipped, {left:.0f} s left of the budget")
                log(report["notes"][-1])
                continue
            log(f"== {name}: {left * share:.0f} s of {left:.0f} s left")
            t = time.perf_counter()
            try:
                fns[name](deadline)
            except Exception as e:  # one failing section must not lose the others' numbers
                traceback.print_exc()
                report["errors"].append(f"{name}: {type(e).__name__}: {e}")
                report["notes"].append(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})")
            finally:
                report["sections_s"][name] = time.perf_counter() - t
            free(device)
            write_outputs(report, args)
    except TimeUp as e:
        timed_out = True
        report["notes"].append(f"{name}: stopped by the {e}; the sections after it did not run")
        log(report["notes"][-1])
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    text = write_outputs(report, args)
    print(text, flush=True)
    log(
        f"done in {report['elapsed_s']:.0f} s; JSON -> {args.json}"
        + (f", markdown -> {args.markdown}" if args.markdown else "")
    )
    bad = report["errors"] or [c for c in report["checks"] if c.get("ok") is False]
    if timed_out:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # compile workers may still be running: do not wait for them
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
