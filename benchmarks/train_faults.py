#!/usr/bin/env python
"""Fault injection for `vssl pretrain` (issue 16, "Training never loses work"): real processes,
real signals, real files.

A tiny `cpu_tiny32` (DINOv2 on a 2-block, 64-d ViT with 8-px patches, a small head) on a list of
real CIFAR-10 images runs as `python -m vssl pretrain ...` subprocesses, and every fault is
compared with one uninterrupted reference run of the same recipe:

- ``kill -9`` (the whole process group, loader workers included) at random moments, mid-step and
  mid-checkpoint-write, then the same command again until the run completes: per-step losses and
  the exported encoder (``backbone.safetensors``) must be bit-identical to the reference; steps
  lost per kill = last step logged before the kill - the step the next run resumed from;
- SIGINT to the process group (a terminal's Ctrl-C) and SIGTERM to the process (``kill``, a
  scheduler's preemption): exit code 130 / 143, a checkpoint of the last finished step (0 steps
  lost), the encoder exported, "To resume" printed; then a resume to the end, bit-exact;
- a damaged newest checkpoint (truncated shard) and a crafted ``.metadata`` (a pickle that would
  create a marker file, with a manifest that matches it): skipped with a message naming the file,
  resumed from the previous checkpoint, bit-exact, and the marker never appears;
- a full disk: ``output_dir`` on a small tmpfs (mount allowed) that holds one checkpoint but not
  two: "no space left on device (needed ~N MB)", exit 2, no partial ``.tmp`` left, the previous
  checkpoint kept and resumable;
- with ``torchrun`` (2 gloo ranks): SIGINT to the launcher's process group (every rank gets it
  twice: from the terminal and forwarded by torchrun), SIGTERM to the launcher only (it forwards
  it), and kill -9 of everything: after a signal both ranks stop after the same step and write one
  consistent checkpoint; every resumed run matches an uninterrupted torchrun run bit for bit.

It prints one line per fault and the totals: interrupts survived, steps lost per interrupt, bit-exact
resumes, files refused.

    python benchmarks/train_faults.py --quick          # ~3-5 minutes on 2 CPU cores
    python benchmarks/train_faults.py --kills 12       # the issue's 12 random kills
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-subset"


def tiny_overrides(images: Path, out: Path, steps: int, every: int) -> list[str]:
    return [
        f"data.train={images}",
        "data.num_workers=1",
        "data.n_local=2",
        "model.depth=2",
        "model.embed_dim=64",
        "model.num_heads=2",
        "method.n_prototypes=128",
        "method.hidden_dim=64",
        "method.bottleneck_dim=32",
        "train.batch_size_per_rank=16",
        f"train.epochs={steps}",
        "train.iters_per_epoch=1",
        "train.warmup_epochs=2",
        "train.log_every=1",
        f"train.checkpoint_every={every}",
        "train.keep_checkpoints=2",
        f"train.output_dir={out}",
    ]


class Runner:
    def __init__(self, images: Path, steps: int, every: int, logs: Path):
        self.images, self.steps, self.every, self.logs = images, steps, every, logs
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.startup_s, self.step_s = 5.0, 0.2  # measured on the reference run

    def cmd(self, out: Path, torchrun: bool = False, extra=()) -> list[str]:
        args = tiny_overrides(self.images, out, self.steps, self.every) + list(extra)
        if torchrun:
            args = [a.replace("data.num_workers=1", "data.num_workers=0") for a in args]
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "vssl",
                "pretrain",
                "cpu_tiny32",
                *args,
                "--no-progress",
            ]
        return [sys.executable, "-m", "vssl", "pretrain", "cpu_tiny32", *args, "--no-progress"]

    def start(self, out: Path, torchrun: bool = False, extra=()) -> subprocess.Popen:
        log = open(self.logs / f"{out.name}.log", "a")
        return subprocess.Popen(
            self.cmd(out, torchrun, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: killpg reaches the loader workers
        )

    def run(self, out: Path, torchrun: bool = False, extra=(), timeout: float = 600) -> int:
        p = self.start(out, torchrun, extra)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return -9


LOGS: Path = Path(".")


def log_of(out: Path) -> str:
    path = LOGS / f"{out.name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def steps_logged(out: Path) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if "loss" in r:
            rows.append((r["step"], r["loss"]))
    return rows


def last_step(out: Path) -> int:
    rows = steps_logged(out)
    return rows[-1][0] if rows else 0


def wait_for_step(p: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> bool:
    t = time.time()
    while time.time() - t < timeout:
        if last_step(out) >= step:
            return True
        if p.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def resumed_from(text: str) -> int:
    """The step of the last 'resumed from step N' line in a log chunk (0: a fresh start)."""
    import re

    found = re.findall(r"resumed from step ([\d,]+)", text)
    return int(found[-1].replace(",", "")) if found else 0


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two safetensors files equal, bit for bit (and the same names)."""
    if not (a.exists() and b.exists()):
        return False
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class Tally:
    def __init__(self):
        self.interrupts = 0
        self.survived = 0
        self.lost: list[int] = []
        self.exact = 0
        self.compared = 0
        self.refused = 0
        self.problems: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.problems.append(f"{name}: {detail}")
        return ok


def compare(t: Tally, name: str, out: Path, ref: Path) -> bool:
    a, b = steps_logged(out), steps_logged(ref)
    same_losses = a == b
    same_encoder = same_tensors(out / "backbone.safetensors", ref / "backbone.safetensors")
    t.compared += 1
    ok = same_losses and same_encoder and bool(a)
    t.exact += ok
    t.check(
        f"{name}: bit-exact vs uninterrupted",
        ok,
        f"{len(a)} step losses {'equal' if same_losses else 'DIFFER'}, encoder "
        f"{'identical' if same_encoder else 'DIFFERS'}",
    )
    return ok


def finish(r: Runner, out: Path, t: Tally, torchrun: bool = False) -> int:
    """Run the same command again until the run completes; returns the number of runs."""
    for n in range(1, 4):
        before = len(log_of(out))
        rc = r.run(out, torchrun)
        if rc == 0:
            return n
        t.check("resume", False, f"exit {rc}: {log_of(out)[before:][-800:]}")
    return 0


# ---------------------------------------------------------------------------------- faults
def writing(out: Path, since: float) -> bool:
    """A ``.tmp`` checkpoint folder this process was writing when it died."""
    return any(p.stat().st_mtime >= since for p in (out / "ckpt").glob("*.tmp"))


def random_kills(r: Runner, work: Path, ref: Path, t: Tally, n: int, rng: random.Random) -> None:
    """``n`` kill -9 of the whole process group at random moments of the training (mid-step,
    mid-checkpoint-write, during the start), each followed by the same command again; a run that
    completes before its kill is compared and a new one started."""
    from vssl.train.checkpoint import latest_checkpoint

    folder = 0
    out = work / f"kill9_{folder}"
    kills = 0
    while kills < n:
        metrics = out / "metrics.jsonl"
        before = metrics.read_bytes() if metrics.exists() else b""
        started = time.time()
        p = r.start(out)
        ckpt = latest_checkpoint(out)
        base = int(ckpt.name.removeprefix("step_")) if ckpt else 0
        if rng.random() < 0.25:  # during the start-up (imports, building, loading the checkpoint)
            delay = rng.uniform(0, r.startup_s)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        else:  # during the training: mid-step or mid-checkpoint-write
            wait_for_step(p, out, base + 1)
            delay = rng.uniform(0, max(r.steps - base - 1, 1) * r.step_s)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is not None:  # it completed first: compare, and start a new run
            if p.returncode != 0:
                t.check("a run between kills", False, f"exit {p.returncode}")
                return
            compare(t, f"kill -9 run {folder}", out, ref)
            folder += 1
            out = work / f"kill9_{folder}"
            continue
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        t.interrupts += 1
        logged = last_step(out)
        ckpt = latest_checkpoint(out)  # what the next start resumes from (intact, newest)
        back = int(ckpt.name.removeprefix("step_")) if ckpt else 0
        # steps this process did and the next one redoes (none if it died before its first step)
        moved = (metrics.read_bytes() if metrics.exists() else b"") != before
        lost = max(0, logged - back) if moved else 0
        t.lost.append(lost)
        t.survived += 1  # counted as survived; the comparison at the end proves it
        print(
            f"  ok   kill -9 #{kills} (step {logged}, "
            f"{'mid-checkpoint-write' if writing(out, started) else 'no save open'}): "
            f"resumes from step {back}, {lost} steps lost",
            flush=True,
        )
    if finish(r, out, t):
        compare(t, f"kill -9 run {folder} ({kills} kills in all)", out, ref)


def graceful(r: Runner, work: Path, ref: Path, t: Tally, sig: signal.Signals, group: bool):
    out = work / f"graceful_{sig.name}"
    p = r.start(out)
    target = max(2, r.steps // 3)
    if not wait_for_step(p, out, target):
        t.check(sig.name, False, "the run ended before the signal")
        return
    (os.killpg if group else os.kill)(p.pid, sig)
    rc = p.wait(timeout=120)
    t.interrupts += 1
    logged = last_step(out)
    text = log_of(out)
    ckpts = sorted(q.name for q in (out / "ckpt").glob("step_*") if q.is_dir())
    saved = int(ckpts[-1].removeprefix("step_")) if ckpts else 0
    ok = t.check(
        f"{sig.name} to the {'process group' if group else 'process'}",
        rc == 128 + sig
        and saved == logged
        and "To resume" in text
        and (out / "backbone.safetensors").exists(),
        f"exit {rc}, last step {logged}, checkpoint step_{saved:08d}, "
        f"encoder {'exported' if (out / 'backbone.safetensors').exists() else 'MISSING'}",
    )
    before = len(text)
    if finish(r, out, t):
        back = resumed_from(log_of(out)[before:])
        t.lost.append(max(0, logged - back))
        t.survived += ok
    compare(t, sig.name, out, ref)


def damaged_newest(r: Runner, work: Path, ref: Path, t: Tally, kind: str) -> None:
    out = work / f"damaged_{kind}"
    rc = r.run(out, extra=[f"train.max_steps={r.steps // 2}"])
    ckpts = sorted((out / "ckpt").glob("step_*"))
    if rc != 0 or len(ckpts) < 2:
        t.check(kind, False, f"setup: exit {rc}, {len(ckpts)} checkpoints")
        return
    newest, previous = ckpts[-1], ckpts[-2]
    marker = work / f"MARKER_{kind}"
    if kind == "truncated":
        shard = newest / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        (newest / ".metadata").write_bytes(pickle.dumps(Evil()))
        man = json.loads((newest / "manifest.json").read_text())
        man["files"][".metadata"] = (newest / ".metadata").stat().st_size
        (newest / "manifest.json").write_text(json.dumps(man))
    before = len(log_of(out))
    rc = r.run(out)
    text = log_of(out)[before:]
    skipped = f"skipping checkpoint {newest}" in text
    back = resumed_from(text)
    refused = "refused" in text
    if kind == "crafted":
        t.refused += refused and not marker.exists()
    t.check(
        f"{kind} newest checkpoint",
        rc == 0
        and skipped
        and back == int(previous.name.removeprefix("step_"))
        and not marker.exists(),
        f"exit {rc}, skipped {'with' if skipped else 'WITHOUT'} a message, resumed from {back}"
        + (
            f", refused {refused}, marker {'CREATED' if marker.exists() else 'absent'}"
            if kind == "crafted"
            else ""
        ),
    )
    line = next((x for x in text.splitlines() if "skipping checkpoint" in x), "")
    print(f"       {line[:220]}")
    compare(t, f"{kind} newest checkpoint", out, ref)


def full_disk(r: Runner, work: Path, ref: Path, t: Tally) -> None:
    ckpt = sorted((ref / "ckpt").glob("step_*"))[-1]
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    mnt = work / "small_disk"
    mnt.mkdir()  # logs stay outside: only the run folder is on the small disk
    mb = max(1, int((size * 1.6 + 300_000) / 2**20) + 1)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(mnt)], capture_output=True
    )
    if mount.returncode != 0:
        print(f"  skip full disk: cannot mount a tmpfs ({mount.stderr.decode().strip()[:80]})")
        return
    try:
        out = mnt / "full_disk"
        rc = r.run(out, extra=["train.keep_checkpoints=1"])
        text = log_of(out)
        ckpts = sorted(q.name for q in (out / "ckpt").glob("step_*") if q.is_dir())
        tmp_left = list((out / "ckpt").glob("*.tmp"))
        line = next((x for x in text.splitlines() if "no space left on device" in x), "")
        t.check(
            f"full disk ({mb} MB tmpfs, a checkpoint is {size / 2**20:.2f} MB)",
            rc == 2 and bool(line) and "needed ~" in line and not tmp_left and len(ckpts) == 1,
            f"exit {rc}, kept {ckpts}, partial .tmp left: {len(tmp_left)}",
        )
        print(f"       {line[:240]}")
        # room again (a bigger disk): the same command resumes from the kept checkpoint
        moved = work / "full_disk_moved"
        shutil.copytree(out, moved)
        before = len(log_of(moved))
        rc = r.run(moved)
        back = resumed_from(log_of(moved)[before:])
        t.check("resume after the full disk", rc == 0, f"resumed from {back}")
        compare(t, "full disk", moved, ref)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def torchrun_faults(r: Runner, work: Path, t: Tally, quick: bool = False) -> None:
    """2 gloo ranks under torchrun: SIGINT to the launcher's process group (a terminal's Ctrl-C:
    every rank gets it, and torchrun forwards it again), SIGTERM to the launcher only (a
    scheduler: torchrun forwards it), kill -9 of everything; each resumed to the end and compared
    with an uninterrupted torchrun run."""
    from vssl.train.checkpoint import latest_checkpoint, verify_checkpoint

    ref = work / "torchrun_ref"
    rc = r.run(ref, torchrun=True)
    if not t.check("torchrun reference run", rc == 0, f"exit {rc}"):
        print(log_of(ref)[-1500:])
        return
    faults = [("SIGINT", signal.SIGINT, True)]
    if not quick:
        faults += [("SIGTERM", signal.SIGTERM, False), ("kill -9", signal.SIGKILL, True)]
    for name, sig, group in faults:
        out = work / f"torchrun_{name.replace(' ', '').replace('-', '')}"
        p = r.start(out, torchrun=True)
        if not wait_for_step(p, out, max(2, r.steps // 3)):
            t.check(f"torchrun {name}", False, "the run ended first")
            continue
        (os.killpg if group else os.kill)(p.pid, sig)
        rc = p.wait(timeout=180)
        t.interrupts += 1
        logged = last_step(out)
        newest = latest_checkpoint(out)
        back = int(newest.name.removeprefix("step_")) if newest else 0
        shards = sorted(x.name for x in newest.glob("*.distcp")) if newest else []
        whole = shards == ["__0_0.distcp", "__1_0.distcp"] and verify_checkpoint(newest) is None
        graceful = sig != signal.SIGKILL
        ok = t.check(
            f"torchrun {name} to the {'process group' if group else 'launcher'}",
            whole and (back == logged or not graceful),
            f"exit {rc}, last step {logged}, checkpoint step {back} with shards {shards}"
            + (" (both ranks, one step)" if whole and graceful else ""),
        )
        before = len(log_of(out))
        if finish(r, out, t, torchrun=True):
            back = resumed_from(log_of(out)[before:])
            t.lost.append(max(0, logged - back))
            t.survived += ok
        compare(t, f"torchrun {name}", out, ref)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="3 kills, 12-step runs, torchrun: SIGINT only"
    )
    ap.add_argument("--kills", type=int, default=None, help="random kill -9 (default 12; 3 quick)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 40; 12 quick)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--no-torchrun", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="kept when given (default: a tmp dir)")
    args = ap.parse_args()
    kills = args.kills if args.kills is not None else (3 if args.quick else 12)
    steps = args.steps or (12 if args.quick else 40)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="vssl_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "train.txt"
    rows = []
    for c in sorted((args.data / "train").iterdir()):
        rows += [f"{p}\t{c.name}" for p in sorted(c.iterdir())[:16]]
    images.write_text("\n".join(rows) + "\n")
    global LOGS
    LOGS = work / "logs"
    LOGS.mkdir(exist_ok=True)
    r = Runner(images, steps, every=3, logs=LOGS)
    t = Tally()
    t0 = time.time()
    print(
        f"vssl fault injection: {steps}-step runs of a tiny cpu_tiny32, checkpoints every 3 "
        f"steps (keep 2), {len(rows)} CIFAR images; work dir {work}",
        flush=True,
    )

    ref = work / "reference"
    rc = r.run(ref)
    if not t.check("uninterrupted reference run", rc == 0, f"exit {rc}"):
        print(log_of(ref)[-2000:])
        return 1
    wall = time.time() - t0
    lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    train_s = max(x.get("seconds", 0.0) for x in lines)
    r.step_s, r.startup_s = train_s / steps, max(wall - train_s, 1.0)
    print(
        f"  reference: {steps} steps in {wall:.0f} s ({r.startup_s:.1f} s start-up, "
        f"{r.step_s:.2f} s/step)",
        flush=True,
    )
    random_kills(r, work, ref, t, kills, rng)
    graceful(r, work, ref, t, signal.SIGINT, group=True)
    graceful(r, work, ref, t, signal.SIGTERM, group=False)
    damaged_newest(r, work, ref, t, "truncated")
    damaged_newest(r, work, ref, t, "crafted")
    full_disk(r, work, ref, t)
    if not args.no_torchrun:
        torchrun_faults(r, work, t, quick=args.quick)

    lost = t.lost
    print(
        f"\ninterrupts survived {t.survived}/{t.interrupts}; steps lost per interrupt: "
        f"mean {sum(lost) / max(len(lost), 1):.2f}, max {max(lost) if lost else 0} "
        f"(checkpoint every 3 steps; graceful stops lose 0); bit-exact resumes "
        f"{t.exact}/{t.compared}; crafted files refused {t.refused} (marker never created); "
        f"{time.time() - t0:.0f} s"
    )
    if t.problems:
        print("problems:\n  " + "\n  ".join(t.problems))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if t.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
