"""Download the images of a URL manifest (COYO / LAION parquet) into WebDataset shards.

``vssl data download MANIFEST.parquet OUT/`` writes img2dataset's webdataset layout, so tools
built for it read ours: ``OUT/00000.tar`` with ``KEY.jpg`` (or the real format when the bytes are
kept), ``KEY.txt`` (caption) and ``KEY.json`` (every other column + sizes), where KEY is the
5-digit shard id followed by the row's index in the shard; beside each tar ``00000.parquet`` with
**one row per manifest row** (all input columns + ``key``, ``status``, ``error_message``, sizes,
``sha256``) and ``00000_stats.json``. ``status`` is ``success`` or the reason: ``http_404`` (any
``http_<code>``), ``timeout``, ``connection_error``, ``invalid_url``, ``missing_url``,
``duplicate_url``, ``empty``, ``not_an_image``, ``truncated``, ``decode_error``, ``too_small``,
``aspect_ratio``, ``too_large``, ``opted_out`` (X-Robots-Tag noai / noimageai, as img2dataset).

Why not img2dataset itself (the engine COYO's README runs)? It requires ``webdataset<0.3`` (vssl
reads shards with webdataset 1.x), ``opencv-python-headless<5`` (clashes with the ``opencv-python``
that rapidocr-onnxruntime brings for ``vssl curate textrich``), and wandb; its status is only
success / failed_to_download / failed_to_resize. This module is the same layout on ``requests``,
Pillow and pyarrow, which vssl already depends on, with a precise status per row.

Incremental restart: the manifest is cut into shards of ``samples_per_shard`` consecutive rows; a
shard is finished when its ``_stats.json`` exists (written last, after the tar and the parquet,
each written to a temporary name and renamed). A rerun skips finished shards and redoes the rest.
Duplicate URLs are found in the main process over the whole manifest (first occurrence wins), so
they are the same on every rerun.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import tarfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .._io import atomic_write
from .sources import SIZES_FILE, image_ext

__all__ = [
    "DownloadOptions",
    "download",
    "download_report",
    "format_download_report",
    "is_download_folder",
]

CONFIG_FILE = "download.json"
SUMMARY_FILE = "summary.json"
RESIZE_MODES = ("no", "keep_ratio", "center_crop")
OPT_OUT = ("noai", "noimageai", "noindex", "noimageindex")
# columns the downloader adds to each shard's parquet; input columns with these names are renamed
ADDED_COLUMNS = (
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)


@dataclass
class DownloadOptions:
    """Everything that decides what a shard holds (saved in ``download.json``)."""

    url_col: str = "url"
    caption_col: str | None = "text"
    samples_per_shard: int = 10000
    image_size: int = 256
    resize_mode: str = "no"
    resize_only_if_bigger: bool = False
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    max_bytes: int = 50_000_000
    encode_quality: int = 95
    timeout: float = 10.0
    retries: int = 0
    threads: int = 32
    respect_opt_out: bool = True
    user_agent: str = "vssl-download/0.1 (image dataset research; respects X-Robots-Tag noai)"


class _Failure(Exception):
    def __init__(self, status: str, message: str = ""):
        super().__init__(status, message)
        self.status, self.message = status, message


# ----------------------------------------------------------------------------------- one image
_local = threading.local()


def _session():
    import requests

    if getattr(_local, "session", None) is None:
        _local.session = requests.Session()
    return _local.session


def _fetch(url: str, opt: DownloadOptions) -> bytes:
    """GET ``url`` with a total deadline of ``opt.timeout`` seconds (a server trickling bytes
    cannot hold a thread longer), retrying timeouts, connection errors, 429 and 5xx."""
    import requests

    last: _Failure | None = None
    for attempt in range(opt.retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        t0 = time.monotonic()
        try:
            with _session().get(
                url,
                timeout=opt.timeout,
                stream=True,
                headers={"User-Agent": opt.user_agent},
            ) as r:
                if r.status_code >= 400:
                    last = _Failure(f"http_{r.status_code}", f"HTTP {r.status_code} {r.reason}")
                    if r.status_code == 429 or r.status_code >= 500:
                        continue
                    raise last
                robots = r.headers.get("X-Robots-Tag", "").lower()
                if opt.respect_opt_out and any(d in robots for d in OPT_OUT):
                    raise _Failure("opted_out", f"X-Robots-Tag: {robots}")
                buf = bytearray()
                for chunk in r.iter_content(65536):
                    buf += chunk
                    if len(buf) > opt.max_bytes:
                        raise _Failure("too_large", f"more than {opt.max_bytes} bytes")
                    if time.monotonic() - t0 > opt.timeout:
                        raise requests.Timeout(f"body not complete after {opt.timeout:g} s")
                return bytes(buf)
        except _Failure:
            raise
        except requests.Timeout as exc:
            last = _Failure("timeout", f"{type(exc).__name__}: {exc}")
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise _Failure("invalid_url", str(exc)) from None
        except requests.exceptions.InvalidSchema as exc:
            raise _Failure("invalid_url", str(exc)) from None
        except requests.RequestException as exc:
            # ChunkedEncodingError / ContentDecodingError / ConnectionError: the transfer broke
            last = _Failure("connection_error", f"{type(exc).__name__}: {exc}")
    assert last is not None
    raise last


def _decode(data: bytes):
    """Bytes -> a fully loaded PIL image, with the failure named (empty, not an image, truncated)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise _Failure("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.load()
            return img
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        what = " (HTML page)" if head.startswith((b"<!doctype html", b"<html")) else ""
        raise _Failure("not_an_image", f"cannot identify image{what}") from None
    except Image.DecompressionBombError as exc:
        raise _Failure("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        status = "truncated" if "truncat" in text.lower() or "end of file" in text else ""
        raise _Failure(status or "decode_error", f"{type(exc).__name__}: {text}") from None


def _resized_size(w: int, h: int, opt: DownloadOptions) -> tuple[int, int] | None:
    """The short side scaled to ``image_size`` (keep_ratio / center_crop), or None: keep as is."""
    if opt.resize_mode == "no":
        return None
    short = min(w, h)
    if opt.resize_only_if_bigger and short <= opt.image_size:
        return None
    s = opt.image_size / short
    return max(1, round(w * s)), max(1, round(h * s))


def _process(data: bytes, opt: DownloadOptions) -> tuple[bytes, str, dict]:
    """Check and resize one image: (bytes to store, extension, size fields)."""
    from PIL import Image, ImageOps

    img = _decode(data)
    w, h = img.size
    if min(w, h) < opt.min_image_size:
        raise _Failure(
            "too_small", f"{w}x{h}: smaller side < --min-image-size {opt.min_image_size}"
        )
    if max(w, h) / max(1, min(w, h)) > opt.max_aspect_ratio:
        raise _Failure(
            "aspect_ratio", f"{w}x{h}: aspect ratio > --max-aspect-ratio {opt.max_aspect_ratio:g}"
        )
    size = _resized_size(w, h, opt)
    crop = opt.resize_mode == "center_crop" and size is not None
    ext = image_ext(data)
    if size is None and ext is not None:  # kept: the original bytes, no re-encode
        return data, ext, {"width": w, "height": h, "original_width": w, "original_height": h}
    img = ImageOps.exif_transpose(img).convert("RGB")
    if size is not None:
        if img.size != (w, h):  # EXIF rotation swapped the sides
            size = size[::-1]
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if crop:
            s = opt.image_size
            left, top = (img.width - s) // 2, (img.height - s) // 2
            img = img.crop((left, top, left + s, top + s))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opt.encode_quality)
    sizes = {"width": img.width, "height": img.height, "original_width": w, "original_height": h}
    return buf.getvalue(), "jpg", sizes


def _one(row: dict, duplicate: bool, opt: DownloadOptions) -> dict:
    """Download + check one manifest row; never raises for a bad URL or image."""
    out = dict.fromkeys(ADDED_COLUMNS[1:])
    url = row.get(opt.url_col)
    try:
        if url is None or not str(url).strip():
            raise _Failure("missing_url", f"empty {opt.url_col!r}")
        if duplicate:
            raise _Failure("duplicate_url", "the same URL is on an earlier manifest row")
        data = _fetch(str(url).strip(), opt)
        stored, ext, sizes = _process(data, opt)
    except _Failure as f:
        out.update(status=f.status, error_message=f.message)
        return out
    except Exception as exc:  # noqa: BLE001 - one odd row must not stop a 10k-row shard
        out.update(status="decode_error", error_message=f"{type(exc).__name__}: {exc}")
        return out
    out.update(status="success", sha256=hashlib.sha256(stored).hexdigest(), **sizes)
    out["_bytes"], out["_ext"] = stored, ext
    return out


# ----------------------------------------------------------------------------------- one shard
def _shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def _key_width(samples_per_shard: int) -> int:
    return max(4, len(str(samples_per_shard - 1)))


def _download_shard(shard_id: int, table, duplicates: list[bool], out: str, opt: DownloadOptions):
    """Download one shard's rows, write its tar, parquet and stats (stats last); return stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.time()
    rows = table.to_pylist()
    name = _shard_name(shard_id)
    width = _key_width(opt.samples_per_shard)
    keys = [f"{name}{i:0{width}d}" for i in range(len(rows))]
    caption = opt.caption_col
    outdir = Path(out)
    results: list[dict] = []

    def write_tar(tmp: str) -> None:
        # images go into the tar as they arrive (in manifest order) and are dropped: a shard's
        # images are never all in memory at once
        with (
            ThreadPoolExecutor(max(1, opt.threads)) as pool,
            tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar,
        ):
            todo = pool.map(lambda a: _one(a[0], a[1], opt), zip(rows, duplicates))
            for key, row, res in zip(keys, rows, todo):
                data, ext = res.pop("_bytes", None), res.pop("_ext", None)
                results.append(res)
                if res["status"] != "success":
                    continue
                meta = {k: v for k, v in row.items() if k != caption}
                meta.update({k: res[k] for k in ADDED_COLUMNS[3:]}, key=key)
                text = "" if caption is None or row.get(caption) is None else str(row[caption])
                members = {
                    ext: data,
                    "txt": text.encode("utf-8"),
                    "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"),
                }
                for e, blob in members.items():
                    info = tarfile.TarInfo(f"{key}.{e}")
                    info.size, info.mtime, info.mode = len(blob), 0, 0o444
                    tar.addfile(info, io.BytesIO(blob))

    atomic_write(outdir / f"{name}.tar", write_tar)
    renamed = {c: f"manifest_{c}" for c in table.column_names if c in ADDED_COLUMNS}
    meta_table = table.rename_columns([renamed.get(c, c) for c in table.column_names])
    added = {
        "key": pa.array(keys, pa.string()),
        "status": pa.array([r["status"] for r in results], pa.string()),
        "error_message": pa.array([r["error_message"] for r in results], pa.string()),
    }
    for c in ("width", "height", "original_width", "original_height"):
        added[c] = pa.array([r[c] for r in results], pa.int32())
    added["sha256"] = pa.array([r["sha256"] for r in results], pa.string())
    for c, arr in added.items():
        meta_table = meta_table.append_column(c, arr)
    atomic_write(outdir / f"{name}.parquet", lambda tmp: pq.write_table(meta_table, tmp))
    status = Counter(r["status"] for r in results)
    stats = {
        "shard": f"{name}.tar",
        "count": len(rows),
        "successes": status.get("success", 0),
        "failed": len(rows) - status.get("success", 0),
        "status_dict": dict(status),
        "start_time": t0,
        "end_time": time.time(),
        "duration": round(time.time() - t0, 3),
    }
    _write_json(outdir / f"{name}_stats.json", stats)
    return stats


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _shard_job(args):  # top level: picklable for worker processes
    return _download_shard(*args)


# ----------------------------------------------------------------------------------- manifest
def manifest_files(manifest) -> list[str]:
    """A parquet file, a glob, or a folder of parquet files -> sorted file list."""
    m = os.fspath(manifest)
    if os.path.isdir(m):
        files = sorted(glob.glob(os.path.join(m, "*.parquet")))
    elif any(ch in m for ch in "*?["):
        files = sorted(glob.glob(m))
    else:
        if not os.path.exists(m):
            raise FileNotFoundError(f"manifest not found: {m}")
        files = [m]
    if not files:
        raise FileNotFoundError(f"no parquet files in {m}")
    return files


def _check_columns(files: list[str], opt: DownloadOptions, caption_given: bool) -> None:
    import pyarrow.parquet as pq

    for f in files:
        cols = pq.read_schema(f).names
        if opt.url_col not in cols:
            raise ValueError(
                f"{f}: no URL column {opt.url_col!r} (columns: {', '.join(cols)}); name the "
                "column that holds the image URLs with --url-col"
            )
        if caption_given and opt.caption_col not in cols:
            raise ValueError(
                f"{f}: no caption column {opt.caption_col!r} (columns: {', '.join(cols)}); "
                "pass --caption-col with one of them, or --caption-col '' for none"
            )


def _chunks(files: list[str], n: int) -> Iterator:
    """Consecutive pyarrow tables of exactly ``n`` rows (the last may be shorter), streamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending: list = []
    have = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=min(n, 65536)):
            pending.append(batch)
            have += batch.num_rows
            while have >= n:
                t = pa.Table.from_batches(pending)
                yield t.slice(0, n)
                rest = t.slice(n)
                pending, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(pending)


# ----------------------------------------------------------------------------------- driver
def download(
    manifest,
    out_dir,
    options: DownloadOptions | None = None,
    *,
    processes: int = 1,
    progress: bool = False,
    **kw,
) -> dict:
    """Download ``manifest`` (parquet file / glob / folder) into ``out_dir``; return the summary.

    ``options`` or keyword arguments: the fields of :class:`DownloadOptions`. Finished shards of
    an earlier run into the same folder (same options) are kept, not downloaded again.
    """
    opt = options or DownloadOptions()
    caption_given = kw.get("caption_col") not in (None, "")
    for k, v in kw.items():
        if not hasattr(opt, k):
            raise TypeError(f"unknown download option {k!r}")
        setattr(opt, k, v)
    if opt.caption_col == "":
        opt.caption_col = None
    if opt.resize_mode not in RESIZE_MODES:
        raise ValueError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}")
    if opt.samples_per_shard < 1 or opt.image_size < 1 or opt.threads < 1 or processes < 1:
        raise ValueError("--samples-per-shard, --image-size, --threads, --processes must be >= 1")
    if opt.max_aspect_ratio < 1:
        raise ValueError("--max-aspect-ratio must be >= 1 (long side / short side)")
    try:
        import requests  # noqa: F401
    except ImportError:
        raise ValueError(
            "vssl data download needs requests: pip install 'vssl[download]'"
        ) from None
    files = manifest_files(manifest)
    import pyarrow.parquet as pq

    if not caption_given and opt.caption_col is not None:
        cols = pq.read_schema(files[0]).names
        opt.caption_col = next((c for c in (opt.caption_col, "caption") if c in cols), None)
    _check_columns(files, opt, caption_given)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"manifest": [os.path.abspath(f) for f in files], **asdict(opt)}
    config["max_aspect_ratio"] = str(opt.max_aspect_ratio)  # inf is not JSON
    old = out / CONFIG_FILE
    if old.exists():
        prev = json.loads(old.read_text())
        diff = [
            k
            for k in config
            if k not in ("threads", "retries", "timeout") and prev.get(k) != config[k]
        ]
        if diff:
            raise ValueError(
                f"{out} holds a download with other settings ({', '.join(diff)} differ): use "
                "the same options to complete it, or another output folder"
            )
    _write_json(old, config)
    for tmp in out.glob(".*.tmp"):  # an interrupted write of an earlier run
        tmp.unlink()
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="download")
    seen: set[int] = set()

    def jobs():
        for shard_id, table in enumerate(_chunks(files, opt.samples_per_shard)):
            dup = []
            for u in table.column(opt.url_col).to_pylist():
                h = hash(str(u).strip()) if u is not None else None
                dup.append(h is not None and h in seen)
                if h is not None:
                    seen.add(h)
            name = _shard_name(shard_id)
            if (out / f"{name}_stats.json").exists() and (out / f"{name}.tar").exists():
                if bar is not None:
                    bar.update(table.num_rows)
                continue
            yield shard_id, table, dup, str(out), opt

    done = 0
    if processes == 1:
        for job in jobs():
            s = _shard_job(job)
            done += 1
            if bar is not None:
                bar.update(s["count"])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork where there is one: a spawned worker re-imports torch (seconds); the workers
        # start before any thread of ours, and each makes its own thread pool and HTTP sessions
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(processes, mp_context=mp.get_context(method)) as pool:
            pending = set()
            for job in jobs():  # at most 2 shards per process in flight: bounded memory
                pending.add(pool.submit(_shard_job, job))
                while len(pending) >= 2 * processes:
                    fut = next(as_completed(pending))
                    pending.remove(fut)
                    done += 1
                    if bar is not None:
                        bar.update(fut.result()["count"])
            for fut in as_completed(pending):
                done += 1
                if bar is not None:
                    bar.update(fut.result()["count"])
    if bar is not None:
        bar.close()
    summary = download_report(out)
    summary["downloaded_shards_this_run"] = done
    summary["seconds_this_run"] = round(time.time() - t0, 3)
    _write_json(out / SUMMARY_FILE, summary)
    sizes = {s["shard"]: s["successes"] for s in _read_stats(out)}
    _write_json(out / SIZES_FILE, sizes)
    return summary


# ----------------------------------------------------------------------------------- report
def is_download_folder(path) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))


def _read_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]


def download_report(out_dir) -> dict:
    """Success rate and failure reasons of a download folder, from its per-shard stats."""
    out = Path(out_dir)
    stats = _read_stats(out)
    status: Counter = Counter()
    for s in stats:
        status.update(s["status_dict"])
    count = sum(status.values())
    config = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).exists() else {}
    expected = None
    if config.get("manifest"):
        import pyarrow.parquet as pq

        try:
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in config["manifest"])
            expected = -(-rows // int(config["samples_per_shard"]))
        except OSError:
            pass
    return {
        "folder": str(out),
        "shards_finished": len(stats),
        "shards_expected": expected,
        "count": count,
        "successes": status.get("success", 0),
        "success_rate": round(status.get("success", 0) / count, 4) if count else 0.0,
        "status": dict(status.most_common()),
    }


def format_download_report(rep: dict) -> str:
    exp = rep["shards_expected"]
    lines = [
        f"download {rep['folder']}: {rep['successes']}/{rep['count']} images "
        f"({100 * rep['success_rate']:.1f}% success) in {rep['shards_finished']}"
        + (f"/{exp}" if exp is not None else "")
        + " finished shards"
    ]
    for k, v in rep["status"].items():
        if k != "success":
            lines.append(f"  {k:<18} {v:>9}  ({100 * v / max(1, rep['count']):.1f}%)")
    if exp is not None and rep["shards_finished"] < exp:
        lines.append(
            f"  {exp - rep['shards_finished']} shards not finished: rerun the same "
            "`vssl data download` to complete them"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
EXAMPLES = """\
examples:
  vssl data download coyo-part-00000.parquet ./coyo --image-size 384 --resize-mode keep_ratio \\
      --resize-only-if-bigger --min-image-size 200 --max-aspect-ratio 3 --retries 1
  vssl data download 'laion/*.parquet' ./laion --url-col URL --caption-col TEXT --processes 2
  vssl data inspect ./coyo          # success rate and failure reasons

Writes OUT/00000.tar (KEY.jpg|png|webp, KEY.txt, KEY.json), OUT/00000.parquet (one row per
manifest row: url, key, status = success or the reason, error_message), OUT/00000_stats.json,
summary.json and sizes.json. Rerun the same command to complete an interrupted download: finished
shards are skipped. Duplicate URLs (first occurrence kept) are found through a 64-bit hash per URL
held in memory (~80 bytes per unique URL).
"""


def add_download_parser(sub) -> argparse.ArgumentParser:
    d = DownloadOptions()
    p = sub.add_parser(
        "download",
        help="download the images of a URL manifest (COYO / LAION parquet) into WebDataset shards",
        description="Download a URL manifest into WebDataset shards, with a status per row.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", metavar="MANIFEST", help="parquet file, glob or folder of parquet")
    p.add_argument("out", metavar="OUT", help="output folder (a rerun into it completes it)")
    g = p.add_argument_group("columns")
    g.add_argument("--url-col", default=d.url_col, help="URL column (default: %(default)s)")
    g.add_argument(
        "--caption-col",
        default=None,
        help="caption column written as KEY.txt (default: text, else caption, else none; '' "
        "for none)",
    )
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=int, default=d.image_size, help="(default: %(default)s)")
    g.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default=d.resize_mode,
        help="no: keep the original bytes; keep_ratio: short side = --image-size; center_crop: "
        "then the centre square (default: %(default)s)",
    )
    g.add_argument(
        "--resize-only-if-bigger",
        action="store_true",
        help="leave images whose short side is <= --image-size untouched",
    )
    g.add_argument(
        "--min-image-size", type=int, default=0, help="drop images with a smaller short side"
    )
    g.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=float("inf"),
        help="drop images with long/short side above this",
    )
    g.add_argument(
        "--encode-quality",
        type=int,
        default=d.encode_quality,
        help="JPEG quality of resized images",
    )
    g = p.add_argument_group("network")
    g.add_argument("--processes", type=int, default=1, help="worker processes, one shard each")
    g.add_argument(
        "--threads", type=int, default=d.threads, help="threads per process (default: %(default)s)"
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=d.timeout,
        help="seconds per request, connecting to the last byte (default: %(default)s)",
    )
    g.add_argument(
        "--retries", type=int, default=0, help="retries after timeouts, connection errors, 429, 5xx"
    )
    g.add_argument(
        "--ignore-opt-out",
        action="store_true",
        help="also keep images served with X-Robots-Tag noai/noimageai/noindex",
    )
    p.add_argument(
        "--samples-per-shard", type=int, default=d.samples_per_shard, help="(default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_download)
    return p


def _cmd_download(args) -> int:
    import sys

    summary = download(
        args.manifest,
        args.out,
        processes=args.processes,
        progress=not args.quiet and sys.stderr.isatty(),
        url_col=args.url_col,
        caption_col=args.caption_col,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        min_image_size=args.min_image_size,
        max_aspect_ratio=args.max_aspect_ratio,
        encode_quality=args.encode_quality,
        threads=args.threads,
        timeout=args.timeout,
        retries=args.retries,
        respect_opt_out=not args.ignore_opt_out,
        samples_per_shard=args.samples_per_shard,
    )
    print(format_download_report(summary))
    return 0 if summary["successes"] else 1
