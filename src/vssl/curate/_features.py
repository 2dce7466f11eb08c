"""Read `vssl embed` features for curation: many parts, memory-mapped, never loaded whole.

A features folder is either one ``vssl embed`` output (``embeddings.npy`` + ``manifest.parquet``)
or a folder of parts ``part-RRRRR-of-WWWWW/``, each one such output (``vssl embed`` under
``torchrun`` writes one per rank). Rows are numbered globally: part 0's rows first, then part 1's.
Features stay memory maps (float16 or float32 on disk) and are read in float32 blocks, so a
billion-row pool never has to fit in RAM (docs/architecture.md, Curation).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDINGS = "embeddings.npy"
MANIFEST = "manifest.parquet"
PART_RE = re.compile(r"^part-(\d+)-of-(\d+)$")
BLOCK_ROWS = 65536


@dataclass
class _Part:
    folder: Path
    features: np.ndarray  # (n, D) read-only memory map
    start: int  # global index of the first row


class FeatureParts:
    """All parts of a features folder as one lazily read (N, D) matrix plus one manifest.

    ``normalize=True`` (cosine: dedup, retrieval) L2-normalizes every block and refuses zero rows;
    NaN/Inf rows are always refused, naming the part file and the row.
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "features"):
        self.path = Path(path)
        self.what = what
        folders = self._part_folders(self.path)
        self.parts: list[_Part] = []
        start, dim = 0, None
        for folder in folders:
            feats = np.load(folder / EMBEDDINGS, mmap_mode="r")
            if feats.ndim != 2:
                raise ValueError(f"{folder / EMBEDDINGS} has shape {feats.shape}, expected (N, D)")
            if dim is not None and feats.shape[1] != dim:
                raise ValueError(
                    f"{folder / EMBEDDINGS} has width {feats.shape[1]} but the other parts have "
                    f"{dim}: the parts come from different models; embed them all with one model"
                )
            dim = feats.shape[1]
            rows = _manifest_rows(folder / MANIFEST)
            if rows != feats.shape[0]:
                raise ValueError(
                    f"{folder / EMBEDDINGS} has {feats.shape[0]} rows but {folder / MANIFEST} "
                    f"lists {rows}: features and manifest are of different lengths (the folder "
                    "mixes two runs or one was cut short); re-run `vssl embed` into a clean folder"
                )
            self.parts.append(_Part(folder, feats, start))
            start += feats.shape[0]
        self.n, self.dim = start, int(dim or 0)
        self._starts = np.array([p.start for p in self.parts], dtype=np.int64)

    @staticmethod
    def _part_folders(path: Path) -> list[Path]:
        if not path.exists():
            raise FileNotFoundError(f"features folder not found: {path}")
        if (path / EMBEDDINGS).is_file():
            folders = [path]
        elif path.is_dir():
            folders = sorted(
                (d for d in path.iterdir() if d.is_dir() and PART_RE.match(d.name)),
                key=lambda d: int(PART_RE.match(d.name).group(1)),
            )
            worlds = {int(PART_RE.match(d.name).group(2)) for d in folders}
            if len(worlds) > 1:
                raise ValueError(
                    f"{path} holds parts of runs with different world sizes {sorted(worlds)}: "
                    "keep the parts of one `vssl embed` run per folder"
                )
            if folders and len(folders) != next(iter(worlds)):
                raise ValueError(
                    f"{path} holds {len(folders)} parts of a {next(iter(worlds))}-rank embed run: "
                    "a rank did not finish; re-run `vssl embed` for the missing parts"
                )
        else:
            folders = []
        if not folders:
            raise ValueError(
                f"{path} is not a features folder (no {EMBEDDINGS} and no part-R-of-W/ folders): "
                "make one with `vssl embed MODEL --input IMAGES --output DIR`"
            )
        for f in folders:
            if not (f / EMBEDDINGS).is_file() or not (f / MANIFEST).is_file():
                raise ValueError(
                    f"{f} lacks {EMBEDDINGS} or {MANIFEST}: the embed run did not finish; "
                    "re-run `vssl embed`"
                )
        return folders

    def __len__(self) -> int:
        return self.n

    def _locate(self, row: int) -> tuple[_Part, int]:
        i = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.parts[i], row - self.parts[i].start

    def block(self, start: int, stop: int, *, normalize: bool = False) -> np.ndarray:
        """Rows ``start:stop`` as float32 (checked: finite; with ``normalize``, non-zero)."""
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        row = start
        while row < stop:
            part, local = self._locate(row)
            take = min(stop - row, part.features.shape[0] - local)
            out[row - start : row - start + take] = part.features[local : local + take]
            row += take
        self._check(out, start, normalize)
        return out

    def take(self, rows: np.ndarray, *, normalize: bool = False) -> np.ndarray:
        """Arbitrary rows (any order) as float32, read part by part in sorted order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        which = np.searchsorted(self._starts, rows[order], side="right") - 1
        for i in np.unique(which):
            sel = order[which == i]
            out[sel] = self.parts[i].features[rows[sel] - self.parts[i].start]
        if len(rows):
            bad = ~np.isfinite(out).all(axis=1)
            if bad.any():
                self._raise_bad(int(rows[bad.argmax()]), "NaN or Inf values")
        if normalize:
            out = _normalize(out, lambda j: self._raise_bad(int(rows[j]), "all zeros"))
        return out

    def blocks(
        self, block_rows: int = BLOCK_ROWS, *, normalize: bool = False, start: int = 0, stop=None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 block)`` over rows ``start:stop``."""
        stop = self.n if stop is None else stop
        for s in range(start, stop, block_rows):
            yield s, self.block(s, min(s + block_rows, stop), normalize=normalize)

    def _check(self, out: np.ndarray, start: int, normalize: bool) -> None:
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            self._raise_bad(start + int((~finite).argmax()), "NaN or Inf values")
        if normalize:
            out[:] = _normalize(out, lambda j: self._raise_bad(start + j, "all zeros"))

    def _raise_bad(self, row: int, problem: str):
        part, local = self._locate(row)
        raise ValueError(
            f"{self.what} row {row} ({part.folder / EMBEDDINGS}, row {local}) holds {problem}: "
            "the image or the model is broken; remove the row (filter the manifest and re-embed) "
            "or re-run `vssl embed` with working weights"
        )

    def manifest(self):
        """One pyarrow table for all parts: ``row`` is the global row; with several parts, ``part``
        names each row's part folder and ``part_row`` its row there."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for p in self.parts:
            t = pq.read_table(p.folder / MANIFEST)
            n = t.num_rows
            if "row" in t.column_names:
                t = t.drop(["row"])
            t = t.add_column(0, "row", pa.array(np.arange(p.start, p.start + n, dtype=np.int64)))
            if len(self.parts) > 1:
                t = t.append_column("part", pa.array([p.folder.name] * n, type=pa.string()))
                t = t.append_column("part_row", pa.array(np.arange(n, dtype=np.int64)))
            tables.append(t)
        return pa.concat_tables(tables, promote_options="default")

    def check_width(self, other: FeatureParts) -> None:
        if other.dim != self.dim:
            raise ValueError(
                f"{self.what} {self.path} have width {self.dim} but {other.what} {other.path} "
                f"have {other.dim}: a dimension mismatch; embed both with the same model"
            )


def _normalize(x: np.ndarray, on_zero) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    if len(norms) and not (norms > 0).all():
        on_zero(int((norms <= 0).argmax()))
    x /= norms[:, None]
    return x


def _manifest_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
