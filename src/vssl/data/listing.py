"""Walking user inputs: a folder (class subfolders = labels), a list file, or one image.

Shared by ``vssl embed`` and the data sources (``vssl.data.sources``), so both see the same files
in the same order with the same labels.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LIST_SUFFIXES", "InputList", "list_inputs"]

LIST_SUFFIXES = (".txt", ".lst")

InputList = list[tuple[Path, "str | None"]]


def list_inputs(path: str | os.PathLike) -> InputList:
    """The inputs behind ``path`` as ``[(absolute path, label or None)]``, in a deterministic order.

    - a folder: every non-hidden file below it (hidden files and folders skipped), sorted by
      relative path; the label is the first-level subfolder's name (None for files in the root),
      the usual ``class/image.jpg`` layout. Non-image files are kept: they become skipped inputs
      with an error line, so nothing disappears silently.
    - a ``.txt`` / ``.lst`` file: one path per line, relative paths resolved against the list's
      folder; blank lines and ``#`` comments skipped; an optional label after a TAB.
    - any other file: that single image.

    Raises FileNotFoundError when ``path`` does not exist.
    """
    root = Path(os.path.abspath(os.fspath(path)))
    if not root.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if root.is_dir():
        found: list[tuple[tuple[str, ...], Path]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                found.append((p.relative_to(root).parts, p))
        found.sort(key=lambda t: t[0])
        return [(p, parts[0] if len(parts) > 1 else None) for parts, p in found]
    if root.suffix.lower() in LIST_SUFFIXES:
        out: InputList = []
        with open(root, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                item, _, label = line.partition("\t")
                item = item.strip()
                p = Path(item).expanduser()
                if not p.is_absolute():
                    p = root.parent / p
                out.append((Path(os.path.abspath(p)), label.strip() or None))
        return out
    return [(root, None)]
