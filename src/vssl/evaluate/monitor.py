"""kNN accuracy during pretraining: the online monitor a trainer calls every N steps.

Images are decoded, resized and center-cropped ONCE (DINOv2's eval transform) and kept in memory
as uint8 (a quarter of float32's size: 150 KB per image at 224 px), so each evaluation costs only
the forward passes and the kNN vote. Normalization runs per batch on the model's device with the
same float32 operations as ``EvalTransform``, so the features equal those of ``vssl embed``.
In a distributed run, call it on one rank (it evaluates every image itself).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from ..extract import ImageDataset, autocast_context, make_loader

__all__ = ["KNNMonitor"]


class _CropUint8:
    """EvalTransform's resize + center crop, returned as a uint8 (3, H, W) tensor (no normalize)."""

    def __init__(self, resolution: int | tuple[int, int]):
        self.transform = EvalTransform(resolution)
        self.draft_size = self.transform.draft_size

    def __call__(self, img) -> torch.Tensor:
        img = self.transform.crop(self.transform.resize(img))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def _inputs(source, split: str) -> list[tuple[Path, str]]:
    from ..data.listing import list_inputs

    if isinstance(source, (str, os.PathLike)):
        try:
            items = list_inputs(source)
        except FileNotFoundError:
            raise ValueError(f"kNN monitor {split} source not found: {source}") from None
    else:
        items = [(Path(p), lab) for p, lab in source]
    if not items:
        raise ValueError(f"kNN monitor {split} source {source!r} has no images")
    unlabeled = [p for p, lab in items if lab is None]
    if unlabeled:
        raise ValueError(
            f"kNN monitor needs labeled {split} images (class subfolders or "
            f"'path<TAB>label' lists); {len(unlabeled)} have none, e.g. "
            f"{unlabeled[0]}"
        )
    return items


def _balanced_subset(items: list[tuple[Path, str]], n: int, seed: int) -> list[tuple[Path, str]]:
    """``n`` items taken round-robin over the classes from a seeded shuffle of each class, so every
    class stays represented (a plain random subset can drop a class of the test split)."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(items):
        by_class.setdefault(label, []).append(i)
    queues = [rng.sample(idx, len(idx)) for _, idx in sorted(by_class.items())]
    keep: list[int] = []
    for rank in range(max(len(q) for q in queues)):
        keep += [q[rank] for q in queues if rank < len(q)]
    return [items[i] for i in sorted(keep[:n])]


class KNNMonitor:
    """Weighted-kNN top-1/top-5 of a model's CLS features on fixed train/test images.

    ``train_source``/``test_source``: an image folder (class subfolders = labels), a list file, or
    ``list_inputs``-style ``[(path, label)]``. ``max_per_split`` keeps a seeded, class-balanced
    subset of each split (memory and time). ``resolution``: the crop; None uses the model's
    ``img_size`` at the first run (decoding then happens on that run instead of here).
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast. Works with any
    module whose ``forward_features`` returns ``x_norm_clstoken`` (a DDP wrapper is unwrapped via
    ``.module``). The model is evaluated in eval mode under ``torch.inference_mode``; every
    submodule's own training flag is restored afterwards.
    """

    def __init__(
        self,
        train_source: str | os.PathLike | Sequence[tuple[str | os.PathLike, str]],
        test_source: str | os.PathLike | Sequence[tuple[str | os.PathLike, str]],
        every_n_steps: int,
        *,
        k: int = 20,
        temperature: float = 0.07,
        resolution: int | None = None,
        max_per_split: int | None = None,
        batch_size: int = 256,
        num_workers: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if k < 1 or not temperature > 0 or batch_size < 1:
            raise ValueError(
                f"need k >= 1, temperature > 0, batch_size >= 1; got k={k}, "
                f"temperature={temperature}, batch_size={batch_size}"
            )
        if max_per_split is not None and max_per_split < 1:
            raise ValueError(f"max_per_split must be >= 1 or None, got {max_per_split}")
        self.every_n_steps = every_n_steps
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers
        self.autocast_dtype = autocast_dtype
        self.resolution = resolution
        self._items = {}
        for split, source in (("train", train_source), ("test", test_source)):
            items = _inputs(source, split)
            if max_per_split is not None and len(items) > max_per_split:
                items = _balanced_subset(items, max_per_split, seed)
            self._items[split] = items
        self.classes = sorted({lab for _, lab in self._items["train"]})
        unknown = sorted({lab for _, lab in self._items["test"]} - set(self.classes))
        if unknown:
            raise ValueError(f"kNN monitor test labels {unknown[:5]} are not training classes")
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        if resolution is not None:
            self.prepare(resolution)

    def prepare(self, resolution: int) -> None:
        """Decode and crop every image once into uint8 tensors; unreadable files are skipped."""
        crop = _CropUint8(resolution)
        index = {c: i for i, c in enumerate(self.classes)}
        for split, items in self._items.items():
            # a bad file comes back as (index, reason), never an exception
            dataset = ImageDataset([p for p, _ in items], crop)
            loader = make_loader(dataset, batch_size=64, num_workers=self.num_workers)
            rows, kept, errors = [], [], []
            for indices, images, batch_errors in loader:
                errors += batch_errors
                if images is not None:
                    rows.append(images)
                    kept += indices
            if not kept:
                raise ValueError(f"kNN monitor: no {split} image could be decoded")
            if errors:
                i, reason = errors[0]
                print(
                    f"kNN monitor: skipped {len(errors)} unreadable {split} images (e.g. "
                    f"{items[i][0]}: {reason})",
                    file=sys.stderr,
                    flush=True,
                )
            self.images[split] = torch.cat(rows)
            self.labels[split] = torch.tensor([index[items[i][1]] for i in kept], dtype=torch.int64)
        self.resolution = resolution

    def features(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``{"train": (N, D), "test": (M, D)}`` float32 CLS features on the model's device."""
        module = model if hasattr(model, "forward_features") else getattr(model, "module", model)
        if not hasattr(module, "forward_features"):
            raise TypeError(
                f"{type(model).__name__} has no forward_features returning x_norm_clstoken"
            )
        if not self.images:
            size = getattr(getattr(module, "config", None), "img_size", None)
            if size is None:
                raise ValueError("the model has no config.img_size: pass resolution= to KNNMonitor")
            self.prepare(size)
        param = next(module.parameters())
        device, dtype = param.device, param.dtype
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        # isolate: the trainer's own autocast region must not change what the monitor measures
        autocast = autocast_context(device.type, self.autocast_dtype, isolate=True)
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        out = {}
        try:
            with torch.inference_mode(), autocast:
                for split, images in self.images.items():
                    chunks = []
                    for start in range(0, len(images), self.batch_size):
                        # EvalTransform's float32 ops in its order: /255, -mean, /std
                        x = images[start : start + self.batch_size].to(device).float()
                        x = ((x / 255.0 - mean) / std).to(dtype)
                        chunks.append(module.forward_features(x)["x_norm_clstoken"].float())
                    out[split] = torch.cat(chunks)
        finally:
            for m, training in modes:  # restore each module's own mode, not one global flag
                m.training = training
        return out

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """``{"knn_top1", "knn_top5" (with >= 5 classes), "seconds"}`` for ``model`` now."""
        from .knn import knn_classify

        start = time.perf_counter()
        feats = self.features(model)
        device = feats["train"].device
        result = knn_classify(
            feats["train"],
            self.labels["train"].to(device),
            feats["test"],
            self.labels["test"].to(device),
            ks=(self.k,),
            temperature=self.temperature,
            num_classes=len(self.classes),
            device=device,
        )
        k = result.ks[0]
        metrics = {"knn_top1": result.top1[k]}
        if result.top5 is not None:
            metrics["knn_top5"] = result.top5[k]
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    def maybe_run(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        """``run(model)`` when ``step`` is a multiple of ``every_n_steps`` (step 0 included),
        else None."""
        return self.run(model) if step % self.every_n_steps == 0 else None
