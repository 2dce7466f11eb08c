"""Writing curation outputs: parquet manifests, atomically, that `vssl data pack` and
`vssl pretrain data.train=` read (a ``path`` column plus metadata columns)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .._io import atomic_write


def write_table(table, path: str | os.PathLike) -> Path:
    """Write a pyarrow table as parquet via a temporary file and a rename."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def sidecar(out: str | os.PathLike, name: str) -> Path:
    """``keep.parquet`` -> ``keep.<name>.parquet``: a second output beside the main one."""
    p = Path(out)
    return p.with_name(f"{p.stem}.{name}.parquet")


def check_out(out: str | os.PathLike, step: str) -> Path:
    p = Path(out)
    if p.suffix.lower() != ".parquet":
        raise ValueError(f"--out {p} must end in .parquet (the output is a parquet manifest)")
    if p.exists() and p.is_dir():
        raise ValueError(f"--out {p} is a folder: give a file name ending in .parquet")
    return p


def note(step: str, msg: str) -> None:
    print(f"vssl curate {step}: {msg}", file=sys.stderr, flush=True)
