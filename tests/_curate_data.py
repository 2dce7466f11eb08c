"""Helpers for the curate tests: features folders written the way `vssl embed` writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_features(folder: Path, x: np.ndarray, paths=None, labels=None, dtype=np.float16) -> Path:
    """An embed-style folder: ``embeddings.npy`` (float16 by default) + ``manifest.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", x.astype(dtype))
    n = len(x)
    paths = paths if paths is not None else [f"/img/{folder.name}/{i:06d}.jpg" for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "row": pa.array(np.arange(n), type=pa.int64()),
                "path": pa.array(paths, type=pa.string()),
                "label": pa.array(labels if labels is not None else [None] * n, type=pa.string()),
            }
        ),
        folder / "manifest.parquet",
    )
    return folder


def write_parts(folder: Path, x: np.ndarray, world: int) -> Path:
    """``x`` split into ``world`` contiguous parts ``part-RRRRR-of-WWWWW``."""
    bounds = np.linspace(0, len(x), world + 1).round().astype(int)
    for r in range(world):
        write_features(
            folder / f"part-{r:05d}-of-{world:05d}",
            x[bounds[r] : bounds[r + 1]],
            paths=[f"/img/{i:06d}.jpg" for i in range(bounds[r], bounds[r + 1])],
        )
    return folder


def planted(n: int, d: int, n_dups: int, seed: int = 0, noise: float = 0.05):
    """Random unit vectors plus ``n_dups`` noisy copies of random rows (appended, shuffled in).

    Returns ``(x, pairs)``: pairs of row indices that are planted near-duplicates."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n - n_dups, d)).astype(np.float32)
    src = rng.choice(n - n_dups, n_dups, replace=False)
    copies = base[src] + noise * rng.standard_normal((n_dups, d)).astype(
        np.float32
    ) * np.linalg.norm(base[src], axis=1, keepdims=True) / np.sqrt(d)
    x = np.concatenate([base, copies])
    perm = rng.permutation(n)
    inv = np.argsort(perm)
    x = x[perm]
    pairs = np.stack([inv[src], inv[np.arange(n - n_dups, n)]], axis=1)
    return x, pairs


def brute_components(x: np.ndarray, threshold: float) -> np.ndarray:
    """Reference: per row, the lowest row of its component under ALL pairs with cosine >
    threshold (a dense similarity matrix, union-find by hand-free scipy on the dense graph)."""
    from scipy.sparse.csgraph import connected_components

    u = x.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    adj = (u @ u.T) > threshold
    np.fill_diagonal(adj, False)
    _, labels = connected_components(adj, directed=False)
    first = {}
    for i, lab in enumerate(labels):
        first.setdefault(lab, i)
    return np.array([first[lab] for lab in labels])
