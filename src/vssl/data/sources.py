"""Data sources: image folders, path lists, parquet manifests and WebDataset tar shards.

Every source yields the same :class:`Sample` (image, key, label, caption, metadata), so training,
packing and inspection do not care where images come from (docs/architecture.md, Data):

- :class:`FileSource` - a folder (class subfolders = labels), a ``.txt``/``.lst`` list of paths
  (optional label after a TAB), or a parquet manifest in the COYO schema (``path`` or ``url``
  column, ``text``/``caption`` column, every other column is metadata). Folder walking is
  :func:`vssl.data.listing.list_inputs`, shared with ``vssl embed``.
- :class:`ShardSource` - WebDataset tars (``key.jpg/png/webp``, ``key.cls``, ``key.txt``,
  ``key.json``), given as paths, a list or a brace pattern ``train-{000000..000099}.tar``.

Robustness (docs/architecture.md, Robustness): decoding goes through :func:`vssl.data.decode.open_image`; a bad
image, an unreadable file or a refused tar member is counted, logged with its key and reason, and
skipped - never a crash. Each source keeps the run's skips in ``source.skipped`` (a
:class:`SkipLog`; inside DataLoader workers each worker has its own copy). Tar members are
untrusted: names that are absolute or contain ``..`` are refused, non-regular members (links,
devices) are ignored, and nothing is ever unpickled (``.cls`` is parsed as a text integer,
``.json`` with :mod:`json`; ``.pyd``/``.pth``/``.pickle`` members are ignored).

Remote data: ``url`` manifests are read only for local paths and ``file://`` URLs (``http(s)://``
rows are skipped with a reason: fetch images with a downloader first). Shard names with a URL
scheme (``https://``, ``pipe:``, ``s3://``...) are opened with ``webdataset.gopen``; ``sizes.json``
is fetched beside ``scheme://`` shards. http and ``pipe:`` are tested (a 127.0.0.1 server); the
cloud schemes go through the same call but need credentials we do not have here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import unquote, urlparse

from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from .listing import LIST_SUFFIXES, list_inputs

__all__ = [
    "IMAGE_EXTS",
    "FileSource",
    "Record",
    "Sample",
    "ShardSource",
    "SkipLog",
    "expand_shards",
    "image_ext",
    "iter_tar_records",
    "make_key",
    "is_shard_spec",
    "open_source",
    "read_sizes",
    "record_to_sample",
    "transform_accepts_array",
    "transform_draft_size",
]

log = logging.getLogger(__name__)

#: Member extensions read as the image of a sample, in order of preference.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
#: Extensions never read from shards (pickles): untrusted data must not run code.
PICKLE_EXTS = ("pyd", "pth", "pt", "pickle", "pkl", "npy", "npz")
SIZES_FILE = "sizes.json"
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass
class Sample:
    """One image with what we know about it.

    ``image``: RGB ``PIL.Image`` (or raw encoded bytes when the source was made with
    ``decode=False``; after a transform, whatever the transform returns). ``key``: unique within
    the source (the WebDataset key). ``label``: class index or None. ``metadata``: JSON-able dict.
    ``source``: the file or shard it came from (for messages).
    """

    image: Any
    key: str
    label: int | None = None
    caption: str | None = None
    metadata: dict = field(default_factory=dict)
    source: str | None = None


class SkipLog:
    """Skipped inputs of a run: ``entries`` is ``[(key, reason)]``, logged as they happen.

    DataLoader workers each hold a copy of the dataset, so their skips never reach the main
    process's object. Give the log a ``path`` (``skipped.path = run_dir / "skipped.jsonl"``,
    before the loader starts its workers) and every process appends one JSON line per skip there;
    :meth:`read` then gives the whole run's summary. One ``write`` of one short line in append
    mode keeps lines from several processes whole.
    """

    def __init__(self, max_entries: int = 100_000, path: str | os.PathLike | None = None):
        self.entries: list[tuple[str, str]] = []
        self.count = 0
        self.max_entries = max_entries
        self.path = path

    def add(self, key: str, reason: str, source: str | None = None) -> None:
        """Record a skip; ``source`` (the file, when it is not the key) goes to the log and file."""
        self.count += 1
        if len(self.entries) < self.max_entries:
            self.entries.append((key, reason))
        log.warning("skipped %s: %s%s", key, reason, f" ({source})" if source else "")
        if self.path is not None:
            row = {"key": key, "reason": reason, "pid": os.getpid()}
            if source:
                row["source"] = str(source)
            line = json.dumps(row) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)

    @classmethod
    def read(cls, path: str | os.PathLike, max_entries: int = 100_000) -> SkipLog:
        """The skips every process appended to ``path`` (an empty log when there is no file)."""
        out = cls(max_entries=max_entries)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the rest still count
            out.count += 1
            if len(out.entries) < max_entries:
                out.entries.append((str(row.get("key")), str(row.get("reason"))))
        return out

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.count = 0

    def summary(self) -> str:
        if not self.count:
            return "0 skipped"
        reasons = Counter(_reason_kind(r) for _, r in self.entries)
        top = ", ".join(f"{n} {r}" for r, n in reasons.most_common(5))
        return f"{self.count} skipped ({top})"


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# ----------------------------------------------------------------------------------- keys / helpers
def make_key(rel: str | os.PathLike) -> str:
    """WebDataset key for a relative path: suffix dropped, POSIX separators, other dots -> ``_``.

    WebDataset splits a member name at the first dot of its basename, so a key must not hold one.
    """
    p = Path(rel)
    stem = p.with_suffix("").as_posix() if p.suffix else p.as_posix()
    return stem.replace(".", "_")


def _unique(keys: list[str]) -> list[str]:
    seen: Counter = Counter()
    out = []
    taken = set(keys)
    for k in keys:
        if seen[k]:
            n = seen[k]
            while f"{k}_{n}" in taken:
                n += 1
            new = f"{k}_{n}"
            taken.add(new)
            out.append(new)
        else:
            out.append(k)
        seen[k] += 1
    return out


def image_ext(data: bytes) -> str | None:
    """The member extension for encoded image bytes, from the real format (not the file name)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").upper()
    except Exception:  # noqa: BLE001 - unidentifiable: the caller reports it
        return None
    return {
        "JPEG": "jpg",
        "MPO": "jpg",
        "PNG": "png",
        "WEBP": "webp",
        "GIF": "gif",
        "BMP": "bmp",
        "TIFF": "tiff",
        "PPM": "ppm",
    }.get(fmt, fmt.lower() or None)


def _parse_label(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------------- file sources
@dataclass
class _Item:
    key: str
    path: str | None  # None: not readable here (reason in ``error``)
    label: int | None = None
    caption: str | None = None
    metadata: dict = field(default_factory=dict)
    error: str | None = None


class FileSource:
    """Images that are files: a folder, a ``.txt``/``.lst`` list, or a parquet manifest.

    Folder: labels are indices into ``classes``, the sorted first-level subfolder names (files in
    the root get None). List: labels after a TAB; integers are used as is, names are mapped through
    the sorted set of names (``classes``). Parquet (COYO schema): ``path`` (or ``url``: local path
    or ``file://`` only), ``text``/``caption``, ``label``/``cls`` (int) if present, ``key``/``id``
    for the key (else the row number); all other columns go to ``metadata``. Keys are
    :func:`make_key` of the path relative to the folder (made unique).

    Iterating yields decoded samples (``decode=False``: raw bytes), skipping bad files into
    ``skipped``; ``len()`` and ``get(i)`` give map-style access (``get`` raises ImageDecodeError).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        decode: bool = True,
        draft_size: tuple[int, int] | int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        as_array: bool = False,
    ):
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.decode = decode
        self.draft_size = draft_size
        self.as_array = as_array
        self.max_pixels = max_pixels
        self.skipped = SkipLog()
        self.classes: list[str] = []
        if not self.path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if self.path.suffix.lower() == ".parquet":
            self.items = self._from_parquet(self.path)
        else:
            self.items = self._from_listing(self.path)

    # -- building the item list
    def _from_listing(self, root: Path) -> list[_Item]:
        entries = list_inputs(root)
        base = root if root.is_dir() else root.parent
        names = sorted({lab for _, lab in entries if lab is not None})
        numeric = root.suffix.lower() in LIST_SUFFIXES and all(
            _parse_label(n) is not None for n in names
        )
        if not numeric:
            self.classes = names
        index = {n: i for i, n in enumerate(names)}
        rels = []
        for p, _ in entries:
            try:
                rels.append(p.relative_to(base))
            except ValueError:  # a list entry outside the list's folder
                rels.append(Path(*p.parts[1:]))
        keys = _unique([make_key(r) for r in rels])
        return [
            _Item(
                key=k,
                path=str(p),
                label=None if lab is None else (_parse_label(lab) if numeric else index[lab]),
            )
            for k, (p, lab) in zip(keys, entries)
        ]

    def _from_parquet(self, path: Path) -> list[_Item]:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        if not rows:
            return []
        cols = list(rows[0].keys())
        loc = "path" if "path" in cols else "url" if "url" in cols else None
        if loc is None:
            raise ValueError(f"{path}: a manifest needs a 'path' or 'url' column (has {cols})")
        text = next((c for c in ("text", "caption") if c in cols), None)
        lab = next((c for c in ("label", "cls") if c in cols), None)
        keycol = next((c for c in ("key", "id") if c in cols), None)
        special = {loc, text, lab, keycol}
        width = max(6, len(str(len(rows))))
        keys, items = [], []
        for i, row in enumerate(rows):
            keys.append(
                make_key(str(row[keycol]))
                if keycol and row[keycol] is not None
                else f"{i:0{width}d}"
            )
            where, err = _resolve_location(row[loc], path.parent)
            meta = {k: v for k, v in row.items() if k not in special}
            items.append(
                _Item(
                    key="",
                    path=where,
                    error=err,
                    label=_parse_label(row[lab]) if lab else None,
                    caption=None if text is None or row[text] is None else str(row[text]),
                    metadata=_jsonable(meta),
                )
            )
        for it, k in zip(items, _unique(keys)):
            it.key = k
        return items

    # -- access
    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Sample:
        """Sample ``i``; raises ImageDecodeError (path and reason) for an unreadable one."""
        it = self.items[i]
        if it.path is None:
            raise ImageDecodeError(it.key, it.error or "no readable location")
        if self.decode:
            image: Any = open_image(
                it.path,
                draft_size=self.draft_size,
                max_pixels=self.max_pixels,
                as_array=self.as_array,
            )
        else:
            try:
                image = _read_local(it.path)
            except OSError as exc:
                raise ImageDecodeError(it.path, f"cannot read: {exc.strerror or exc}") from None
            if not image:
                raise ImageDecodeError(it.path, "zero bytes")
        return Sample(
            image=image,
            key=it.key,
            label=it.label,
            caption=it.caption,
            metadata=dict(it.metadata),
            source=it.path,
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self.items)):
            try:
                yield self.load(i)
            except ImageDecodeError as exc:
                self.skipped.add(self.items[i].key, exc.reason, source=exc.path)


def _resolve_location(value: Any, base: Path) -> tuple[str | None, str | None]:
    if value is None or str(value).strip() == "":
        return None, "empty path/url"
    s = str(value).strip()
    if s.startswith("file://"):
        return unquote(urlparse(s).path), None
    if URL_SCHEME.match(s) and not re.match(r"^[A-Za-z]:[\\/]", s):  # not a Windows drive
        return None, f"remote URL not fetched (no network): {s}"
    p = Path(s).expanduser()
    return str(p if p.is_absolute() else base / p), None


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out


# ----------------------------------------------------------------------------------- shards
def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard names from a path, a brace pattern (``a-{000..009}.tar``), a folder (its ``*.tar``,
    sorted), a text file listing shards, or a list of any of these."""
    from braceexpand import braceexpand

    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    out: list[str] = []
    for s in shards:
        s = os.fspath(s)
        if URL_SCHEME.match(s) and not s.startswith("file:"):
            out.extend(braceexpand(s))
            continue
        if s.startswith("file://"):
            s = unquote(urlparse(s).path)
        if os.path.isdir(s):
            out.extend(
                sorted(
                    str(p)
                    for p in Path(s).iterdir()
                    if p.suffix in (".tar", ".tgz") or p.name.endswith(".tar.gz")
                )
            )
            continue
        if s.endswith(LIST_SUFFIXES) and os.path.isfile(s):
            base = Path(s).parent
            with open(s, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            out.extend(
                expand_shards(
                    [
                        ln if os.path.isabs(ln) or URL_SCHEME.match(ln) else str(base / ln)
                        for ln in lines
                    ]
                )
            )
            continue
        out.extend(braceexpand(s))
    return out


def read_sizes(shards: Sequence[str]) -> dict[str, int] | None:
    """``{shard: samples}`` from the ``sizes.json`` files next to the shards (local, or fetched
    beside ``http(s)://``, ``s3://``... shards); None if any shard is missing from them or its
    folder has none (``pipe:`` shards have no folder)."""
    cache: dict[str, dict] = {}
    out: dict[str, int] = {}
    for s in shards:
        remote = bool(URL_SCHEME.match(s))
        if remote and (s.startswith("pipe:") or "/" not in s.split("://", 1)[-1]):
            return None
        d = s.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(s))
        if d not in cache:
            cache[d] = _read_sizes_file(
                f"{d}/{SIZES_FILE}" if remote else os.path.join(d, SIZES_FILE)
            )
        n = cache[d].get(s.rsplit("/", 1)[-1] if remote else os.path.basename(s))
        if not isinstance(n, int):
            return None
        out[s] = n
    return out


def _read_sizes_file(where: str) -> dict:
    """A ``sizes.json`` as a dict; {} when it is missing, unreadable or not a JSON object."""
    try:
        with _open_shard(where) as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - no sizes file (or no access) just means "count unknown"
        return {}
    return data if isinstance(data, dict) else {}


def _open_shard(shard: str):
    if URL_SCHEME.match(shard):
        import webdataset as wds  # http(s) (curl), pipe:, s3/gs... (fsspec) handled by webdataset

        return wds.gopen(shard, "rb")
    return open(shard, "rb")


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = dir + basename up to its first dot, ext = the rest."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _unsafe_name(name: str) -> bool:
    n = name.replace("\\", "/")
    return n.startswith("/") or bool(re.match(r"^[A-Za-z]:", n)) or ".." in n.split("/")


@dataclass
class Record:
    """Raw members of one sample in a shard: ``files`` maps extension -> bytes."""

    key: str
    files: dict[str, bytes]
    shard: str


def iter_tar_records(shard: str, skipped: SkipLog | None = None) -> Iterator[Record]:
    """Group a tar's members into records (consecutive members sharing a key), streaming.

    Refused members (absolute names, ``..``) are skipped into ``skipped``; a shard that cannot be
    opened or is cut short ends with a skip entry, not an exception.
    """
    skipped = skipped if skipped is not None else SkipLog()
    name = os.path.basename(shard)
    cur: Record | None = None
    try:
        with _open_shard(shard) as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
            for m in tf:
                if _unsafe_name(m.name):
                    skipped.add(f"{name}:{m.name}", "refused member name (absolute or '..')")
                    continue
                if not m.isfile():
                    continue
                mname = m.name[2:] if m.name.startswith("./") else m.name
                parts = _split_member(mname)
                if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
                    continue  # no extension, or WebDataset's __key__-style internals
                key, ext = parts
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if cur is not None and cur.key != key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = Record(key=key, files={}, shard=shard)
                cur.files[ext] = data
    except (OSError, tarfile.TarError, EOFError) as exc:
        skipped.add(name, f"unreadable shard: {exc}")
    if cur is not None:
        yield cur


def record_to_sample(
    rec: Record,
    *,
    decode: bool = True,
    draft_size: tuple[int, int] | int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    as_array: bool = False,
) -> Sample:
    """Turn a raw record into a Sample; raises ImageDecodeError(``shard:key``, reason).
    ``as_array``: the image as an (H, W, 3) uint8 array instead of PIL (see ``open_image``)."""
    where = f"{os.path.basename(rec.shard)}:{rec.key}"
    ext = next((e for e in IMAGE_EXTS if e in rec.files), None)
    if ext is None:
        raise ImageDecodeError(where, f"no image member (has {sorted(rec.files) or 'nothing'})")
    data = rec.files[ext]
    if decode:
        try:
            image: Any = open_image(
                data, draft_size=draft_size, max_pixels=max_pixels, as_array=as_array
            )
        except ImageDecodeError as exc:
            raise ImageDecodeError(where, exc.reason) from None
    else:
        if not data:
            raise ImageDecodeError(where, "zero bytes")
        image = data
    label = None
    if "cls" in rec.files:
        label = _parse_label(rec.files["cls"])
        if label is None:
            raise ImageDecodeError(where, "bad .cls member (not a text integer)")
    caption = None
    for t in ("txt", "text", "caption"):
        if t in rec.files:
            caption = rec.files[t].decode("utf-8", "replace")
            break
    metadata: dict = {}
    if "json" in rec.files:
        try:
            metadata = json.loads(rec.files["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ImageDecodeError(where, "bad .json member") from None
        if not isinstance(metadata, dict):
            metadata = {"json": metadata}
    return Sample(
        image=image, key=rec.key, label=label, caption=caption, metadata=metadata, source=rec.shard
    )


class ShardSource:
    """WebDataset tar shards read in order (no shuffling, no splitting: see ``stream.py``).

    ``shards``: anything :func:`expand_shards` accepts. Yields :class:`Sample`; bad members,
    refused member names and unreadable shards go to ``skipped``.
    """

    def __init__(
        self,
        shards,
        *,
        decode: bool = True,
        draft_size: tuple[int, int] | int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        as_array: bool = False,
    ):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no shards in {shards!r}")
        self.decode = decode
        self.draft_size = draft_size
        self.as_array = as_array
        self.max_pixels = max_pixels
        self.skipped = SkipLog()

    def records(self, shards: Iterable[str] | None = None) -> Iterator[Record]:
        for s in self.shards if shards is None else shards:
            yield from iter_tar_records(s, self.skipped)

    def to_sample(self, rec: Record) -> Sample | None:
        """The decoded sample, or None (recorded in ``skipped``) for a bad one."""
        try:
            return record_to_sample(
                rec,
                decode=self.decode,
                draft_size=self.draft_size,
                max_pixels=self.max_pixels,
                as_array=self.as_array,
            )
        except ImageDecodeError as exc:
            self.skipped.add(exc.path, exc.reason)
            return None

    def __iter__(self) -> Iterator[Sample]:
        for rec in self.records():
            s = self.to_sample(rec)
            if s is not None:
                yield s


Source = Union[FileSource, ShardSource]  # noqa: UP007 (runtime alias)


def is_shard_spec(src: Any) -> bool:
    """True for things that name tar shards (a .tar path, a brace pattern, a folder of tars...)."""
    if not isinstance(src, (str, os.PathLike)):
        return isinstance(src, (list, tuple)) and all(is_shard_spec(s) for s in src) and bool(src)
    s = os.fspath(src)
    if "{" in s and ".." in s and "}" in s:
        return True
    if s.endswith((".tar", ".tgz", ".tar.gz")):
        return True
    if os.path.isdir(s):
        entries = [p for p in Path(s).iterdir() if not p.name.startswith(".")]
        return bool(entries) and all(
            p.is_file() and (p.suffix == ".tar" or p.name == SIZES_FILE or p.name == "classes.json")
            for p in entries
        )
    return False


def open_source(src, **kw) -> Source:
    """A :class:`ShardSource` for shard specs, else a :class:`FileSource` (folder/list/parquet)."""
    if isinstance(src, (FileSource, ShardSource)):
        return src
    if is_shard_spec(src):
        return ShardSource(src, **kw)
    return FileSource(src, **kw)


def transform_draft_size(transform: Callable | None) -> tuple[int, int] | int | None:
    """The ``draft_size`` a transform declares (attribute or property), else None."""
    ds = getattr(transform, "draft_size", None) if transform is not None else None
    return ds() if callable(ds) else ds


def transform_accepts_array(transform: Callable | None) -> bool:
    """Whether a transform declares ``accepts_array`` (it takes ``open_image(as_array=True)``'s
    (H, W, 3) uint8 arrays as well as PIL images), so sources can skip the PIL round trip."""
    return bool(getattr(transform, "accepts_array", False)) if transform is not None else False
