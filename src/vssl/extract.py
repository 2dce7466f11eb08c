"""Frozen-feature extraction plumbing shared by `vssl embed`, the kNN monitor and `vssl eval seg`.

Each of them decodes images in DataLoader workers, runs a frozen model in eval mode and must never
crash on one bad file. What they share lives here, once:

- ``ImageDataset``: path ``i`` -> ``(i, transform(image), None)`` or ``(i, None, reason)``;
- ``collate_skipping_errors``: the collate for any dataset with that item protocol: stacks the
  good samples and hands the bad ones on as ``[(index, reason)]``;
- ``make_loader`` (with ``default_num_workers``, ``cpu_count``, ``init_decode_worker``): the
  in-order DataLoader, never more workers than batches, one torch thread per worker;
- ``autocast_context``: ``torch.autocast`` for a requested bf16/fp16 over fp32 weights;
- ``model_resolution`` and ``check_resolution``: the default input size, and the refusal of a
  size off the patch grid; ``eval_resolution``: the size a model's family is evaluated at.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch

from .data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image

__all__ = [
    "ImageDataset",
    "autocast_context",
    "check_resolution",
    "collate_skipping_errors",
    "cpu_count",
    "default_num_workers",
    "init_decode_worker",
    "eval_resolution",
    "make_loader",
    "model_resolution",
]


# ------------------------------------------------------------------------------------ data
class ImageDataset(torch.utils.data.Dataset):
    """Item ``i`` -> ``(i, transform(image), None)`` or ``(i, None, reason)``; never raises for a
    bad file.

    ``transform``: an ``EvalTransform`` or anything callable on a PIL image; with ``draft`` its
    ``draft_size`` (the resize target) lets large JPEGs decode at 1/2..1/8 scale. ``max_pixels``:
    larger images are refused as decompression bombs.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        transform: Callable,
        *,
        draft: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.draft_size = getattr(transform, "draft_size", None) if draft else None
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = open_image(self.paths[i], draft_size=self.draft_size, max_pixels=self.max_pixels)
            return i, self.transform(img), None
        except ImageDecodeError as exc:
            return i, None, exc.reason
        except Exception as exc:  # noqa: BLE001 - a transform failure is still one bad input
            return i, None, f"transform failed: {type(exc).__name__}: {exc}"


def collate_skipping_errors(batch):
    """``[(index, sample, None) or (index, None, reason)]`` -> ``(indices, samples, errors)``.

    ``indices``: the good items, in batch order; ``errors``: ``[(index, reason)]`` of the bad ones.
    ``samples``: the good samples stacked into one tensor, or, when a sample is a tuple of fields,
    a tuple with each field stacked (tensors) or listed (anything else); None when no item is good.
    """
    good = [(i, x) for i, x, err in batch if err is None]
    errors = [(i, err) for i, _, err in batch if err is not None]
    indices = [i for i, _ in good]
    if not good:
        return indices, None, errors
    samples = [x for _, x in good]
    if isinstance(samples[0], tuple):
        fields = list(zip(*samples))
        return (
            indices,
            tuple(torch.stack(f) if isinstance(f[0], torch.Tensor) else list(f) for f in fields),
            errors,
        )
    return indices, torch.stack(samples), errors


def cpu_count() -> int:
    """CPUs this process may use (a container's affinity mask, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Decoding processes when the user says nothing: ``min(4, cpu_count())``."""
    return min(4, cpu_count())


def init_decode_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: decoding is per-process work; do not oversubscribe cores."""
    torch.set_num_threads(1)


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """An in-order DataLoader over ``dataset`` (items as ``collate_skipping_errors`` wants them).

    ``num_workers``: None means ``default_num_workers()``; never more workers than batches (an
    idle worker only costs start-up time); 0 decodes in this process.
    """
    if num_workers is None:
        num_workers = default_num_workers()
    num_batches = -(-len(dataset) // batch_size)
    num_workers = max(0, min(num_workers, num_batches))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_errors,
        worker_init_fn=init_decode_worker if num_workers else None,
        pin_memory=pin_memory,
    )


# ------------------------------------------------------------------------------------ model
def autocast_context(
    device_type: str,
    dtype: str | torch.dtype | None,
    *,
    param_dtype: torch.dtype = torch.float32,
    isolate: bool = False,
) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)`` when ``dtype`` (``"bf16"``, ``torch.float16``, ...)
    is bf16/fp16 and the weights (``param_dtype``) are fp32; otherwise no autocast: a null context,
    or with ``isolate`` an autocast-disabled region, so that an enclosing one (the trainer's
    mixed-precision step) does not apply inside it."""
    from .models.checkpoints import parse_dtype

    want = parse_dtype(dtype)
    if want in (torch.bfloat16, torch.float16) and param_dtype == torch.float32:
        return torch.autocast(device_type=device_type, dtype=want)
    if isolate:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def model_resolution(model: torch.nn.Module) -> int | tuple[int, int]:
    """The model's own input size (``config.img_size``); ValueError when it has none."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "img_size", None)
    if size is None:
        raise ValueError("the model has no config.img_size: pass resolution=")
    return size if isinstance(size, int) else tuple(size)


def check_resolution(model: torch.nn.Module, resolution: int | tuple[int, int]) -> None:
    """ValueError when a side of ``resolution`` is not a multiple of the model's patch size.

    The patch conv silently drops a remainder; a resolution off the patch grid is a mistake. The
    message names the nearest valid sizes. Models without ``config.patch_size`` pass.
    """
    cfg = getattr(model, "config", None)
    patch = getattr(cfg, "patch_size", None)
    if not patch:
        return
    for side in (resolution,) if isinstance(resolution, int) else tuple(resolution):
        if side % patch:
            lo, hi = (side // patch) * patch, (side // patch + 1) * patch
            raise ValueError(
                f"resolution {side} is not a multiple of the patch size {patch}: use "
                f"{lo if lo else hi} or {hi}"
            )


def eval_resolution(
    model: torch.nn.Module, name: str | None = None
) -> tuple[int | tuple[int, int], str]:
    """``(resolution, why)``: the input size a model's family is evaluated at.

    DINOv2's hub models are built at 518 px (the size of their last training phase) but DINOv2
    evaluates them at 224 (kNN, linear probes): 224, 5x fewer tokens than 518. Web-SSL models are
    evaluated at their ``img_size`` (224; the 7B models at the size in their name), MAE at 224 (its
    ``img_size``). Anything else: its ``img_size``. ``name``: the zoo name the model was built
    from, if any (``dinov2-*`` is a DINOv2 hub model whatever its overrides). ``why`` is the words
    for the user.
    """
    cfg = getattr(model, "config", None)
    size = model_resolution(model)
    family = getattr(cfg, "family", None)
    patch = getattr(cfg, "patch_size", None)
    # DINOv2's released backbones: img_size 518, patch 14, LayerScale init 1.0 (Web-DINO: 1e-5)
    hub = str(name or "").startswith("dinov2-") or getattr(cfg, "layerscale", None) == 1.0
    if family == "dinov2" and size == 518 and patch == 14 and hub:
        return 224, "DINOv2's evaluation resolution"
    if family == "mae":
        return size, "MAE's evaluation resolution, the model's img_size"
    return size, "the model's img_size"
