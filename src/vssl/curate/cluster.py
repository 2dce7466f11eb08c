"""``vssl curate cluster``: hierarchical k-means with resampling, as ssl-data-curation defines it
(Vo et al. 2024, "Automatic data curation for self-supervised learning"; docs/architecture.md,
Curation).

Level 1 clusters the features; level l+1 clusters level l's centroids. Each level runs k-means
(k-means++ init, Lloyd iterations, L2, float64 sums), then ``steps - 1`` resampling steps: take
``sample_size`` points per cluster (the closest to the centroid, or random), re-fit k-means on
that sample only and re-assign all the level's points. A step count of 1 means no resampling, as
is the reference's choice for the first, largest level.

Under ``torchrun`` each rank reads its slice of the memory-mapped features and the k-means++
potentials, draws, centroid sums and per-cluster samples are all-reduced (one process and N ranks
give the same clusters for one seed). A level is written into ``levelL.tmp/`` and renamed to
``levelL/`` when whole: an interrupted run resumes at its last finished level.

OUT/ holds ``config.json``, ``levelL/{centroids.npy, assignment.npy, distance.npy, done.json}``
and ``clusters.parquet``: the features' manifest plus ``cluster_1..cluster_L`` (each row's
cluster at every level) and ``distance_1`` (its L2 distance to its level-1 centroid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HELP = "hierarchical k-means with resampling (ssl-data-curation), resumable, torchrun-ready"

_EPILOG = """\
examples:
  vssl curate cluster feats/ --levels 20000,2000,200 --out clusters/
  vssl curate cluster feats/ --levels 2000,200,20 --resample-steps 1,10,10 --out clusters/
  torchrun --nproc-per-node 8 -m vssl curate cluster feats/ --levels 100000,10000 --out clusters/

Then `vssl curate sample clusters/ --n N --out sample.parquet`. Re-running the same command after
an interruption resumes at the first unfinished level.
"""

CONFIG = "config.json"
RESULT = "clusters.parquet"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cluster",
        help=HELP,
        description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("features", metavar="FEATS", help="a `vssl embed` output folder (or its parts)")
    p.add_argument(
        "--levels",
        required=True,
        help="clusters per level, largest first, comma-separated (e.g. 20000,2000,200)",
    )
    p.add_argument(
        "--resample-steps",
        default=None,
        help="k-means runs per level, comma-separated; 1 = no resampling (default: 1 for the "
        "first level, 10 for the others, as ssl-data-curation)",
    )
    p.add_argument(
        "--sample-sizes",
        default=None,
        help="points per cluster in a resampling step, comma-separated (default: half the "
        "average cluster size of the level, at least 2: the reference's rule)",
    )
    p.add_argument(
        "--strategy",
        choices=("closest", "random"),
        default="closest",
        help="which points a resampling step keeps (default closest to the centroid)",
    )
    p.add_argument("--iters", type=int, default=50, help="Lloyd iterations per k-means (50)")
    p.add_argument(
        "--init-points-per-centroid",
        type=int,
        default=0,
        metavar="M",
        help="run k-means++ on a random sample of M points per centroid (0 = all points, as "
        "the reference; a CPU needs a sample for large k)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _ints(text: str | None, name: str, n: int | None = None) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    if n is not None and len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} values for {n} levels: give one per level")
    return vals


def run(args: argparse.Namespace) -> int:
    levels = _ints(args.levels, "--levels")
    steps = _ints(args.resample_steps, "--resample-steps", len(levels))
    sizes = _ints(args.sample_sizes, "--sample-sizes", len(levels))
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    comm = _init_comm()
    hierarchical_kmeans(
        args.features,
        args.out,
        levels,
        steps=steps,
        sample_sizes=sizes,
        strategy=args.strategy,
        iters=args.iters,
        seed=args.seed,
        init_points_per_centroid=args.init_points_per_centroid,
        comm=comm,
        progress=not args.no_progress,
    )
    return 0


def _init_comm():
    from ._kmeans import Comm, TorchComm

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Comm()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return TorchComm()


def _say(comm, msg: str) -> None:
    if comm.rank == 0:
        print(f"vssl curate cluster: {msg}", file=sys.stderr, flush=True)


def hierarchical_kmeans(
    features,
    out,
    levels: list[int],
    *,
    steps: list[int] | None = None,
    sample_sizes: list[int] | None = None,
    strategy: str = "closest",
    iters: int = 50,
    seed: int = 0,
    init_points_per_centroid: int = 0,
    comm=None,
    progress: bool = True,
) -> Path:
    """Cluster ``features`` (a features folder) into ``out``; returns ``out/clusters.parquet``."""
    from ._features import FeatureParts
    from ._kmeans import Comm, Rows, kmeans, rank_slice

    comm = comm or Comm()
    feats = FeatureParts(features)
    n = len(feats)
    if sorted(levels, reverse=True) != levels or len(set(levels)) != len(levels):
        raise ValueError(f"--levels must decrease (largest first), got {levels}")
    if levels[0] > n:
        raise ValueError(
            f"{levels[0]} clusters at level 1 but {features} holds only {n} points: more "
            f"clusters than points; use --levels with at most {n} at level 1"
        )
    steps = steps or [1] + [10] * (len(levels) - 1)
    prev = [n] + levels[:-1]
    sample_sizes = sample_sizes or [max(2, round(p / k / 2)) for p, k in zip(prev, levels)]
    out = Path(out)
    config = {
        "features": str(Path(features).resolve()),
        "rows": n,
        "dim": feats.dim,
        "levels": levels,
        "resample_steps": steps,
        "sample_sizes": sample_sizes,
        "strategy": strategy,
        "iters": iters,
        "seed": seed,
        "init_points_per_centroid": init_points_per_centroid,
    }
    if comm.rank == 0:
        _check_or_write_config(out, config)
    comm.barrier()
    lo, hi = rank_slice(n, comm.rank, comm.world)
    single = Comm()
    centroids = None
    for li, k in enumerate(levels, start=1):
        folder = out / f"level{li}"
        if (folder / "done.json").is_file():
            centroids = np.load(folder / "centroids.npy")
            _say(comm, f"level {li}: finished before, read from {folder}")
            continue
        t0 = time.perf_counter()
        if li == 1:
            rows, c = Rows(feats, lo, hi), comm
        else:
            if k > len(centroids):
                raise ValueError(
                    f"level {li}: {k} clusters but level {li - 1} has {len(centroids)}"
                )
            rows, c = Rows(centroids), single  # small: every rank computes it identically
        lseed = seed * 1000 + li * 100
        cen, labels, dist = kmeans(
            rows,
            k,
            comm=c,
            iters=iters,
            seed=lseed,
            init_points_per_centroid=init_points_per_centroid,
            progress=progress,
            desc=f"level {li} k-means",
        )
        for s in range(1, steps[li - 1] if sample_sizes[li - 1] > 1 else 1):
            cen, labels, dist = _resample(
                rows,
                cen,
                labels,
                dist,
                k,
                sample_sizes[li - 1],
                strategy,
                c,
                lseed + s,
                iters,
                init_points_per_centroid,
                comm,
            )
            if progress:
                _say(comm, f"level {li}: resampling step {s} of {steps[li - 1] - 1} done")
        _write_level(out, li, cen, labels, dist, rows, c, comm)
        centroids = cen
        _say(
            comm, f"level {li}: {k} clusters of {rows.n} points in {time.perf_counter() - t0:.1f} s"
        )
    comm.barrier()
    if comm.rank == 0:
        _write_result(feats, out, len(levels))
    comm.barrier()
    _say(comm, f"wrote {out / RESULT}")
    return out / RESULT


def _resample(rows, cen, labels, dist, k, size, strategy, c, seed, iters, ippc, comm):
    """One resampling step: k-means on ``size`` points per cluster, then assign every point."""
    from ._kmeans import Comm, Rows, _gather_rows, assign, kmeans, sample_per_cluster

    idx = sample_per_cluster(labels, dist, rows.lo, k, size, strategy, c, seed)
    if len(idx) < k:
        _say(comm, f"resampling skipped: {len(idx)} sampled points for {k} clusters")
        return cen, labels, dist
    sample = _gather_rows(rows, idx, c)
    cen, _, _ = kmeans(
        Rows(sample), k, comm=Comm(), iters=iters, seed=seed, init_points_per_centroid=ippc
    )
    labels, dist = assign(rows, cen)
    return cen, labels, dist


def _check_or_write_config(out: Path, config: dict) -> None:
    path = out / CONFIG
    if path.is_file():
        old = json.loads(path.read_text())
        if old != config:
            diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
            raise ValueError(
                f"{out} holds a clustering with other settings ({diff}, as (old, new)): resume "
                f"it with the same command, or pass another --out"
            )
        return
    from .._io import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_level(out: Path, li: int, cen, labels, dist, rows, c, comm) -> None:
    """``levelL.tmp/`` filled by every rank (its slice of the assignment), renamed when whole."""
    tmp, final = out / f"level{li}.tmp", out / f"level{li}"
    distributed = c is comm and comm.world > 1
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "centroids.npy", cen)
        for name, dtype in (("assignment.npy", np.int32), ("distance.npy", np.float32)):
            np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=(rows.n,)).flush()
    comm.barrier()
    if distributed or comm.rank == 0:
        sl = slice(rows.lo, rows.hi)
        for name, values in (("assignment.npy", labels), ("distance.npy", np.sqrt(dist))):
            mm = np.load(tmp / name, mmap_mode="r+")
            mm[sl] = values
            mm.flush()
            del mm
    comm.barrier()
    if comm.rank == 0:
        (tmp / "done.json").write_text(json.dumps({"level": li, "clusters": len(cen)}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    comm.barrier()


def load_levels(out) -> list[dict]:
    """Every finished level of a cluster folder: ``{"centroids", "assignment", "distance"}``
    (assignment of level L maps level L-1's clusters, or the points at level 1)."""
    out = Path(out)
    if not (out / CONFIG).is_file():
        raise ValueError(f"{out} is not a `vssl curate cluster` output (no {CONFIG})")
    config = json.loads((out / CONFIG).read_text())
    levels = []
    for li in range(1, len(config["levels"]) + 1):
        folder = out / f"level{li}"
        if not (folder / "done.json").is_file():
            raise ValueError(
                f"{out}: level {li} is not finished: re-run the same `vssl curate cluster` "
                "command to resume it"
            )
        levels.append(
            {
                "centroids": np.load(folder / "centroids.npy", mmap_mode="r"),
                "assignment": np.load(folder / "assignment.npy", mmap_mode="r"),
                "distance": np.load(folder / "distance.npy", mmap_mode="r"),
            }
        )
    return levels


def _write_result(feats, out: Path, n_levels: int) -> None:
    import pyarrow as pa

    from ._output import write_table

    levels = load_levels(out)
    table = feats.manifest()
    cl = np.asarray(levels[0]["assignment"], dtype=np.int64)
    table = table.append_column("cluster_1", pa.array(cl))
    for li in range(1, n_levels):
        cl = np.asarray(levels[li]["assignment"], dtype=np.int64)[cl]
        table = table.append_column(f"cluster_{li + 1}", pa.array(cl))
    table = table.append_column("distance_1", pa.array(np.asarray(levels[0]["distance"])))
    write_table(table, out / RESULT)
