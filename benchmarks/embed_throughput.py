#!/usr/bin/env python
"""Inference throughput of vssl's ViT, measured against the machine's own matmul limit.

One run, same random weights everywhere, measures:

(a) forward images/s of ``vssl.VisionTransformer`` and of ``transformers``' ``Dinov2Model`` (the
    same weights, exported with ``vssl.export_hf`` and loaded with ``attn_implementation="sdpa"``;
    their outputs are checked to agree within 1e-4 before any timing), fp32, for ViT-S/14 and
    ViT-B/14 at 224 and ViT-B/14 at 518. Every number is also given as achieved FLOP/s over the
    machine's measured matmul FLOP/s (docs/architecture.md, Performance): model FLOPs per image come from
    ``vit_forward_flops`` (analytic, cross-checked against ``torch.utils.flop_counter``).
(b) the same under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (both implementations), plus
    vssl with its weights cast to bf16 (``model.to(torch.bfloat16)``); the bf16 matmul FLOP/s is
    measured too, for reference.
(c) end-to-end ``vssl.embed.embed_images`` (JPEG decode + eval transform in DataLoader workers,
    forward, writing the outputs) over real photos, against the model-only images/s at the same
    batch size.

vssl and transformers are timed in alternating rounds (A B, then B A, ...) so that drift on a
shared machine hits both alike; the table reports the best round (the JSON has every round).

Examples::

    python benchmarks/embed_throughput.py                       # the full run (~10 min, 2 cores)
    python benchmarks/embed_throughput.py --quick               # smoke run, tiny iteration counts
    python benchmarks/embed_throughput.py --models vits14-224 --json /tmp/bench.json
    python benchmarks/embed_throughput.py --models dinov2-vitl14@224 --precisions fp32 --skip-embed
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "imagenet-samples"

# alias -> (zoo name, resolution)
ALIASES = {
    "vits14-224": ("dinov2-vits14", 224),
    "vitb14-224": ("dinov2-vitb14", 224),
    "vitb14-518": ("dinov2-vitb14", 518),
}
DEFAULT_MODELS = "vits14-224,vitb14-224,vitb14-518"
DEFAULT_EMBED_MODELS = "vits14-224,vitb14-224"
PRECISIONS = ("fp32", "bf16", "bf16w", "fp32c")  # fp32c: torch.compile, fp32 (opt-in)
AGREE_TOL = 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ FLOPs
def vit_forward_flops(cfg, img_size: int | None = None) -> dict:
    """Analytic FLOPs of one image through a vssl ViT forward (2 FLOPs per multiply-accumulate).

    With ``P = (img_size // patch)**2`` patches, ``N = P + 1 + registers`` tokens (CLS included),
    width ``D``, depth ``L`` and FFN hidden width ``H`` (``cfg.ffn_hidden_dim``), the MACs are

    - patch embedding (a conv with stride = kernel = patch): ``P * (C * patch**2) * D``
    - per block: qkv ``N * D * 3D`` + output projection ``N * D * D``
      + attention scores ``Q K^T`` ``N * N * D`` + weighted values ``A V`` ``N * N * D``
      (summed over heads: heads * N * N * D/heads)
      + FFN: GELU MLP ``2 * N * D * H`` (fc1, fc2), SwiGLU ``3 * N * D * H`` (w12 is D -> 2H, w3)

    and FLOPs = 2 * MACs. Bias adds, LayerNorm, softmax, GELU, residuals and LayerScale are
    elementwise and left out (as ``torch.utils.flop_counter`` does); the final norm and token
    selection cost nothing here either. Returns a dict: ``total`` and the per-part breakdown.
    """
    img = int(img_size or cfg.img_size)
    p, D, L, H = cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.ffn_hidden_dim
    P = (img // p) ** 2
    N = P + 1 + cfg.num_register_tokens
    ffn_macs = (3 if cfg.ffn == "swiglu" else 2) * N * D * H
    macs = {
        "patch_embed": P * cfg.in_chans * p * p * D,
        "qkv": L * N * D * 3 * D,
        "proj": L * N * D * D,
        "attn_qk": L * N * N * D,
        "attn_av": L * N * N * D,
        "ffn": L * ffn_macs,
    }
    flops = {k: 2 * v for k, v in macs.items()}
    flops["total"] = sum(flops.values())
    flops["tokens"] = N
    return flops


def flop_counter_check(model, img_size: int) -> dict:
    """FLOPs of a batch-1 forward as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    On CPU, SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which the counter
    has no formula for (it counts attention as 0), so the count is taken twice: with the default
    kernel, and with the MATH backend forced, which decomposes attention into counted ``bmm`` s.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, model.config.in_chans, img_size, img_size)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            model(x)
        out["default_sdpa"] = int(fc.get_total_flops())
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(x)
        out["math_sdpa"] = int(fc.get_total_flops())
        out["math_sdpa_by_op"] = {str(k): int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    return out


# ------------------------------------------------------------------------------------ machine
def cpu_info() -> dict:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "cpu": model or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "isa": isa,
    }


def matmul_flops(dtype: torch.dtype, sizes: list[int], budget_s: float, min_reps: int) -> dict:
    """Best-of FLOP/s of square ``torch.matmul`` (2 n^3 FLOPs) per size; ``best`` over sizes."""
    res = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        with torch.inference_mode():
            torch.matmul(a, b)  # warm-up (allocations, kernel selection)
            times, start = [], time.perf_counter()
            while len(times) < min_reps or time.perf_counter() - start < budget_s:
                t = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t)
                if len(times) >= 50:
                    break
        res[n] = {"flops": 2 * n**3 / min(times), "reps": len(times), "best_s": min(times)}
        del a, b
    best_n = max(res, key=lambda k: res[k]["flops"])
    return {"sizes": res, "best": res[best_n]["flops"], "best_size": best_n}


# ------------------------------------------------------------------------------------ models
def parse_models(spec: str) -> list[tuple[str, str, int]]:
    """``alias`` or ``zoo-name@res`` -> [(key, zoo name, resolution)]."""
    from vssl import list_models
    from vssl.models.zoo import get_config

    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in ALIASES:
            name, res = ALIASES[item]
        else:
            name, _, res_s = item.partition("@")
            if name not in list_models():
                raise SystemExit(
                    f"unknown model {item!r}: use one of {sorted(ALIASES)} or ZOO_NAME@RES "
                    "(`vssl models` lists the zoo names)"
                )
            res = int(res_s) if res_s else get_config(name).img_size
        cfg = get_config(name)
        if res % cfg.patch_size:
            raise SystemExit(
                f"{item}: resolution {res} is not a multiple of patch {cfg.patch_size}"
            )
        out.append((item, name, res))
    if not out:
        raise SystemExit("--models selects nothing")
    return out


def build_hf(model, tmpdir: str):
    """The same weights as a transformers model (SDPA attention), via ``vssl.export_hf``."""
    import transformers

    from vssl import export_hf

    transformers.utils.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    cfg = model.config
    if cfg.family != "dinov2":
        raise ValueError(f"transformers comparison needs a DINOv2-family model, got {cfg.family}")
    export_hf(model, tmpdir)
    cls = (
        transformers.Dinov2WithRegistersModel
        if cfg.num_register_tokens
        else transformers.Dinov2Model
    )
    hf = cls.from_pretrained(tmpdir, attn_implementation="sdpa")
    return hf.eval()


def vssl_sequence(model, x):
    """vssl's normalized tokens (CLS, registers, patches), comparable to last_hidden_state."""
    return model.norm(model.forward_features(x)["x_prenorm"])


def check_agreement(model, hf, img_size: int, bf16: bool) -> dict:
    """Max |vssl - transformers| over the whole normalized token sequence of a random batch.

    fp32 always; with ``bf16`` also under bf16 autocast (informational: bf16 rounding makes the
    two differ by ~1e-2, as vssl bf16 differs from vssl fp32).
    """
    g = torch.Generator().manual_seed(1)
    n = 1 if img_size >= 448 else 2  # the 518-px forwards are expensive on CPU
    x = torch.randn(n, model.config.in_chans, img_size, img_size, generator=g)
    out = {}
    with torch.inference_mode():
        a = vssl_sequence(model, x).float()
        b = hf(pixel_values=x).last_hidden_state.float()
        out["fp32"] = {
            "max_abs_diff": float((a - b).abs().max()),
            "shape": list(a.shape),
            "max_abs_value": float(a.abs().max()),
        }
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a16 = vssl_sequence(model, x).float()
                b16 = hf(pixel_values=x).last_hidden_state.float()
            out["bf16"] = {
                "max_abs_diff": float((a16 - b16).abs().max()),
                "vssl_bf16_vs_fp32_max_abs_diff": float((a16 - a).abs().max()),
                "hf_bf16_vs_fp32_max_abs_diff": float((b16 - b).abs().max()),
            }
    return out


# ------------------------------------------------------------------------------------ timing
def make_runner(kind: str, module, x: torch.Tensor, autocast_bf16: bool):
    """A callable running ``n`` forwards (inside one inference_mode/autocast region)."""

    def run(n: int) -> list[float]:
        ctx = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if autocast_bf16
            else contextlib.nullcontext()
        )
        times = []
        with torch.inference_mode(), ctx:
            for _ in range(n):
                t = time.perf_counter()
                if kind == "hf":
                    module(pixel_values=x)
                else:
                    module(x)
                times.append(time.perf_counter() - t)
        return times

    return run


def measure_interleaved(
    runners: dict,
    batch: int,
    *,
    warmup: int,
    warmup_s: float,
    rounds: int,
    round_s: float,
    max_iters: int,
) -> dict:
    """Warm every runner up, then ``rounds`` rounds alternating their order (A B, B A, ...).

    Every runner gets the same number of iterations per round, chosen from the slowest warm-up
    iteration so a round lasts about ``round_s`` (at least one iteration). images/s per round =
    batch * iterations / wall time of the round.
    """
    last = {}
    for name, run in runners.items():
        start, times = time.perf_counter(), []
        while len(times) < warmup or time.perf_counter() - start < warmup_s:
            times += run(1)
        last[name] = times[-1]
        log(f"    warm-up {name}: {len(times)} it, last {times[-1]:.3f} s/it")
    t_it = max(last.values())
    iters = max(1, min(max_iters, int(round(round_s / t_it)) if t_it > 0 else max_iters))
    samples: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        seq = order if r % 2 == 0 else order[::-1]
        for name in seq:
            t = time.perf_counter()
            runners[name](iters)
            dt = time.perf_counter() - t
            samples[name].append(batch * iters / dt)
        log(
            f"    round {r + 1}/{rounds} ({iters} it each): "
            + ", ".join(f"{k} {samples[k][-1]:.2f} img/s" for k in order)
        )
    return {
        k: {"best": max(v), "median": statistics.median(v), "samples": v, "iters_per_round": iters}
        for k, v in samples.items()
    }


# ------------------------------------------------------------------------------------ embed
def run_embed(
    model,
    images: Path,
    batch: int,
    repeat: int,
    max_images: int | None,
    num_workers: int | None,
    runs: int = 3,
) -> dict:
    """Best of ``runs`` end-to-end runs: the same statistic as the model-only rows (best of
    rounds), so machine noise does not favour either side of the e2e / model-only ratio."""
    from vssl.embed import embed_images, list_inputs

    items = list_inputs(images)
    if max_images:
        items = items[:max_images]
    if not items:
        raise SystemExit(f"no images in {images}")
    items = items * max(1, repeat)
    results = []
    for _ in range(max(1, runs)):
        with tempfile.TemporaryDirectory(prefix="vssl-bench-embed-") as tmp:
            results.append(
                embed_images(
                    model,
                    items,
                    tmp,
                    batch_size=batch,
                    num_workers=num_workers,
                    device="cpu",
                    progress=False,
                )
            )
    res = max(results, key=lambda r: r.images_per_s)
    return {
        "images_per_s": res.images_per_s,
        "seconds": res.seconds,
        "num_inputs": res.num_inputs,
        "num_embedded": res.num_embedded,
        "num_skipped": res.num_skipped,
        "num_workers": num_workers,
        "all_images_per_s": [r.images_per_s for r in results],
    }


# ------------------------------------------------------------------------------------ report
def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def render(report: dict) -> str:
    m = report["machine"]
    mm = report["matmul"]
    lines = [
        "## vssl inference throughput",
        "",
        f"machine: {m['cpu']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical), "
        f"torch.set_num_threads({m['threads']}), ISA: {' '.join(m['isa']) or '?'}; "
        f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}; {m['date']}",
        "",
    ]
    for key in ("fp32", "bf16"):
        if key in mm:
            sizes = ", ".join(f"{n}: {v['flops'] / 1e9:.1f}" for n, v in mm[key]["sizes"].items())
            lines.append(
                f"- {key} matmul peak: {mm[key]['best'] / 1e9:.1f} GFLOP/s "
                f"(best-of per size n, GFLOP/s: {sizes})"
            )
    lines.append("")
    for c in report["checks"]:
        line = f"- {c['model']}: GFLOP/img formula {c['flops_formula'] / 1e9:.3f}"
        fc = c.get("flop_counter")
        if fc:
            rel = fc["math_sdpa"] / c["flops_formula"] - 1
            line += (
                f", FlopCounterMode {fc['math_sdpa'] / 1e9:.3f} with MATH sdpa "
                f"({rel:+.2e} rel.), {fc['default_sdpa'] / 1e9:.3f} with the default CPU "
                "flash kernel (attention not counted)"
            )
        ag = c.get("agree_fp32")
        if ag:
            ok = "OK" if ag["max_abs_diff"] <= AGREE_TOL else "MISMATCH"
            line += (
                f"; vssl vs transformers fp32 max|diff| {ag['max_abs_diff']:.2e} "
                f"({ok}, tol {AGREE_TOL:g})"
            )
        ab = c.get("agree_bf16")
        if ab:
            line += (
                f"; bf16 autocast vssl vs transformers max|diff| {ab['max_abs_diff']:.2e} "
                f"(bf16 vs fp32: vssl {ab['vssl_bf16_vs_fp32_max_abs_diff']:.2e}, "
                f"transformers {ab['hf_bf16_vs_fp32_max_abs_diff']:.2e})"
            )
        lines.append(line)
    lines += [
        "",
        "| model | res | precision | impl | batch | images/s | model GFLOP/img | achieved TFLOP/s "
        "| % of matmul peak | ratio vs transformers | notes |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['res']} | {r['precision']} | {r['impl']} | {r['batch']} "
            f"| {r['images_per_s']:.2f} | {r['gflop_per_img']:.2f} | {r['tflops']:.4f} "
            f"| {fmt(r['pct_peak'], '.1f')} | {fmt(r['ratio_vs_hf'], '.2f')} | {r['notes']} |"
        )
    lines += [
        "",
        "images/s: best of the alternating rounds (median in --json); % of matmul peak: against "
        "the fp32 matmul peak for fp32 rows, the bf16 matmul peak for bf16 rows. fp32 = fp32 "
        "weights and math; bf16 = torch.autocast(cpu, bfloat16) over fp32 weights; bf16w = "
        "weights cast with model.to(torch.bfloat16). e2e = vssl.embed.embed_images over real "
        "JPEGs (decode + transform in DataLoader workers + forward + writing outputs).",
    ]
    if report["summary"]:
        lines += ["", "### ratios", ""] + [f"- {s}" for s in report["summary"]]
    lines += ["", f"total benchmark time: {report['elapsed_s']:.0f} s"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints a markdown table to stdout (progress on "
        "stderr).",
        epilog="""\
models: aliases vits14-224 (dinov2-vits14 at 224), vitb14-224, vitb14-518, or any DINOv2-family
zoo name with a resolution, e.g. dinov2-vitl14@224 (random weights, vssl.create_model(name,
random_init=True, img_size=res)).

precisions: fp32; bf16 = torch.autocast("cpu", dtype=torch.bfloat16) over fp32 weights (vssl and
transformers); bf16w = vssl with model.to(torch.bfloat16) (vssl only); fp32c = torch.compile
of both (opt-in: compilation takes ~20-40 s per model). On a CPU without
avx512_bf16/AMX, bf16 matmuls are emulated and much slower than fp32: drop bf16 with
--precisions fp32 to save time.

The full default run takes ~10 minutes on 2 cores; --quick is a smoke run (small batches, 1
iteration per round, small matmuls, 8 embed images, ViT-S only unless --models is given) that
only shows the script works.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset (default {DEFAULT_MODELS}; vits14-224 alone with --quick)",
    )
    p.add_argument(
        "--precisions",
        default="fp32,bf16,bf16w",
        help="comma-separated subset of fp32,bf16,bf16w,fp32c (default fp32,bf16,bf16w; "
        "fp32c = torch.compile of both implementations)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny batches and iteration counts (numbers are not meaningful)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: the number of usable cores)",
    )
    p.add_argument(
        "--batch-size-224",
        type=int,
        default=None,
        help="batch for models below 518 px (default 8; 2 with --quick). Throughput on "
        "CPU is flat beyond ~8 images of 257 tokens",
    )
    p.add_argument(
        "--batch-size-518",
        type=int,
        default=None,
        help="batch for models at 518 px and above (default 1: 1370 tokens already "
        "make large GEMMs, and a bf16 iteration is slow on CPUs without native bf16)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternating timing rounds per precision (default 2: vssl hf, hf vssl)",
    )
    p.add_argument(
        "--round-seconds",
        type=float,
        default=None,
        help="target seconds per implementation per round (default 4; at least one iteration)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="minimum warm-up iterations per implementation (default 1)",
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="keep warming up until this many seconds (default 2)",
    )
    p.add_argument(
        "--matmul-sizes",
        default=None,
        help="square matmul sizes for the FLOP/s peak (default 1024,2048,4096)",
    )
    p.add_argument("--skip-hf", action="store_true", help="no transformers comparison")
    p.add_argument(
        "--flop-check",
        choices=("first", "all", "none"),
        default="first",
        help="cross-check the FLOP formula with FlopCounterMode (two batch-1 forwards) "
        "for the first model (default), every model, or none",
    )
    p.add_argument("--skip-embed", action="store_true", help="no end-to-end embed_images timing")
    p.add_argument(
        "--embed-models",
        default=DEFAULT_EMBED_MODELS,
        help=f"which of --models also get the end-to-end embed timing (default "
        f"{DEFAULT_EMBED_MODELS}; 'all' for every model)",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=DEFAULT_IMAGES,
        help=f"folder / .txt list of images for the embed timing (default {DEFAULT_IMAGES})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="embed the image list this many times over (longer, steadier timing)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use only the first N images (default all; 8 with --quick)",
    )
    p.add_argument(
        "--embed-runs",
        type=int,
        default=3,
        help="end-to-end embed runs; the best is reported, like the model-only rounds",
    )
    p.add_argument(
        "--embed-workers",
        type=int,
        default=None,
        help="embed_images num_workers (default: embed_images' own default)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="dump raw numbers here")
    args = p.parse_args(argv)

    q = args.quick
    defaults = {
        "batch_size_224": 2 if q else 8,
        "batch_size_518": 1,
        "rounds": 2,
        "round_seconds": 0.0 if q else 4.0,
        "warmup": 1,
        "warmup_seconds": 0.0 if q else 2.0,
        "max_images": 8 if q else None,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.models is None:
        args.models = "vits14-224" if q else DEFAULT_MODELS
    if args.matmul_sizes is None:
        args.matmul_sizes = "512,1024" if q else "1024,2048,4096"
    args.matmul_sizes = [int(s) for s in args.matmul_sizes.split(",") if s.strip()]
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    bad = sorted(set(args.precisions) - set(PRECISIONS))
    if bad:
        p.error(f"unknown precisions {bad}; choose from {','.join(PRECISIONS)}")
    for k in ("batch_size_224", "batch_size_518", "rounds", "warmup", "repeat"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    info = cpu_info()
    threads = args.threads or info["usable_cpus"]
    torch.set_num_threads(threads)
    import transformers

    import vssl

    machine = {
        **info,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vssl": vssl.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    log(f"machine: {machine}")
    models = parse_models(args.models)
    embed_keys = (
        {k for k, _, _ in models}
        if args.embed_models.strip() == "all"
        else {s.strip() for s in args.embed_models.split(",")}
    )
    want_bf16 = any(pr in args.precisions for pr in ("bf16", "bf16w"))

    # -- matmul peak ---------------------------------------------------------------------------
    matmul = {}
    budget = 0.3 if args.quick else 1.5
    log(f"matmul FLOP/s, sizes {args.matmul_sizes} ...")
    matmul["fp32"] = matmul_flops(torch.float32, args.matmul_sizes, budget, 2 if args.quick else 3)
    log(f"  fp32 peak {matmul['fp32']['best'] / 1e9:.1f} GFLOP/s")
    if want_bf16:
        matmul["bf16"] = matmul_flops(torch.bfloat16, args.matmul_sizes, budget, 2)
        log(f"  bf16 peak {matmul['bf16']['best'] / 1e9:.1f} GFLOP/s")

    rows, checks, measurements, embeds, summary = [], [], [], [], []
    timing = dict(
        warmup=args.warmup,
        warmup_s=args.warmup_seconds,
        rounds=args.rounds,
        round_s=args.round_seconds,
        max_iters=100,
    )

    for key, name, res in models:
        batch = args.batch_size_518 if res >= 518 else args.batch_size_224
        log(f"\n== {key}: {name} @ {res}, batch {batch}")
        torch.manual_seed(0)
        model = vssl.create_model(name, random_init=True, img_size=res).eval()
        cfg = model.config
        flops = vit_forward_flops(cfg, res)
        gflop = flops["total"] / 1e9
        check = {
            "model": key,
            "zoo_name": name,
            "res": res,
            "flops_formula": flops["total"],
            "flops_breakdown": flops,
        }
        log(f"  formula: {gflop:.3f} GFLOP/img ({flops['tokens']} tokens)")
        if args.flop_check == "all" or (args.flop_check == "first" and key == models[0][0]):
            fc = flop_counter_check(model, res)
            check["flop_counter"] = fc
            log(
                f"  FlopCounterMode: {fc['math_sdpa'] / 1e9:.3f} GFLOP (MATH sdpa), "
                f"{fc['default_sdpa'] / 1e9:.3f} GFLOP (default CPU sdpa kernel, attention "
                f"uncounted); formula - counter = {flops['total'] - fc['math_sdpa']}"
            )

        hf = None
        tmp_ctx = tempfile.TemporaryDirectory(prefix="vssl-bench-hf-")
        if not args.skip_hf and cfg.family != "dinov2":
            log(f"  no transformers comparison for a {cfg.family!r}-family model (DINOv2 only)")
        elif not args.skip_hf:
            hf = build_hf(model, tmp_ctx.name)
            agree = check_agreement(model, hf, res, bf16="bf16" in args.precisions)
            ag = check["agree_fp32"] = agree["fp32"]
            status = "OK" if ag["max_abs_diff"] <= AGREE_TOL else "MISMATCH"
            log(
                f"  vssl vs transformers fp32: max|diff| {ag['max_abs_diff']:.3e} over "
                f"{ag['shape']} ({status}, tol {AGREE_TOL:g})"
            )
            if status != "OK":
                log("  WARNING: outputs disagree; the timings below compare different computations")
            if "bf16" in agree:
                ab = check["agree_bf16"] = agree["bf16"]
                log(
                    f"  bf16 autocast: vssl vs transformers max|diff| {ab['max_abs_diff']:.3e}, "
                    f"vssl bf16 vs fp32 {ab['vssl_bf16_vs_fp32_max_abs_diff']:.3e}"
                )
        checks.append(check)

        x = torch.randn(batch, cfg.in_chans, res, res, generator=torch.Generator().manual_seed(2))
        best: dict[tuple[str, str], float] = {}
        for prec in args.precisions:
            runners = {}
            if prec == "bf16w":
                m16 = copy.deepcopy(model).to(torch.bfloat16)
                runners["vssl"] = make_runner("vssl", m16, x.to(torch.bfloat16), False)
            elif prec == "fp32c":  # both compiled: the first warm-up call pays the compilation
                runners["vssl"] = make_runner("vssl", torch.compile(model), x, False)
                if hf is not None:
                    runners["transformers"] = make_runner("hf", torch.compile(hf), x, False)
            else:
                ac = prec == "bf16"
                runners["vssl"] = make_runner("vssl", model, x, ac)
                if hf is not None:
                    runners["transformers"] = make_runner("hf", hf, x, ac)
            log(f"  [{prec}] timing {', '.join(runners)} ...")
            res_t = measure_interleaved(runners, batch, **timing)
            for impl, r in res_t.items():
                best[(prec, impl)] = r["best"]
                measurements.append(
                    {
                        "model": key,
                        "zoo_name": name,
                        "res": res,
                        "batch": batch,
                        "precision": prec,
                        "impl": impl,
                        **r,
                    }
                )
            if prec == "bf16w":
                del m16, runners

        fp32_peak = matmul["fp32"]["best"]
        for prec in args.precisions:
            peak = fp32_peak if prec in ("fp32", "fp32c") else matmul["bf16"]["best"]
            for impl in ("vssl", "transformers"):
                if (prec, impl) not in best:
                    continue
                ips = best[(prec, impl)]
                achieved = ips * flops["total"]
                hf_ips = best.get((prec, "transformers"))
                notes = []
                if prec != "fp32" and ("fp32", impl) in best:
                    notes.append(f"x{ips / best[('fp32', impl)]:.2f} of fp32")
                if prec == "bf16w" and ("bf16", "vssl") in best:
                    notes.append(f"x{ips / best[('bf16', 'vssl')]:.2f} of bf16 autocast")
                rows.append(
                    {
                        "model": key,
                        "res": res,
                        "precision": prec,
                        "impl": impl,
                        "batch": batch,
                        "images_per_s": ips,
                        "gflop_per_img": gflop,
                        "tflops": achieved / 1e12,
                        "pct_peak": 100 * achieved / peak,
                        "pct_fp32_peak": 100 * achieved / fp32_peak,
                        "ratio_vs_hf": ips / hf_ips if hf_ips else None,
                        "notes": "; ".join(notes),
                    }
                )
        for impl in ("vssl", "transformers"):
            if ("fp32", impl) in best and ("bf16", impl) in best:
                summary.append(
                    f"{key} {impl}: bf16 autocast / fp32 = "
                    f"{best[('bf16', impl)] / best[('fp32', impl)]:.2f}"
                )
        for prec in args.precisions:
            if (prec, "transformers") in best:
                summary.append(
                    f"{key} {prec}: vssl / transformers = "
                    f"{best[(prec, 'vssl')] / best[(prec, 'transformers')]:.2f}"
                )

        del hf
        tmp_ctx.cleanup()

        if not args.skip_embed and key in embed_keys:
            log(f"  embed_images over {args.images} (x{args.repeat}), batch {batch} ...")
            e = run_embed(
                model,
                args.images,
                batch,
                args.repeat,
                args.max_images,
                args.embed_workers,
                args.embed_runs,
            )
            model_only = best.get(("fp32", "vssl"))
            e.update(
                {"model": key, "res": res, "batch": batch, "model_only_images_per_s": model_only}
            )
            embeds.append(e)
            ratio = e["images_per_s"] / model_only if model_only else None
            log(
                f"  e2e {e['images_per_s']:.2f} img/s over {e['num_embedded']} images "
                f"({e['seconds']:.1f} s, {e['num_skipped']} skipped)"
                + (f", x{ratio:.2f} of model-only" if ratio else "")
            )
            achieved = e["images_per_s"] * flops["total"]
            workers = "default" if args.embed_workers is None else args.embed_workers
            rows.append(
                {
                    "model": key,
                    "res": res,
                    "precision": "fp32",
                    "impl": f"vssl embed e2e ({e['num_embedded']} imgs, workers {workers})",
                    "batch": batch,
                    "images_per_s": e["images_per_s"],
                    "gflop_per_img": gflop,
                    "tflops": achieved / 1e12,
                    "pct_peak": 100 * achieved / fp32_peak,
                    "pct_fp32_peak": 100 * achieved / fp32_peak,
                    "ratio_vs_hf": None,
                    "notes": f"x{ratio:.2f} of model-only" if ratio else "",
                }
            )
            if ratio:
                summary.append(f"{key}: embed e2e / model-only (fp32, batch {batch}) = {ratio:.2f}")
        del model

    report = {
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "matmul": matmul,
        "checks": checks,
        "measurements": measurements,
        "embed": embeds,
        "rows": rows,
        "summary": summary,
        "elapsed_s": time.perf_counter() - t_start,
    }
    print(render(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"raw numbers -> {args.json}")
    bad = [
        c["model"]
        for c in checks
        if c.get("agree_fp32") and c["agree_fp32"]["max_abs_diff"] > AGREE_TOL
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
