"""``vssl curate dedup``: remove near-duplicate images, DINOv2's way (Oquab et al. 2023, Sec. 3).

Self-dedup: each image's ``k`` (64) cosine nearest neighbours; an edge wherever the similarity is
above the threshold (0.6); the connected components of that graph (scipy); one image kept per
component (the lowest row). Relative dedup (``--against``): pool images closer than 0.45 to any
image of an evaluation set are removed. ``--phash``: near-duplicates by the Hamming distance of
64-bit perceptual hashes (the manifest's ``image_phash``, as in COYO, or computed with imagehash).

Output: the kept rows as a parquet manifest, and beside it ``OUT.removed.parquet``: each removed
row, the row it duplicates (``duplicate_of``, its ``duplicate_of_path``) and their similarity (or
Hamming distance), so nothing is dropped without a trace.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

HELP = "remove near-duplicates: kNN + cosine threshold + connected components, or pHash"

_EPILOG = """\
examples:
  vssl curate dedup feats/ --out keep.parquet                              # self-dedup, 0.6
  vssl curate dedup feats/ --against eval_feats/ --out keep.parquet        # vs eval sets, 0.45
  vssl curate dedup coyo.parquet --phash --max-distance 4 --out keep.parquet

FEATS is a `vssl embed` output folder (or a folder of its torchrun parts). The kept rows go to
OUT, the removed ones with the row they duplicate to OUT.removed.parquet.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dedup",
        help=HELP,
        description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", metavar="FEATS|MANIFEST", help="features folder, or with --phash a manifest"
    )
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="the kept rows")
    p.add_argument(
        "--against",
        metavar="EVAL_FEATS",
        action="append",
        help="remove pool rows similar to these features (evaluation sets; repeatable)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cosine similarity above which two images are duplicates (default 0.6; 0.45 with "
        "--against, DINOv2's values)",
    )
    p.add_argument("--k", type=int, default=64, help="neighbours searched per image (default 64)")
    p.add_argument(
        "--index",
        default="auto",
        choices=("auto", "flat", "ivf", "ivfpq"),
        help="faiss index (default auto: exact flat up to 262144 rows, IVF beyond)",
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched (default nlist/64)")
    p.add_argument("--phash", action="store_true", help="dedup by perceptual hash instead")
    p.add_argument(
        "--max-distance",
        type=int,
        default=4,
        help="with --phash: Hamming distance (of 64 bits) at or below which images are "
        "duplicates (default 4)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ._output import check_out

    out = check_out(args.out, "dedup")
    if args.phash:
        if args.against:
            raise ValueError("--phash and --against do not combine: dedup by pHash or by features")
        return _run_phash(args, out)
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    threshold = args.threshold if args.threshold is not None else (0.45 if args.against else 0.6)
    if not -1 <= threshold <= 1:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    from ._features import FeatureParts

    pool = FeatureParts(args.source, what="features")
    if args.against:
        evals = [FeatureParts(a, what="--against features") for a in args.against]
        for e in evals:
            pool.check_width(e)
        result = relative_dedup(
            pool, evals, threshold, index=args.index, progress=not args.no_progress
        )
    else:
        result = self_dedup(
            pool,
            threshold,
            k=args.k,
            index=args.index,
            nprobe=args.nprobe,
            progress=not args.no_progress,
        )
    _write(pool.manifest(), result, out, "similarity")
    return 0


class DedupResult:
    """``keep`` (bool per row), and for each removed row its ``duplicate_of`` (a kept row, or a
    row of an --against set), ``score`` (cosine or Hamming) and the search ``description``."""

    def __init__(self, keep, duplicate_of, score, description: str, other_paths=None):
        self.keep, self.duplicate_of, self.score = keep, duplicate_of, score
        self.description = description
        self.other_paths = other_paths  # --against: the paths of duplicate_of's set


def components_keep_first(n: int, src: np.ndarray, dst: np.ndarray):
    """Connected components of the undirected graph (scipy); keep the lowest row of each.

    Returns ``(keep, representative)``: a bool mask and, per row, its component's kept row."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    graph = sp.coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n, dtype=np.int64))
    rep = first[labels]
    return rep == np.arange(n), rep


def self_dedup(
    feats,
    threshold: float = 0.6,
    *,
    k: int = 64,
    index: str = "auto",
    nprobe: int | None = None,
    progress: bool = True,
    block_rows: int = 16384,
) -> DedupResult:
    """DINOv2's self-dedup of a ``FeatureParts`` (see the module docstring)."""
    from tqdm import tqdm

    from ..neighbors import NeighborIndex
    from ._output import note

    idx = NeighborIndex(feats, kind=index, nprobe=nprobe, progress=progress)
    note("dedup", f"{len(feats)} rows: {idx.choice.describe()}")
    src, dst = [], []
    bar = tqdm(total=len(feats), unit="row", desc="search", disable=not progress, file=sys.stderr)
    for start, block in feats.blocks(block_rows, normalize=True):
        sims, ids = idx.search(block, k + 1)  # +1: the row itself
        rows = np.arange(start, start + len(block))[:, None]
        hit = (sims > threshold) & (ids != rows) & (ids >= 0)
        src.append(np.broadcast_to(rows, ids.shape)[hit])
        dst.append(ids[hit])
        bar.update(len(block))
    bar.close()
    src, dst = np.concatenate(src), np.concatenate(dst)
    keep, rep = components_keep_first(len(feats), src, dst)
    removed = np.nonzero(~keep)[0]
    score = np.full(len(feats), np.nan, dtype=np.float32)
    for s in range(0, len(removed), block_rows):  # exact cosine to the kept row of the component
        r = removed[s : s + block_rows]
        a, b = feats.take(r, normalize=True), feats.take(rep[r], normalize=True)
        score[r] = np.einsum("ij,ij->i", a, b)
    return DedupResult(keep, rep, score, idx.choice.describe())


def relative_dedup(
    pool, against: list, threshold: float = 0.45, *, index: str = "auto", progress: bool = True
) -> DedupResult:
    """Remove pool rows whose most similar row in any ``against`` set is above ``threshold``."""
    from ..neighbors import NeighborIndex
    from ._output import note

    best = np.full(len(pool), -np.inf, dtype=np.float32)
    which = np.full(len(pool), -1, dtype=np.int64)
    paths = np.full(len(pool), None, dtype=object)
    descriptions = []
    for ev in against:
        idx = NeighborIndex(ev, kind=index, progress=progress)
        descriptions.append(idx.choice.describe())
        note("dedup", f"against {ev.path} ({len(ev)} rows): {idx.choice.describe()}")
        ev_paths = np.asarray(ev.manifest().column("path").to_pylist(), dtype=object)
        for start, block in pool.blocks(16384, normalize=True):
            sims, ids = idx.search(block, 1)
            sl = slice(start, start + len(block))
            better = sims[:, 0] > best[sl]
            best[sl] = np.where(better, sims[:, 0], best[sl])
            which[sl] = np.where(better, ids[:, 0], which[sl])
            paths[sl] = np.where(better, ev_paths[np.maximum(ids[:, 0], 0)], paths[sl])
    keep = ~(best > threshold)
    return DedupResult(keep, which, best, "; ".join(descriptions), other_paths=paths)


def _write(table, result: DedupResult, out, score_name: str) -> None:
    import pyarrow as pa

    from ._output import note, sidecar, write_table

    keep = result.keep
    removed = np.nonzero(~keep)[0]
    kept_table = table.filter(pa.array(keep))
    gone = table.take(pa.array(removed))
    if result.other_paths is None:
        dup_paths = table.column("path").take(pa.array(result.duplicate_of[removed]))
    else:
        dup_paths = pa.array(list(result.other_paths[removed]), type=pa.string())
    gone = gone.append_column("duplicate_of", pa.array(result.duplicate_of[removed]))
    gone = gone.append_column("duplicate_of_path", dup_paths)
    gone = gone.append_column(score_name, pa.array(result.score[removed]))
    write_table(kept_table, out)
    side = write_table(gone, sidecar(out, "removed"))
    note(
        "dedup",
        f"kept {kept_table.num_rows} of {table.num_rows} rows -> {out}; "
        f"{gone.num_rows} removed -> {side}",
    )


# ------------------------------------------------------------------------------------ pHash
def parse_phash(values) -> tuple[np.ndarray, np.ndarray]:
    """64-bit pHashes (16-digit hex strings as imagehash and COYO write them, or integers) ->
    ``(uint8 codes (N, 8), valid mask)``; a missing or malformed value is invalid."""
    codes = np.zeros((len(values), 8), dtype=np.uint8)
    valid = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            b = (
                int(v).to_bytes(8, "big", signed=int(v) < 0)
                if not isinstance(v, str)
                else bytes.fromhex(v.strip())
            )
        except (ValueError, OverflowError):
            continue
        if len(b) == 8:
            codes[i] = np.frombuffer(b, dtype=np.uint8)
            valid[i] = True
    return codes, valid


def compute_phash(paths, progress: bool = True) -> list[str | None]:
    """imagehash's pHash (DCT of the 32x32 grey image, 64 bits) of each image, as hex; None for
    an image that cannot be read."""
    import imagehash
    from tqdm import tqdm

    from ..data.decode import open_image

    out: list[str | None] = []
    for p in tqdm(paths, unit="img", desc="pHash", disable=not progress, file=sys.stderr):
        try:
            out.append(str(imagehash.phash(open_image(p))))
        except Exception:  # noqa: BLE001 - any unreadable image: no hash, reported by the caller
            out.append(None)
    return out


def phash_dedup(codes: np.ndarray, max_distance: int = 4, *, progress: bool = True) -> DedupResult:
    """Near-duplicates by Hamming distance <= ``max_distance``: faiss's exact binary range search,
    connected components, one kept per component."""
    import faiss
    from tqdm import tqdm

    n = len(codes)
    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(codes))
    src, dst = [], []
    bar = tqdm(total=n, unit="row", desc="hamming", disable=not progress, file=sys.stderr)
    for s in range(0, n, 65536):
        lims, _, ids = index.range_search(
            np.ascontiguousarray(codes[s : s + 65536]), max_distance + 1
        )
        lims = lims.astype(np.int64)
        rows = np.repeat(np.arange(s, s + len(lims) - 1), np.diff(lims))
        other = ids != rows
        src.append(rows[other])
        dst.append(ids[other])
        bar.update(len(lims) - 1)
    bar.close()
    keep, rep = components_keep_first(n, np.concatenate(src), np.concatenate(dst))
    bits = np.unpackbits(codes ^ codes[rep], axis=1).sum(axis=1).astype(np.float32)
    return DedupResult(
        keep, rep, bits, f"exact Hamming range search (faiss IndexBinaryFlat), <= {max_distance}"
    )


def _run_phash(args, out) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ._output import note

    src = args.source
    if not str(src).endswith(".parquet"):
        raise ValueError(
            f"--phash reads a parquet manifest (a path column, optionally image_phash); got {src}"
        )
    if not (0 <= args.max_distance < 64):
        raise ValueError(f"--max-distance must be in [0, 63] bits, got {args.max_distance}")
    table = pq.read_table(src)
    if "image_phash" in table.column_names:
        hashes = table.column("image_phash").to_pylist()
        where = "the manifest's image_phash"
    else:
        if "path" not in table.column_names:
            raise ValueError(
                f"{src} has neither image_phash nor path: --phash needs the hashes or the images"
            )
        hashes = compute_phash(table.column("path").to_pylist(), progress=not args.no_progress)
        table = table.append_column("image_phash", pa.array(hashes, type=pa.string()))
        where = "pHash computed with imagehash"
    codes, valid = parse_phash(hashes)
    bad = np.nonzero(~valid)[0]
    if len(bad):
        note(
            "dedup",
            f"WARNING: {len(bad)} rows have no usable pHash (e.g. row {bad[0]}: "
            f"{hashes[bad[0]]!r}); they are kept and not compared",
        )
    good = np.nonzero(valid)[0]
    res = phash_dedup(codes[good], args.max_distance, progress=not args.no_progress)
    keep = np.ones(len(table), dtype=bool)
    keep[good] = res.keep
    dup = np.full(len(table), -1, dtype=np.int64)
    dup[good] = good[res.duplicate_of]
    score = np.full(len(table), np.nan, dtype=np.float32)
    score[good] = res.score
    note("dedup", f"{len(table)} rows, {where}: {res.description}")
    if "path" not in table.column_names:
        raise ValueError(f"{src} has no path column: the output manifest needs one")
    _write(table, DedupResult(keep, dup, score, res.description), out, "hamming")
    return 0
