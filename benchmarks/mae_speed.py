#!/usr/bin/env python
"""What MAE's asymmetric encoder buys: one training step with the encoder on the visible tokens
only, against the same encoder encoding every token with mask tokens (BEiT / SimMIM style).

MAE (He et al. 2021, section 3 and Table 2 "mask token") runs its encoder on the 25% of patches a
75% mask leaves visible and lets a light decoder put mask tokens back; the paper's comparison is
the same encoder with the mask tokens inside it. This script times both, same weights, same
masks, same decoder, same loss:

- **MAE**: ``vssl.methods.mae.MAE`` as the trainer runs it: ``VisionTransformer(ids_keep=...)``
  encodes CLS + the kept patches, ``MAEDecoder`` inserts its mask token at the removed positions
  (``ids_restore``), MSE on the removed patches (``mae_loss``, normalized pixels).
- **all tokens**: the same architecture built with ``mask_token=True``; the encoder gets every
  patch, the 75% removed ones replaced by its mask token (``forward(masks=...)``, iBOT/BEiT's
  path); its CLS + all patch tokens go straight into the same decoder (its embedding, blocks,
  norm and prediction; no mask-token insertion is needed), same loss on the same patches.

One step = forward + backward + AdamW step (``vssl.train.optim.param_groups`` + ``build_optimizer``
with MAE's betas (0.9, 0.95), lr and weight decay set as the trainer sets them). Models:

- ``vitb16-224``: ``mae-vit-b16`` at 224 px (196 patches of 16 px; 49 visible), MAE's decoder
  (512-d, 8 blocks, 16 heads), mask ratio 0.75 -- the paper's ViT-B/16 setting;
- ``cpu-mae32``: the CPU recipe ``cpu_mae32`` (``vit-tiny-p4-32``: 32 px, 4-px patches, 64
  patches, 16 visible; the recipe's 128-d x 4-block decoder), built by ``vssl.pretrain.build_method``.

The two variants are timed in alternating rounds (A B, then B A, ...) so drift on a shared machine
hits both alike; the table gives the best round (and the median); ``--json`` keeps every round.
FLOPs of one step (forward + backward; AdamW's elementwise update is not counted) come from
``torch.utils.flop_counter.FlopCounterMode`` with SDPA's MATH backend forced during the count (the
CPU flash-attention kernel has no FLOP formula, so attention would count as 0); the achieved
FLOP/s is given as a share of this machine's measured matmul rate (``2 n^3`` over the best time of
a square ``torch.matmul``, fp32; bf16 too with ``--precision bf16``), as docs/architecture.md,
Performance asks.

The last line is machine-readable: ``speedup X.XX`` = ViT-B/16-224 step time all-tokens / MAE
(best rounds).

Examples::

    python benchmarks/mae_speed.py                           # both models, CPU (~6 min, 2 cores)
    python benchmarks/mae_speed.py --quick                   # smoke run (tiny batches, ~1 min)
    python benchmarks/mae_speed.py --models cpu-mae32 --batch 64 --json /tmp/mae_speed.json
    python benchmarks/mae_speed.py --device cuda --precision bf16 --batch 64 --iters 10
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vitb16-224", "cpu-mae32")
DEFAULT_BATCH = {"vitb16-224": 8, "cpu-mae32": 128}
QUICK_BATCH = {"vitb16-224": 2, "cpu-mae32": 16}
LR, WEIGHT_DECAY = 1.5e-4, 0.05  # MAE's base lr and weight decay (values do not change the cost)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    """``lscpu``'s model name (else /proc/cpuinfo's, else ``platform.processor()``)."""
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            sms=props.multi_processor_count,
        )
    return info


def command_line() -> str:
    """The exact command that ran, with the script path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO_ROOT)
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5
) -> dict:
    """FLOP/s of a square ``n x n`` matmul (``2 n^3`` FLOPs over the best of ``reps`` timings).
    On CUDA, fp32 follows torch's TF32 setting (off by default: plain fp32)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up: allocation, kernel choice
        sync(device)
        for _ in range(max(1, reps)):
            t = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t)
    del a, b
    return {
        "flops": 2 * n**3 / best,
        "n": n,
        "reps": reps,
        "best_s": best,
        "dtype": str(dtype).replace("torch.", ""),
    }


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` (a forward + backward) as FlopCounterMode counts them, SDPA forced onto
    its MATH backend so that attention is decomposed into counted matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def make_optimizer(method, lr: float = LR, weight_decay: float = WEIGHT_DECAY):
    """AdamW over ``method.student`` as the trainer builds it (MAE: no layer decay), with this
    lr / weight decay applied through the groups' multipliers."""
    from vssl.train.optim import build_optimizer, param_groups

    backbone = method.student["backbone"]
    groups = param_groups(method.student, num_layers=len(backbone.blocks), layer_decay=1.0)
    opt = build_optimizer(groups, betas=(0.9, 0.95))
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_multiplier"]
        g["weight_decay"] = weight_decay * g["wd_multiplier"]
    return opt


# ------------------------------------------------------------------------------------ models
def all_tokens_loss(method, batch: dict) -> torch.Tensor:
    """MAE's loss with the encoder on every token: the removed patches are replaced by the
    encoder's mask token (``masks=``), and the decoder gets all of its tokens already in place."""
    from vssl.methods.mae import mae_loss

    backbone, decoder = method.student["backbone"], method.student["decoder"]
    images = batch["image"]
    out = backbone(images, masks=batch["mask_bool"], is_training=True)
    tokens = torch.cat((out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]), 1)
    x = decoder.decoder_embed(tokens)
    x = x + decoder.decoder_pos_embed.to(x.dtype)
    for blk in decoder.decoder_blocks:
        x = blk(x)
    pred = decoder.decoder_pred(decoder.decoder_norm(x))[:, 1:]
    return mae_loss(
        images, pred, batch["mask"], backbone.config.patch_size, method.cfg.norm_pix_loss
    )


def build_pair(key: str):
    """``(mae_method, all_tokens_method, description)``: the same architecture and weights; the
    second encoder also has a mask token (``mask_token=True``)."""
    from vssl.methods.mae import MAE, MAEConfig

    if key == "vitb16-224":
        from vssl.models.zoo import create_model

        cfg = MAEConfig(
            mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
        )
        torch.manual_seed(0)
        mae = MAE(create_model("mae-vit-b16", random_init=True), cfg)
        alltok = MAE(create_model("mae-vit-b16", random_init=True, mask_token=True), cfg)
        desc = "mae-vit-b16 @ 224, decoder 512-d x 8"
    elif key == "cpu-mae32":
        from vssl.pretrain import build_method
        from vssl.train.config import load_recipe

        torch.manual_seed(0)
        recipe = load_recipe("cpu_mae32")
        mae, _ = build_method(recipe)
        alltok, _ = build_method(load_recipe("cpu_mae32", ["model.mask_token=true"]))
        c = recipe.method
        cfg = c
        desc = (
            f"cpu_mae32 ({recipe.model.name} @ {recipe.data.global_size}), decoder "
            f"{c.decoder_embed_dim}-d x {c.decoder_depth}"
        )
    else:
        raise SystemExit(f"unknown model {key!r}: choose from {', '.join(MODELS)}")
    # same weights in both (the all-tokens encoder's mask token is its only extra parameter)
    missing, unexpected = alltok.load_state_dict(mae.state_dict(), strict=False)
    if unexpected or any(not k.endswith("backbone.mask_token") for k in missing):
        raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        alltok.student["backbone"].mask_token.normal_(std=0.02)
    return mae, alltok, desc, cfg.mask_ratio


def make_batch(method, batch_size: int, mask_ratio: float, device: torch.device) -> dict:
    """Normalized random images and one MAE random mask per image (both variants use it)."""
    from vssl.data.masking import random_masking

    bcfg = method.student["backbone"].config
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, bcfg.in_chans, bcfg.img_size, bcfg.img_size, generator=g)
    ids_keep, ids_restore, mask = random_masking(
        batch_size, bcfg.num_patches, mask_ratio, generator=g
    )
    batch = {
        "image": images,
        "ids_keep": ids_keep,
        "ids_restore": ids_restore,
        "mask": mask,
        "mask_bool": mask.bool(),
    }
    return {k: v.to(device) for k, v in batch.items()}


class TrainStep:
    """One optimizer step of a variant: zero grads, forward (autocast), backward, AdamW."""

    def __init__(self, method, loss_fn, batch: dict, device: torch.device, precision: str):
        self.method, self.loss_fn, self.batch = method, loss_fn, batch
        self.device, self.precision = device, precision
        self.opt = make_optimizer(method)

    def loss(self) -> torch.Tensor:
        with autocast_ctx(self.device, self.precision):
            return self.loss_fn(self.method, self.batch)

    def forward_backward(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        return loss

    def __call__(self) -> torch.Tensor:
        loss = self.forward_backward()
        self.opt.step()
        return loss


def time_alternating(
    steps: dict, device: torch.device, *, warmup: int, rounds: int, iters: int
) -> dict:
    """Warm each step up, then ``rounds`` rounds of ``iters`` steps each, alternating the order
    (A B, B A, ...); seconds per step of every round, per variant."""
    mem = {}
    for name, step in steps.items():
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(warmup):
            loss = step()
        sync(device)
        if device.type == "cuda":
            mem[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        log(f"    warm-up {name}: {warmup} step(s), loss {float(loss.detach()):.4f}")
    samples: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            sync(device)
            samples[name].append((time.perf_counter() - t) / iters)
        log(
            f"    round {r + 1}/{rounds} ({iters} step(s) each): "
            + ", ".join(f"{k} {samples[k][-1] * 1e3:.1f} ms/step" for k in order)
        )
    return {
        k: {
            "best_s": min(v),
            "median_s": statistics.median(v),
            "rounds_s": v,
            "iters_per_round": iters,
            "peak_step_mem_gib": mem.get(k),
        }
        for k, v in samples.items()
    }


def run_model(key: str, batch_size: int, args, device: torch.device, peak: float) -> dict:
    from vssl.methods.mae import MAE

    mae, alltok, desc, mask_ratio = build_pair(key)
    mae.to(device).train()
    alltok.to(device).train()
    bcfg = mae.student["backbone"].config
    batch = make_batch(mae, batch_size, mask_ratio, device)
    n_keep = batch["ids_keep"].shape[1]
    log(f"\n== {key}: {desc}, batch {batch_size}, {bcfg.num_patches} patches, {n_keep} visible")
    steps = {
        "mae": TrainStep(
            mae, lambda m, b: MAE.forward(m, b)["loss"], batch, device, args.precision
        ),
        "all_tokens": TrainStep(alltok, all_tokens_loss, batch, device, args.precision),
    }
    flops = {}
    for name, step in steps.items():
        flops[name] = count_flops(step.forward_backward)
        step.opt.zero_grad(set_to_none=True)
        log(f"  {name}: {flops[name] / 1e9:.2f} GFLOP per step (forward + backward)")
    timing = time_alternating(
        steps, device, warmup=args.warmup, rounds=args.rounds, iters=args.iters
    )
    rows = []
    for name in ("mae", "all_tokens"):
        t = timing[name]
        rate = flops[name] / t["best_s"]
        rows.append(
            {
                "model": key,
                "desc": desc,
                "variant": name,
                "batch": batch_size,
                "img_size": bcfg.img_size,
                "patches": bcfg.num_patches,
                "encoder_tokens": 1 + (n_keep if name == "mae" else bcfg.num_patches),
                "step_s_best": t["best_s"],
                "step_s_median": t["median_s"],
                "images_per_s": batch_size / t["best_s"],
                "gflop_per_step": flops[name] / 1e9,
                "gflops": rate / 1e9,
                "pct_matmul": 100 * rate / peak,
                "peak_step_mem_gib": t["peak_step_mem_gib"],
                "rounds_s": t["rounds_s"],
            }
        )
    speed = {
        "best": timing["all_tokens"]["best_s"] / timing["mae"]["best_s"],
        "median": timing["all_tokens"]["median_s"] / timing["mae"]["median_s"],
        "flops": flops["all_tokens"] / flops["mae"],
    }
    log(
        f"  all tokens / MAE step time: {speed['best']:.2f} (best rounds), {speed['median']:.2f} "
        f"(medians); FLOP ratio {speed['flops']:.2f}"
    )
    del steps, mae, alltok, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "speedup": speed, "flops": flops, "timing": timing}


# ------------------------------------------------------------------------------------ report
def render(report: dict) -> str:
    m, mm = report["machine"], report["matmul"]
    peak_name = "bf16" if report["args"]["precision"] == "bf16" else "fp32"
    where = (
        f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB), CUDA {m.get('cuda')}; host "
        if "gpu" in m
        else ""
    )
    lines = [
        "## MAE training step: encoder on visible tokens vs all tokens with mask tokens",
        "",
        f"Command: `{report['command']}`  ",
        (
            f"Machine: {where}{m['cpu']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} "
            f"logical), {m['threads']} torch threads; torch {m['torch']}, Python {m['python']}; "
            f"{m['date']}  "
        ),
        "Matmul rate: "
        + ", ".join(
            f"{k} {v['flops'] / 1e9:,.1f} GFLOP/s ({v['n']}^3, best of {v['reps']})"
            for k, v in mm.items()
        )
        + f"; the % column is over the {peak_name} rate.  ",
        (
            f"Precision: {report['args']['precision']}; one step = forward + backward + AdamW; "
            f"{report['args']['rounds']} alternating rounds of {report['args']['iters']} step(s), "
            "best round (median in brackets)."
        ),
        "",
        (
            "| model | variant | batch | encoder tokens | step time, s | images/s | GFLOP/step | "
            "GFLOP/s | % of matmul | all tokens / MAE |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in report["results"].values():
        sp = res["speedup"]
        for r in res["rows"]:
            label = "MAE (visible only)" if r["variant"] == "mae" else "all tokens + mask tokens"
            ratio = (
                f"**{sp['best']:.2f}** ({sp['median']:.2f}); FLOPs {sp['flops']:.2f}"
                if r["variant"] == "all_tokens"
                else "1.00"
            )
            lines.append(
                f"| {r['desc']} | {label} | {r['batch']} | {r['encoder_tokens']} | "
                f"{r['step_s_best']:.3f} ({r['step_s_median']:.3f}) | {r['images_per_s']:.1f} | "
                f"{r['gflop_per_step']:.1f} | {r['gflops']:.1f} | {r['pct_matmul']:.1f} | "
                f"{ratio} |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::")[-1],
    )
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: both)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="steps per variant per round (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="alternating rounds (default 4; 2 with --quick)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"batch size for every model (default: {DEFAULT_BATCH}; --quick: {QUICK_BATCH})",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32, or bf16 autocast (the %% column is then over the bf16 matmul rate)",
    )
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="n of the n x n matmul that measures the peak (default 2048 on CPU, "
        "8192 on CUDA; 1024 with --quick)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: usable cores)"
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write every number here"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny batches, 2 rounds of 1 step, small matmul",
    )
    args = p.parse_args(argv)
    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    if args.iters is None:
        args.iters = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 2 if args.quick else 4
    for k in ("iters", "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates optimizer state)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count() or 1
        torch.set_num_threads(args.threads or usable)
    t0 = time.perf_counter()
    machine = machine_info(device)
    log(f"machine: {machine}")
    n = args.matmul_size or (1024 if args.quick else (8192 if device.type == "cuda" else 2048))
    matmul = {"fp32": matmul_rate(device, torch.float32, n, 3 if args.quick else 5)}
    if args.precision == "bf16":
        matmul["bf16"] = matmul_rate(device, torch.bfloat16, n, 3 if args.quick else 5)
    peak = matmul["bf16" if args.precision == "bf16" else "fp32"]["flops"]
    log("matmul: " + ", ".join(f"{k} {v['flops'] / 1e9:.1f} GFLOP/s" for k, v in matmul.items()))

    results = {}
    for key in args.models:
        batch = args.batch or (QUICK_BATCH if args.quick else DEFAULT_BATCH)[key]
        results[key] = run_model(key, batch, args, device, peak)

    report = {
        "command": command_line(),
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "matmul": matmul,
        "results": results,
        "elapsed_s": time.perf_counter() - t0,
    }
    print(render(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"every number -> {args.json}")
    if "vitb16-224" in results:
        print(f"speedup {results['vitb16-224']['speedup']['best']:.2f}", flush=True)
    else:
        print("speedup n/a (vitb16-224 not measured)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
