"""Nearest neighbours over faiss: one module for `vssl eval knn`, dedup and retrieval.

Cosine similarity is the inner product of L2-normalized rows. The index is chosen by size
(docs/architecture.md, Curation), as DINOv2 did for LVD-142M (faiss, IVF + PQ at the billion
scale), and always reported:

- ``flat``  (``IndexFlatIP``): exact; the default up to ``FLAT_MAX`` rows;
- ``ivf``   (``IndexIVFFlat``): ``nlist`` ~ 4 sqrt(N) cells, ``nprobe`` of them searched; exact
  similarities, approximate recall; up to ``IVFPQ_MIN`` rows (it stores the vectors in float32);
- ``ivfpq`` (``IndexIVFPQ``, D/4 bytes per row): beyond; its similarities are re-computed exactly
  from the memory-mapped features, so thresholds see true cosines.

faiss does the work (BLAS GEMMs with heap selection, IVF training); this module only chooses,
trains on a sample, adds in blocks and searches in blocks.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

FLAT_MAX = 262_144
IVFPQ_MIN = 20_000_000
KINDS = ("auto", "flat", "ivf", "ivfpq")


@dataclass
class IndexChoice:
    """Which faiss index, and why; ``describe()`` is the line the commands print."""

    kind: str  # flat | ivf | ivfpq
    nlist: int = 0
    nprobe: int = 0
    pq_bytes: int = 0
    reason: str = ""

    def describe(self) -> str:
        if self.kind == "flat":
            what = "exact flat inner-product search (faiss IndexFlatIP)"
        elif self.kind == "ivf":
            what = f"faiss IndexIVFFlat, {self.nlist} cells, nprobe {self.nprobe}"
        else:
            what = (
                f"faiss IndexIVFPQ, {self.nlist} cells, nprobe {self.nprobe}, "
                f"{self.pq_bytes} bytes/row, similarities re-computed exactly"
            )
        return f"{what} ({self.reason})"


def choose_index(n: int, dim: int, kind: str = "auto", nprobe: int | None = None) -> IndexChoice:
    """Flat up to ``FLAT_MAX`` rows, IVF-Flat up to ``IVFPQ_MIN``, IVF-PQ beyond (``kind`` forces
    one). ``nlist`` = the power of two nearest 4 sqrt(N); ``nprobe`` defaults to nlist / 64
    (at least 16)."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "auto":
        if n <= FLAT_MAX:
            kind, reason = "flat", f"{n} rows <= {FLAT_MAX}"
        elif n < IVFPQ_MIN:
            kind, reason = "ivf", f"{FLAT_MAX} < {n} rows < {IVFPQ_MIN}"
        else:
            kind, reason = "ivfpq", f"{n} rows >= {IVFPQ_MIN}"
    else:
        reason = "chosen with --index"
    if kind == "flat":
        return IndexChoice("flat", reason=reason)
    nlist = 2 ** max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 training points per cell
    probe = nprobe if nprobe else max(16, nlist // 64)
    probe = min(probe, nlist)
    if kind == "ivf":
        return IndexChoice("ivf", nlist, probe, reason=reason)
    pq = max(1, dim // 4)
    while dim % pq:
        pq -= 1
    return IndexChoice("ivfpq", nlist, probe, pq_bytes=pq, reason=reason)


class NeighborIndex:
    """Cosine neighbours among the rows of ``base`` (a ``FeatureParts`` or an (N, D) array).

    ``search(queries, k)`` takes L2-normalized float32 queries and returns ``(sims, ids)``, each
    (len(queries), k), most similar first; missing neighbours (IVF cells too small) are id -1 and
    similarity -inf.
    """

    def __init__(
        self,
        base,
        *,
        kind: str = "auto",
        nprobe: int | None = None,
        seed: int = 0,
        progress: bool = True,
        block_rows: int = 65536,
    ):
        import faiss

        self.base = _as_parts(base)
        n, d = len(self.base), self.base.dim
        if n == 0:
            raise ValueError(f"{getattr(self.base, 'path', 'the base')} holds no rows")
        self.choice = choose_index(n, d, kind, nprobe)
        c = self.choice
        if c.kind == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            quantizer = faiss.IndexFlatIP(d)
            if c.kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, d, c.nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFPQ(quantizer, d, c.nlist, c.pq_bytes, 8)
                index.metric_type = faiss.METRIC_INNER_PRODUCT
            index.cp.seed = seed
            train_n = min(n, max(64 * c.nlist, 256 * 64 if c.kind == "ivfpq" else 0))
            rows = np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))
            index.train(self.base.take(rows, normalize=True))
            self._quantizer = quantizer  # keep the Python object alive with the index
            index.nprobe = c.nprobe
        self.index = index
        from tqdm import tqdm

        bar = tqdm(total=n, unit="row", desc="index", disable=not progress, file=sys.stderr)
        for _, block in self.base.blocks(block_rows, normalize=True):
            index.add(block)
            bar.update(len(block))
        bar.close()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.base))
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        if self.choice.kind == "ivfpq":  # PQ similarities are approximate: re-compute them
            sims = _exact_sims(self.base, queries, ids)
            order = np.argsort(-sims, axis=1, kind="stable")
            sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
        sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
        return sims, ids


def _exact_sims(base, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    valid = ids >= 0
    flat = ids[valid]
    uniq, inv = np.unique(flat, return_inverse=True)
    vecs = base.take(uniq, normalize=True)
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    rows = np.nonzero(valid)[0]
    out[valid] = np.einsum("ij,ij->i", queries[rows], vecs[inv])
    return out


class _ArrayParts:
    """An in-memory (N, D) array with the ``FeatureParts`` reading interface."""

    def __init__(self, x: np.ndarray):
        self.x = np.asarray(x)
        if self.x.ndim != 2:
            raise ValueError(f"expected an (N, D) array, got shape {self.x.shape}")
        self.n, self.dim = self.x.shape
        self.path = "array"

    def __len__(self) -> int:
        return self.n

    def take(self, rows, *, normalize: bool = False) -> np.ndarray:
        return _norm(self.x[np.asarray(rows)].astype(np.float32), normalize)

    def blocks(self, block_rows: int, *, normalize: bool = False):
        for s in range(0, self.n, block_rows):
            yield s, _norm(self.x[s : s + block_rows].astype(np.float32), normalize)


def _norm(x: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return x
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if not (n > 0).all():
        raise ValueError(f"row {int((n[:, 0] <= 0).argmax())} is all zeros: it has no direction")
    return x / n


def _as_parts(base):
    return base if hasattr(base, "blocks") else _ArrayParts(base)


def exact_knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of every query among ``base`` rows (both float32, as
    given: normalize first for cosine), most similar first: ``faiss.knn`` (blocked GEMM with heap
    selection; no index is built)."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    b = np.ascontiguousarray(base, dtype=np.float32)
    sims, ids = faiss.knn(q, b, min(k, len(b)), metric=faiss.METRIC_INNER_PRODUCT)
    return sims, ids
