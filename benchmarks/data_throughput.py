#!/usr/bin/env python
"""Training-data throughput of DINOv2 multi-crop (2 x 224 + 8 x 98), CPU side and batched photometry.

(a) CPU side: JPEG decode (``open_image`` with the geometry's ``draft_size``) + the 10 random
    resized crops + flips as uint8 (``MultiCropGeometry``) + ``collate_multicrop``, through a
    ``DataLoader`` with 1 and 2 worker processes, images/s. Target: >= 250 images/s on 2 cores.
    Measured through vssl's own readers, in one run: a folder (``FileDataset`` over a path list)
    and WebDataset shards (``ShardStream`` over shards ``vssl.data.pack`` writes to a temp dir),
    and once with Pillow as the JPEG decoder instead of libjpeg-turbo, for comparison.
(b) photometric side: ``MultiCropPhotometric`` (colour jitter, grayscale, blur, solarize, normalize;
    DINOv2's per-group probabilities) on a collated uint8 batch, images/s on the CPU
    (``torch.set_num_threads(--threads)``).
(c) the whole pipeline (a) + (b) against a straightforward per-image pipeline of the same views,
    both through a DataLoader with the same number of workers: per image decode at full size, per
    crop PIL crop + resize + flip, to float tensor, and kornia's ``augmentation`` modules
    (ColorJitter, RandomGrayscale, RandomGaussianBlur) + solarize + normalize on that single crop.
    Ours runs twice: photometry in the main process on each batch (what a GPU trainer does), and
    photometry inside the workers' collate (all-CPU training). Target: >= 2x the straightforward one.

Every measurement skips the first batch (worker start-up) and reports images/s over the rest. The
100 real ImageNet samples (~500x375 JPEGs) are repeated to get enough images.

Examples::

    python benchmarks/data_throughput.py                 # the real measurement (~1-2 min, 2 cores)
    python benchmarks/data_throughput.py --quick         # smoke run
    python benchmarks/data_throughput.py --images 4096 --batch-size 64 --workers 1,2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "imagenet-samples"

from vssl.data import decode as _decode  # noqa: E402
from vssl.data.augment import (  # noqa: E402
    DINO_GLOBAL1,
    DINO_GLOBAL2,
    DINO_LOCAL,
    MultiCropGeometry,
    MultiCropPhotometric,
)
from vssl.data.collate import collate_multicrop  # noqa: E402
from vssl.data.decode import open_image  # noqa: E402
from vssl.data.pack import pack  # noqa: E402
from vssl.data.stream import FileDataset, ShardStream  # noqa: E402
from vssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

# ------------------------------------------------------------------------------------- datasets


_TMP = None


def folder_dataset(files, geometry: MultiCropGeometry) -> FileDataset:
    """vssl's folder reader over ``files`` (a path list in a temp dir): decode + geometry."""
    import tempfile

    global _TMP
    if _TMP is None:
        _TMP = tempfile.TemporaryDirectory(prefix="vssl-bench-")
    listing = Path(_TMP.name) / f"images-{len(files)}.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    return FileDataset(listing, transform=geometry, output="tuple")


class PhotometricCollate:
    """collate_multicrop + MultiCropPhotometric inside the worker (all-CPU training)."""

    def __init__(self, photometric: MultiCropPhotometric):
        self.photometric = photometric

    def __call__(self, samples):
        return self.photometric(collate_multicrop(samples))


class NaiveDataset(Dataset):
    """The straightforward per-image pipeline: PIL per crop, kornia per crop on a single image."""

    def __init__(self, files, global_size=224, local_size=98, n_local=8):
        self.files = files
        self.sizes = [global_size] * 2 + [local_size] * n_local
        self.scales = [(0.32, 1.0)] * 2 + [(0.05, 0.32)] * n_local
        self.recipes = [DINO_GLOBAL1, DINO_GLOBAL2] + [DINO_LOCAL] * n_local
        self._aug = None

    def _build(self):
        import kornia.augmentation as KA

        def jitter(p):
            return KA.ColorJitter(*p.jitter, p=p.jitter_p)

        self._aug = [
            (
                jitter(p),
                KA.RandomGrayscale(p=p.grayscale_p),
                KA.RandomGaussianBlur((p.blur_kernel, p.blur_kernel), p.blur_sigma, p=p.blur_p)
                if p.blur_p > 0
                else None,
                p.solarize_p,
            )
            for p in self.recipes
        ]
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import kornia.enhance as KE
        import numpy as np
        from PIL import Image

        from vssl.data.augment import sample_resized_crop

        if self._aug is None:
            self._build()
        img = open_image(self.files[i])
        crops = []
        for size, scale, (cj, gray, blur, sol_p) in zip(self.sizes, self.scales, self._aug):
            top, left, h, w = sample_resized_crop(img.width, img.height, scale, (3 / 4, 4 / 3))
            c = img.crop((left, top, left + w, top + h)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
            if random.random() < 0.5:
                c = c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            x = (
                torch.from_numpy(np.asarray(c).copy())
                .permute(2, 0, 1)
                .float()
                .div(255)
                .unsqueeze(0)
            )
            x = gray(cj(x))
            if blur is not None:
                x = blur(x)
            if sol_p > 0 and random.random() < sol_p:
                x = KE.solarize(x, 128 / 255)
            crops.append(((x - self._mean) / self._std)[0])
        return {"global": torch.stack(crops[:2]), "local": torch.stack(crops[2:])}


# -------------------------------------------------------------------------------------- timing


def time_loader(loader, n_images: int, on_batch=None) -> float:
    """images/s over all batches but the first (worker start-up)."""
    it = iter(loader)
    first = next(it)
    if on_batch is not None:
        on_batch(first)
    done, t0 = 0, time.perf_counter()
    for batch in it:
        if on_batch is not None:
            batch = on_batch(batch)
        done += batch["global"].shape[0] // 2
    dt = time.perf_counter() - t0
    return done / dt if dt > 0 and done else float("nan")


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(ds, workers, batch_size, collate_fn=collate_multicrop):
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=True,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import kornia
    import PIL

    return {
        "cpu": cpu,
        "cores": cores,
        "torch": torch.__version__,
        "kornia": kornia.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument(
        "--images", type=int, default=2048, help="images per measurement (files repeated)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--workers", default="1,2", help="comma-separated DataLoader worker counts for (a)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for (b) (also 1 is measured); (c)'s main process gets threads - workers"
        " (default: the cores this process may use)",
    )
    ap.add_argument(
        "--interpolation", default="bicubic", help="crop interpolation (DINOv2: bicubic)"
    )
    ap.add_argument(
        "--naive-images", type=int, default=None, help="images for the slow baseline in (c)"
    )
    ap.add_argument("--parts", default="a,b,c", help="which measurements to run (a, b, c)")
    ap.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "pil"],
        help="crop/resize backend of MultiCropGeometry",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: few images, small batches")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)

    if args.quick:
        args.images, args.batch_size = 96, 16
    naive_images = args.naive_images or max(args.batch_size * 2, args.images // 4)
    info = machine_info()
    threads = args.threads or info["cores"]
    torch.set_num_threads(threads)
    files = sorted(
        p for p in args.images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    if not files:
        print(f"no images in {args.images_dir}", file=sys.stderr)
        return 2
    reps = math.ceil((args.images + args.batch_size) / len(files))
    all_files = (files * reps)[: args.images + args.batch_size]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    max_workers = max(workers)

    geo = MultiCropGeometry(interpolation=args.interpolation, backend=args.backend)
    parts = {p.strip() for p in args.parts.split(",")}
    photo = MultiCropPhotometric()
    rows = []

    # (a) CPU side, through vssl's readers: a folder (path list) and shards
    if "a" in parts:
        _part_a(args, all_files, geo, workers, rows)

    # (b) photometric, batched on CPU tensors
    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    batch = {
        "global": torch.randint(0, 256, (2 * B, 3, 224, 224), dtype=torch.uint8, generator=g),
        "local": torch.randint(0, 256, (8 * B, 3, 98, 98), dtype=torch.uint8, generator=g),
    }
    n_iter = max(2, args.images // B // 4)
    for th in sorted({1, threads}) if "b" in parts else []:
        torch.set_num_threads(th)
        photo(batch)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_iter):
            photo(batch)
        ips_b = n_iter * B / (time.perf_counter() - t0)
        rows.append(("b", f"photometric batched (B={B}), {th} torch thread(s)", ips_b, ""))
        print(f"(b) {th} threads: {ips_b:.1f} images/s", file=sys.stderr)
    # (c): the main process shares the cores with the workers
    main_threads = max(1, threads - max_workers)
    torch.set_num_threads(main_threads)

    # (c) full pipeline vs straightforward per-image
    if "c" in parts:
        _part_c(args, all_files, geo, photo, max_workers, main_threads, naive_images, rows)
    _print_table(args, info, files, naive_images, rows)
    return 0


def _part_a(args, all_files, geo, workers, rows):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vssl-bench-") as tmp:
        folder = folder_dataset(all_files, geo)
        pack(folder.source, Path(tmp) / "shards", samples_per_shard=256, verify=False)
        shards = str(Path(tmp) / "shards")
        readers = [
            ("folder", lambda w: folder),
            (
                "shards",
                lambda w: ShardStream(
                    shards,
                    transform=geo,
                    output="tuple",
                    shuffle=False,
                    batch_size=args.batch_size,
                    rank=0,
                    world_size=1,
                ),
            ),
        ]
        for name, make in readers:
            for w in workers:
                ips = time_loader(make_loader(make(w), w, args.batch_size), args.images)
                rows.append(
                    (
                        "a",
                        f"{name}: decode + 10 crops uint8 + collate, {w} worker(s)",
                        ips,
                        "target >= 250 on 2 cores" if w == 2 else "",
                    )
                )
                print(f"(a) {name}, {w} workers: {ips:.1f} images/s", file=sys.stderr)
        # the same folder run with Pillow decoding JPEGs (simplejpeg switched off in the workers)
        w = max(workers)
        saved = _decode._simplejpeg
        _decode._simplejpeg = None
        try:
            ips = time_loader(make_loader(folder, w, args.batch_size), args.images)
        finally:
            _decode._simplejpeg = saved
        rows.append(
            (
                "a",
                f"folder, Pillow JPEG decoder instead of libjpeg-turbo, {w} worker(s)",
                ips,
                "for comparison",
            )
        )
        print(f"(a) folder with Pillow decoding, {w} workers: {ips:.1f} images/s", file=sys.stderr)


def _part_c(args, all_files, geo, photo, max_workers, main_threads, naive_images, rows):
    B = args.batch_size
    ours_main = time_loader(
        make_loader(folder_dataset(all_files, geo), max_workers, B), args.images, on_batch=photo
    )
    ours_worker = time_loader(
        make_loader(
            folder_dataset(all_files, geo), max_workers, B, collate_fn=PhotometricCollate(photo)
        ),
        args.images,
    )
    naive_files = all_files[: naive_images + B]
    naive = time_loader(
        make_loader(NaiveDataset(naive_files), max_workers, B, collate_fn=collate_multicrop),
        naive_images,
    )
    best = max(ours_main, ours_worker)
    rows.append(
        (
            "c",
            f"full: {max_workers} workers geometry + photometric in main process "
            f"({main_threads} thread(s))",
            ours_main,
            f"{ours_main / naive:.2f}x naive",
        )
    )
    rows.append(
        (
            "c",
            f"full: {max_workers} workers geometry + photometric in worker collate",
            ours_worker,
            f"{ours_worker / naive:.2f}x naive",
        )
    )
    rows.append(
        ("c", f"naive per-image PIL + per-crop kornia, {max_workers} workers", naive, "1.00x")
    )
    print(
        f"(c) ours {ours_main:.1f} / {ours_worker:.1f}, naive {naive:.1f}: "
        f"{best / naive:.2f}x (target >= 2x)",
        file=sys.stderr,
    )
    return naive


def _print_table(args, info, files, naive_images, rows):

    cli = list(args.argv)
    cmd = "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + cli)
    print()
    print(f"Command: `{cmd}`  ")
    print(
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, kornia {info['kornia']}, "
        f"Pillow {info['pillow']}, Python {info['python']}  "
    )
    print(f"Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ")
    print(
        f"Data: {len(files)} JPEGs from {args.images_dir.name} repeated to {args.images} images "
        f"(baseline: {naive_images}); batch {args.batch_size}; interpolation {args.interpolation}, "
        f"backend {args.backend}" + (" (--quick: smoke numbers only)" if args.quick else "")
    )
    print()
    print("| part | what | images/s | note |")
    print("|---|---|---:|---|")
    for part, what, ips, note in rows:
        print(f"| ({part}) | {what} | {ips:.1f} | {note} |")


if __name__ == "__main__":
    sys.exit(main())
