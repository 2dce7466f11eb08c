"""k-means as ssl-data-curation runs it (Vo et al. 2024; docs/architecture.md, Curation): k-means++
initialization, Lloyd iterations with float64 centroid sums, L2 distance, and the resampling step
that re-fits the centroids on a few points per cluster.

One code path for one process and for ``torchrun``: each rank holds a slice of the rows and every
global quantity (k-means++ potentials, the point drawn, centroid sums and counts, the per-cluster
samples) goes through ``Comm.sum`` (an all-reduce; the identity in one process). Everything random
is drawn from generators seeded identically on every rank, and per-row random keys are a hash of
the row's global index, so a 2-rank run makes the same clusters as one process.

faiss does the assignment (exact L2 search of the centroids: one GEMM + an argmin per block); the
k-means++ loop and the float64 accumulation are written here because faiss's k-means has neither
(random init, float32 sums) and scikit-learn's holds the data in memory on one machine.
"""

from __future__ import annotations

import math
import sys

import numpy as np


class Comm:
    """One process: every reduction is the identity."""

    rank, world = 0, 1

    def sum(self, a: np.ndarray) -> np.ndarray:
        return a

    def barrier(self) -> None:
        pass


class TorchComm(Comm):
    """All-reduces over ``torch.distributed`` (gloo on CPU, or NCCL on the rank's GPU)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = "cuda" if dist.get_backend() == "nccl" else "cpu"

    def sum(self, a: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        self.dist.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self) -> None:
        self.dist.barrier()


class Rows:
    """Rows ``lo:hi`` (of ``n`` in all) of a level's data, read in float32 blocks.

    ``source`` is a ``FeatureParts`` (level 1: the memory-mapped features) or an in-memory array
    (upper levels: the centroids of the level below, held whole by every rank)."""

    def __init__(self, source, lo: int = 0, hi: int | None = None):
        self.source = source
        self.n = len(source)
        self.lo, self.hi = lo, self.n if hi is None else hi
        self.dim = source.dim if hasattr(source, "dim") else source.shape[1]

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    def blocks(self, block_rows: int = 65536):
        for s in range(self.lo, self.hi, block_rows):
            e = min(s + block_rows, self.hi)
            if not isinstance(self.source, np.ndarray):
                yield s, self.source.block(s, e)
            else:
                yield s, np.ascontiguousarray(self.source[s:e], dtype=np.float32)

    def take(self, global_rows: np.ndarray) -> np.ndarray:
        if not isinstance(self.source, np.ndarray):
            return self.source.take(global_rows)
        return np.ascontiguousarray(self.source[global_rows], dtype=np.float32)


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """ssl-data-curation's split: rank r holds rows round(n/W r) .. round(n/W (r+1))."""
    return round(n / world * rank), round(n / world * (rank + 1))


def _sqnorms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _sqdist(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared L2 distances (len(x), len(c)): ||x||^2 - 2 x.c + ||c||^2, the norms in float64,
    the product a float32 GEMM (``x_sq``: the rows' squared norms, computed once by the caller)."""
    x_sq = _sqnorms(x) if x_sq is None else x_sq
    c32 = np.ascontiguousarray(c, dtype=np.float32)
    d = x_sq[:, None] - 2 * (x @ c32.T).astype(np.float64) + _sqnorms(c32)[None, :]
    return np.maximum(d, 0)


def _gather_rows(rows: Rows, global_idx: np.ndarray, comm: Comm) -> np.ndarray:
    """The vectors of ``global_idx`` (sorted or not) on every rank: each owner fills its rows,
    the rest are zeros, one all-reduce sums them."""
    out = np.zeros((len(global_idx), rows.dim), dtype=np.float32)
    mine = (global_idx >= rows.lo) & (global_idx < rows.hi)
    if mine.any():
        out[mine] = rows.take(global_idx[mine])
    return comm.sum(out) if comm.world > 1 else out


def kmeans_plusplus(x: np.ndarray, k: int, comm: Comm, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, with 2 + log k candidates per step as
    ssl-data-curation and scikit-learn): each centre is the best of candidates drawn with
    probability proportional to the squared distance to the closest centre so far. ``x``: this
    rank's rows; draws and potentials are global."""
    sizes = np.zeros(comm.world, dtype=np.float64)
    sizes[comm.rank] = len(x)
    sizes = comm.sum(sizes).astype(np.int64)
    offset = int(sizes[: comm.rank].sum())
    total_n = int(sizes.sum())
    trials = 2 + int(math.log(k))

    def pick(global_idx: np.ndarray) -> np.ndarray:
        out = np.zeros((len(global_idx), x.shape[1]), dtype=np.float32)
        local = global_idx - offset
        mine = (local >= 0) & (local < len(x))
        out[mine] = x[local[mine]]
        return comm.sum(out) if comm.world > 1 else out

    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    centers[0] = pick(np.array([rng.integers(total_n)]))[0]
    x_sq = _sqnorms(x)
    closest = _sqdist(x, centers[:1], x_sq)[:, 0]
    for i in range(1, k):
        local_pot = np.zeros(comm.world)
        local_pot[comm.rank] = closest.sum()
        pots = comm.sum(local_pot)
        total = pots.sum()
        u = rng.random(trials)
        if total > 0:
            # the rank whose potential interval holds each draw finds the row in its cumsum
            target = u * total
            starts = np.concatenate([[0.0], np.cumsum(pots)[:-1]])
            owner = np.clip(
                np.searchsorted(np.cumsum(pots), target, side="right"), 0, comm.world - 1
            )
            idx = np.full(trials, -1, dtype=np.int64)
            mine = owner == comm.rank
            if mine.any():
                cs = np.cumsum(closest)
                pos = np.searchsorted(cs, target[mine] - starts[comm.rank], side="right")
                idx[mine] = offset + np.minimum(pos, len(x) - 1)
            idx = np.where(idx < 0, 0, idx) if comm.world == 1 else idx
            # ranks that do not own a draw contribute 0: the max over ranks is the owner's index
            if comm.world > 1:
                owned = np.where(mine, idx + 1, 0).astype(np.float64)
                idx = comm.sum(owned).astype(np.int64) - 1
            cands = pick(idx)
        else:  # every row sits on a centre already: fewer distinct rows than k
            cands = pick((u * total_n).astype(np.int64))
        d = np.minimum(closest[:, None], _sqdist(x, cands, x_sq))
        cand_pot = comm.sum(d.sum(axis=0))
        best = int(np.argmin(cand_pot))
        centers[i] = cands[best]
        closest = d[:, best]
    return centers


def assign(rows: Rows, centroids: np.ndarray, block_rows: int = 65536):
    """Nearest centroid of each local row (faiss exact L2) and its squared distance."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(rows.n_local, dtype=np.int64)
    dist = np.empty(rows.n_local, dtype=np.float32)
    for s, block in rows.blocks(block_rows):
        d, i = index.search(block, 1)
        labels[s - rows.lo : s - rows.lo + len(block)] = i[:, 0]
        dist[s - rows.lo : s - rows.lo + len(block)] = np.maximum(d[:, 0], 0)
    return labels, dist


def _update(rows: Rows, centroids: np.ndarray, comm: Comm, block_rows: int = 65536):
    """One Lloyd iteration: assign, then centroids = float64 per-cluster sums / counts (summed
    over ranks); an empty cluster keeps its centroid. Returns (centroids, labels, sq. dists)."""
    import faiss
    import scipy.sparse as sp

    k, dim = centroids.shape
    index = faiss.IndexFlatL2(dim)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sums = np.zeros((k, dim), dtype=np.float64)
    counts = np.zeros(k, dtype=np.float64)
    labels = np.empty(rows.n_local, dtype=np.int64)
    dist = np.empty(rows.n_local, dtype=np.float32)
    for s, block in rows.blocks(block_rows):
        d, i = index.search(block, 1)
        lab = i[:, 0]
        sl = slice(s - rows.lo, s - rows.lo + len(block))
        labels[sl], dist[sl] = lab, np.maximum(d[:, 0], 0)
        # per-cluster sums as a sparse one-hot (k x rows) times the block, in float64
        onehot = sp.csr_matrix((np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
        sums += onehot @ block.astype(np.float64)
        counts += np.bincount(lab, minlength=k)
    both = comm.sum(np.concatenate([sums, counts[:, None]], axis=1))
    sums, counts = both[:, :dim], both[:, dim]
    new = centroids.astype(np.float64).copy()
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    return new.astype(np.float32), labels, dist


def kmeans(
    rows: Rows,
    k: int,
    *,
    comm: Comm | None = None,
    iters: int = 50,
    seed: int = 0,
    init_points_per_centroid: int = 0,
    progress: bool = False,
    desc: str = "k-means",
):
    """k-means++ then ``iters`` Lloyd iterations over ``rows`` (this rank's slice).

    ``init_points_per_centroid`` > 0 runs k-means++ on a uniform sample of that many rows per
    centroid (the Lloyd iterations always use every row); 0 runs it on every row, as
    ssl-data-curation. Returns ``(centroids (k, D) float32, labels, squared distances)`` of the
    local rows, the labels from the final centroids.
    """
    from tqdm import tqdm

    comm = comm or Comm()
    if k > rows.n:
        raise ValueError(f"{k} clusters but only {rows.n} points: ask for at most {rows.n}")
    rng = np.random.default_rng(seed)
    m = rows.n if not init_points_per_centroid else min(rows.n, init_points_per_centroid * k)
    init_idx = np.sort(rng.choice(rows.n, m, replace=False)) if m < rows.n else np.arange(rows.n)
    local = init_idx[(init_idx >= rows.lo) & (init_idx < rows.hi)]
    x_init = rows.take(local) if len(local) else np.zeros((0, rows.dim), np.float32)
    centroids = kmeans_plusplus(x_init, k, comm, rng)
    del x_init
    bar = tqdm(
        total=iters, desc=desc, unit="iter", disable=not progress or comm.rank, file=sys.stderr
    )
    for _ in range(iters):
        centroids, _, _ = _update(rows, centroids, comm)
        bar.update(1)
    bar.close()
    labels, dist = assign(rows, centroids)
    return centroids, labels, dist


def row_keys(global_idx: np.ndarray, seed: int) -> np.ndarray:
    """A uniform random uint64 per row that depends only on (row, seed): splitmix64 of both, so
    every rank draws the same random per-cluster sample without talking (hand-written: a
    counter-based hash in three lines is simpler than generator state per row)."""
    with np.errstate(over="ignore"):
        z = global_idx.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_per_cluster(
    labels: np.ndarray,
    dist: np.ndarray,
    lo: int,
    k: int,
    size: int,
    strategy: str,
    comm: Comm,
    seed: int,
) -> np.ndarray:
    """Global row indices of ``size`` rows per cluster: the closest to the centroid
    (``closest``) or a uniform random subset (``random``), merged over ranks; sorted."""
    gidx = np.arange(lo, lo + len(labels), dtype=np.int64)
    if strategy == "closest":
        key = dist.astype(np.float64)
    else:  # a random key in [0, 1): the `size` smallest keys are a uniform sample
        key = (row_keys(gidx, seed) >> np.uint64(11)).astype(np.float64) / 2.0**53
    order = np.lexsort((gidx, key, labels))
    lab_sorted = labels[order]
    starts = np.searchsorted(lab_sorted, np.arange(k))
    rank_in = np.arange(len(order)) - starts[lab_sorted]
    keep = rank_in < size
    # every rank's best `size` per cluster, laid out (rank, cluster, slot): one all-reduce merges
    keys = np.full((comm.world, k, size), np.inf)
    ids = np.zeros((comm.world, k, size))
    sel = order[keep]
    keys[comm.rank, labels[sel], rank_in[keep]] = key[sel]
    ids[comm.rank, labels[sel], rank_in[keep]] = gidx[sel] + 1
    if comm.world > 1:
        keys = np.where(np.isinf(keys), 0, keys)
        present = (ids > 0).astype(np.float64)
        keys, ids, present = comm.sum(keys), comm.sum(ids), comm.sum(present)
        keys = np.where(present > 0, keys, np.inf)
    keys = keys.transpose(1, 0, 2).reshape(k, -1)
    ids = ids.transpose(1, 0, 2).reshape(k, -1)
    out = []
    for c in range(k):
        o = np.lexsort((ids[c], keys[c]))[:size]
        o = o[np.isfinite(keys[c, o])]
        out.append(ids[c, o].astype(np.int64) - 1)
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
