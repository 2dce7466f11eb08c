"""Pack images into WebDataset tar shards, and inspect shards (``vssl data pack`` / ``inspect``).

``pack`` stores each image's **original encoded bytes** (no re-encode, no quality loss) as
``key.<ext>`` where ``ext`` comes from the file's real format (a PNG named ``.jpg`` is stored as
``.png``), plus ``key.cls`` (label, text integer), ``key.txt`` (caption) and ``key.json``
(metadata) when present. Before an image is written it is decoded once with ``open_image`` at the
cheapest JPEG draft scale: whatever is packed is known to decode, and anything that does not
(truncated, zero bytes, not an image, decompression bomb) is skipped and listed in the stats.
Shards are written to a temporary name and renamed when complete; ``sizes.json`` ({shard: samples})
and ``classes.json`` (class names, when the source has them) are written last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_write
from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from .sources import (
    IMAGE_EXTS,
    SIZES_FILE,
    URL_SCHEME,
    FileSource,
    SkipLog,
    expand_shards,
    image_ext,
    iter_tar_records,
    open_source,
    record_to_sample,
)

__all__ = ["PackStats", "add_data_parser", "inspect", "inspect_shards", "pack", "parse_size"]

_TAR_BLOCK = 512


def parse_size(text: str | int | None) -> int | None:
    """``"1GB"``, ``"500MB"``, ``"3.5G"``, ``"1GiB"``, ``"1024"`` -> bytes (decimal units: 1GB = 1e9;
    ``KiB/MiB/GiB`` are binary). None/``"0"``/``"none"`` -> no limit."""
    if text is None or isinstance(text, int):
        return text or None
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "0", "none", "inf"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(i?)b?", s)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 1GB, 500MB, 3.5GiB or bytes")
    num, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if binary else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    return int(num * base**power)


def _member_bytes(n: int) -> int:
    return _TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_size(content: int) -> int:
    """Final size of a tar holding ``content`` bytes of members: two zero blocks at the end, then
    padding to a whole record (tarfile.RECORDSIZE, 10 KiB)."""
    return -(-(content + 2 * _TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class PackStats:
    shards: dict[str, int] = field(default_factory=dict)  # shard filename -> samples
    samples: int = 0
    bytes: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "shards": dict(self.shards),
            "samples": self.samples,
            "bytes": self.bytes,
            "formats": dict(self.formats),
            "skipped": [list(s) for s in self.skipped],
            "seconds": round(self.seconds, 3),
        }


class _ShardWriter:
    def __init__(
        self, out_dir: Path, prefix: str, samples_per_shard: int, max_shard_bytes: int | None
    ):
        self.out_dir, self.prefix = out_dir, prefix
        self.samples_per_shard, self.max_bytes = samples_per_shard, max_shard_bytes
        self.index = -1
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.size = 0
        self.done: dict[str, int] = {}

    def _name(self) -> str:
        return f"{self.prefix}-{self.index:06d}.tar"

    def _open(self) -> None:
        self.index += 1
        self.tmp = self.out_dir / (self._name() + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.count, self.size = 0, 0  # bytes of headers + data written so far

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        os.replace(self.tmp, self.out_dir / self._name())
        self.done[self._name()] = self.count
        self.tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        need = sum(_member_bytes(len(v)) for v in members.values())
        if self.tar is not None and (
            self.count >= self.samples_per_shard
            or (
                self.max_bytes is not None
                and self.count > 0
                and _tar_file_size(self.size + need) > self.max_bytes
            )
        ):
            self.close()
        if self.tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.size += need


def _safe_key(key: str) -> str | None:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "." in key:
        return None
    if len(key) > 1000:
        return None
    return key


def pack(
    source,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    max_shard_bytes: int | str | None = "1GB",
    prefix: str = "shard",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    verify: bool = True,
    progress: bool = False,
) -> PackStats:
    """Write ``source`` (a folder, list, parquet manifest, shards, or a source object) as
    WebDataset tars ``out_dir/{prefix}-000000.tar`` ... plus ``sizes.json``; return the stats.

    A shard is closed at ``samples_per_shard`` samples or before it would pass
    ``max_shard_bytes`` (a single larger sample still gets a shard of its own). ``verify``: decode
    each image once (cheap JPEG draft) and skip what does not decode.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    max_bytes = parse_size(max_shard_bytes)
    src = open_source(source, decode=False)
    was_decoding, src.decode = src.decode, False  # a source object passed in: restored below
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob(f"{prefix}-*.tar")]
    if stale:
        raise FileExistsError(
            f"{out} already holds {len(stale)} '{prefix}-*.tar' shards "
            f"(e.g. {stale[0]}): pick an empty folder or another --prefix"
        )
    t0 = time.perf_counter()
    stats = PackStats()
    writer = _ShardWriter(out, prefix, samples_per_shard, max_bytes)
    seen: set[str] = set()
    it = iter(src)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(src) if isinstance(src, FileSource) else None, unit="img")
    try:
        for s in it:
            key = _safe_key(s.key)
            if key is None or key in seen:
                stats.skipped.append((s.key, "unusable or duplicate key"))
                continue
            data = s.image
            ext = image_ext(data)
            if ext is None:
                stats.skipped.append((s.key, f"not an image (cannot identify) ({s.source})"))
                continue
            if verify:
                try:
                    open_image(data, draft_size=(1, 1), max_pixels=max_pixels)
                except ImageDecodeError as exc:
                    stats.skipped.append((s.key, f"{exc.reason} ({s.source})"))
                    continue
            members = {ext: data}
            if s.label is not None:
                members["cls"] = str(int(s.label)).encode()
            if s.caption is not None:
                members["txt"] = s.caption.encode("utf-8")
            if s.metadata:
                members["json"] = json.dumps(s.metadata, ensure_ascii=False, sort_keys=True).encode(
                    "utf-8"
                )
            writer.write(key, members)
            seen.add(key)
            stats.samples += 1
            stats.bytes += len(data)
            stats.formats[ext] += 1
        writer.close()
    finally:
        src.decode = was_decoding
        if writer.tar is not None:  # an exception mid-shard: leave no half-written tar behind
            writer.tar.close()
            writer.tmp.unlink(missing_ok=True)
    stats.skipped = list(src.skipped) + stats.skipped
    stats.shards = writer.done
    _write_json(out / SIZES_FILE, stats.shards)
    classes = getattr(src, "classes", None)
    if classes:
        _write_json(out / "classes.json", list(classes))
    stats.seconds = time.perf_counter() - t0
    return stats


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=isinstance(obj, dict)) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------- inspect
def inspect_shards(
    shards, decode: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> dict:
    """Report on shards: per shard ``samples`` (readable), ``members``, ``bytes``, ``formats``,
    ``labels`` (samples with a .cls), ``captions``, ``unreadable`` [(key, reason)] (bad images,
    refused member names, a cut-off shard); and ``totals``. ``decode``: fully decode each image
    (at the cheapest JPEG draft scale) rather than only identify its format."""
    names = expand_shards(shards)
    missing = [n for n in names if not URL_SCHEME.match(n) and not os.path.exists(n)]
    if missing:
        more = (
            f" (and {len(missing) - 1} more of the {len(names)} shards)" if len(missing) > 1 else ""
        )
        raise ValueError(f"{missing[0]} does not exist{more}")
    if not names:
        raise ValueError(f"no shards (.tar) found in {shards}")
    report: dict = {"shards": [], "totals": {}}
    tot = Counter()
    fmts: Counter = Counter()
    for shard in names:
        skipped = SkipLog()
        row = {
            "shard": shard,
            "samples": 0,
            "members": 0,
            "bytes": 0,
            "formats": Counter(),
            "labels": 0,
            "captions": 0,
            "unreadable": [],
        }
        try:
            row["bytes"] = os.path.getsize(shard)
        except OSError:
            pass
        for rec in iter_tar_records(shard, skipped):
            row["members"] += len(rec.files)
            try:
                s = record_to_sample(rec, decode=False)
                ext = next(e for e in IMAGE_EXTS if e in rec.files)
                real = image_ext(s.image)
                if real is None:
                    raise ImageDecodeError(
                        f"{os.path.basename(shard)}:{rec.key}", "not an image (cannot identify)"
                    )
                if decode:
                    try:
                        open_image(s.image, draft_size=(1, 1), max_pixels=max_pixels)
                    except ImageDecodeError as exc:
                        raise ImageDecodeError(
                            f"{os.path.basename(shard)}:{rec.key}", exc.reason
                        ) from None
            except ImageDecodeError as exc:
                row["unreadable"].append((exc.path, exc.reason))
                continue
            row["samples"] += 1
            row["formats"][
                real if real == ext or (real, ext) == ("jpg", "jpeg") else f"{real} (as .{ext})"
            ] += 1
            row["labels"] += s.label is not None
            row["captions"] += s.caption is not None
        row["unreadable"] = list(skipped) + row["unreadable"]
        row["formats"] = dict(row["formats"])
        fmts.update(row["formats"])
        for k in ("samples", "members", "bytes", "labels", "captions"):
            tot[k] += row[k]
        tot["unreadable"] += len(row["unreadable"])
        report["shards"].append(row)
    report["totals"] = {"shards": len(names), **dict(tot), "formats": dict(fmts)}
    for k in ("samples", "members", "bytes", "labels", "captions", "unreadable"):
        report["totals"].setdefault(k, 0)
    return report


inspect = inspect_shards


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_report(report: dict, max_errors: int = 20) -> str:
    rows = [("shard", "samples", "size", "formats", "labels", "captions", "unreadable")]
    for r in report["shards"]:
        rows.append(
            (
                os.path.basename(r["shard"]),
                str(r["samples"]),
                _human(r["bytes"]),
                ",".join(f"{k}:{v}" for k, v in sorted(r["formats"].items())) or "-",
                str(r["labels"]),
                str(r["captions"]),
                str(len(r["unreadable"])),
            )
        )
    t = report["totals"]
    rows.append(
        (
            f"TOTAL ({t['shards']} shards)",
            str(t["samples"]),
            _human(t["bytes"]),
            ",".join(f"{k}:{v}" for k, v in sorted(t["formats"].items())) or "-",
            str(t["labels"]),
            str(t["captions"]),
            str(t["unreadable"]),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    errors = [e for r in report["shards"] for e in r["unreadable"]]
    if errors:
        lines.append(f"\nunreadable ({len(errors)}):")
        lines += [f"  {k}: {why}" for k, why in errors[:max_errors]]
        if len(errors) > max_errors:
            lines.append(f"  ... and {len(errors) - max_errors} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
PACK_EXAMPLES = """\
examples:
  vssl data pack ./imagenet/train ./shards/train --samples-per-shard 1000 --max-shard-size 1GB
  vssl data pack manifest.parquet ./shards/coyo --prefix coyo      # path/url + text columns
  vssl data pack files.txt ./shards/mine                           # one path per line [TAB label]

Writes PREFIX-000000.tar ... (original bytes, key.jpg/png/webp + .cls/.txt/.json), sizes.json and
classes.json (folder class names, label i = classes[i]). Unreadable images are skipped and listed.
"""

INSPECT_EXAMPLES = """\
examples:
  vssl data inspect ./shards/train
  vssl data inspect 'shards/train-{000000..000099}.tar' --no-decode
  vssl data inspect shards/*.tar --json report.json

Exit code 1 when no readable sample is found.
"""


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` (with ``pack`` and ``inspect``) on an argparse subparsers object."""
    p = subparsers.add_parser(
        "data",
        help="download URL manifests, pack images into WebDataset shards; inspect shards",
        description="Data tools: download the images of URL manifests (COYO / LAION parquet), "
        "pack folders / lists / parquet manifests into WebDataset tar shards, and inspect shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="data_command", metavar="{download,pack,inspect}")
    sub.required = True

    from .download import add_download_parser

    add_download_parser(sub)

    pk = sub.add_parser(
        "pack",
        help="write WebDataset tar shards from a folder, list or parquet manifest",
        description="Pack images into WebDataset tar shards, keeping the original encoded bytes.",
        epilog=PACK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pk.add_argument(
        "src",
        metavar="SRC",
        help="image folder (class subfolders = labels), .txt/.lst list, .parquet "
        "manifest (path|url, text columns), or existing shards",
    )
    pk.add_argument("out", metavar="OUT", help="output folder (created; must hold no PREFIX-*.tar)")
    pk.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        metavar="N",
        help="samples per shard (default: %(default)s)",
    )
    pk.add_argument(
        "--max-shard-size",
        default="1GB",
        metavar="SIZE",
        help="start a new shard before this size, e.g. 500MB, 1GB, 2GiB; 0 = no limit "
        "(default: %(default)s)",
    )
    pk.add_argument("--prefix", default="shard", help="shard name prefix (default: %(default)s)")
    pk.add_argument(
        "--no-verify",
        action="store_true",
        help="do not decode images before packing (faster; bad files get packed)",
    )
    pk.add_argument("--quiet", action="store_true", help="no progress bar")
    pk.set_defaults(func=_cmd_pack)

    ins = sub.add_parser(
        "inspect",
        help="count samples, formats, sizes and unreadable members of shards",
        description="Report per-shard sample counts, formats, sizes and unreadable members.",
        epilog=INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument(
        "shards",
        metavar="SHARDS",
        nargs="+",
        help="tar files, brace patterns ('a-{000..009}.tar') or folders of tars; a folder "
        "written by `vssl data download` also gets its success rate and failure reasons",
    )
    ins.add_argument(
        "--no-decode",
        action="store_true",
        help="only identify image formats, do not decode (faster)",
    )
    ins.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    ins.set_defaults(func=_cmd_inspect)
    return p


def _cmd_pack(args: argparse.Namespace) -> int:
    try:
        max_bytes = parse_size(args.max_shard_size)
        stats = pack(
            args.src,
            args.out,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=max_bytes,
            prefix=args.prefix,
            verify=not args.no_verify,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fm = ", ".join(f"{k}:{v}" for k, v in sorted(stats.formats.items())) or "-"
    print(
        f"packed {stats.samples} samples into {len(stats.shards)} shards in {args.out} "
        f"({_human(stats.bytes)} of images; {fm}) in {stats.seconds:.1f}s"
    )
    if stats.skipped:
        print(f"skipped {len(stats.skipped)}:", file=sys.stderr)
        for k, why in stats.skipped[:20]:
            print(f"  {k}: {why}", file=sys.stderr)
        if len(stats.skipped) > 20:
            print(f"  ... and {len(stats.skipped) - 20} more", file=sys.stderr)
    if not stats.samples:
        if stats.skipped:
            why = f"all {len(stats.skipped)} inputs were skipped (reasons above)"
        else:
            where = f"in {args.src}" if os.path.isdir(args.src) else f"from {args.src}"
            why = f"no images found {where}"
        print(f"error: nothing packed: {why}", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .download import download_report, format_download_report, is_download_folder

    downloads = [download_report(s) for s in args.shards if is_download_folder(s)]
    try:
        report = inspect_shards(args.shards, decode=not args.no_decode)
    except ValueError as exc:
        if not downloads:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report = {"shards": [], "totals": {"samples": 0}}  # a download with no shard yet
    else:
        print(format_report(report))
    for rep in downloads:
        print(format_download_report(rep))
    if downloads:
        report["downloads"] = downloads
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["totals"]["samples"] else 1


def _main(argv: Sequence[str] | None = None) -> int:  # python -m vssl.data.pack data inspect ...
    parser = argparse.ArgumentParser(prog="vssl")
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(_main())
