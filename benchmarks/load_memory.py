"""Peak memory of loading a large checkpoint in bf16: vssl vs the usual recipe.

vssl builds the model on the meta device, memory-maps the checkpoint and assigns tensors one at a
time (converted to the target dtype), so the weights exist once. The usual recipe (the upstream
demos) builds the model in fp32, ``torch.load``s the whole file, ``load_state_dict``s it and then
casts to bf16: about three fp32 copies at the peak.

Each way runs in a fresh process; a sampling thread records the peak of RssAnon (private memory,
what the OOM killer counts; memory-mapped file pages are reclaimable page cache and are reported
separately as RssFile). Usage:

    python benchmarks/load_memory.py --model webssl-dino1b-full2b-224 --workdir /tmp/loadmem
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _child(way: str, model: str, ckpt: str) -> None:
    import threading

    import torch

    import vssl

    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.005)

    base = _status()["RssAnon"]
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    if way == "vssl":
        m = vssl.create_model(model, weights=ckpt, dtype="bf16")
    else:  # build fp32, torch.load everything, load_state_dict, cast: the upstream demo recipe
        m = vssl.VisionTransformer(vssl.get_config(model))
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        m.load_state_dict(sd)
        del sd
        m = m.to(torch.bfloat16)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    # touch every weight so lazily mapped data counts
    total = sum(float(p.float().abs().sum()) for p in m.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    print(
        json.dumps(
            {
                "way": way,
                "seconds": seconds,
                "model_bytes": n_bytes,
                "peak_anon": peak["RssAnon"] - base,
                "peak_file": peak["RssFile"],
                "checksum_finite": total == total,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="webssl-dino1b-full2b-224")
    ap.add_argument("--workdir", default="/tmp/vssl-loadmem")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    import torch

    import vssl

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.model}.pth"
    if not ckpt.exists():
        print(f"writing a random fp32 {args.model} checkpoint to {ckpt} ...", file=sys.stderr)
        m = vssl.create_model(args.model, random_init=True)
        vssl.export_native(m, ckpt)
        del m
    size = ckpt.stat().st_size
    rows = []
    for way in ("vssl", "naive"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", way, args.model, str(ckpt)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib = 2**30
    print(f"checkpoint: {args.model}, fp32 file {size / gib:.2f} GiB; torch {torch.__version__}")
    print("| loader | seconds | bf16 weights GiB | peak private (RssAnon) GiB | peak / weights |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['way']} | {r['seconds']:.1f} | {r['model_bytes'] / gib:.2f} | "
            f"{r['peak_anon'] / gib:.2f} | {r['peak_anon'] / r['model_bytes']:.2f}x |"
        )


if __name__ == "__main__":
    main()
