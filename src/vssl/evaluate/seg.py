"""`vssl eval seg`: DINOv2's linear segmentation probe ("lin." in the paper's ADE20K / VOC tables).

The backbone is frozen; the normed patch tokens of its last block, ``(D, h, w)`` per image, go
through a BatchNorm and a 1x1 convolution (DINOv2's ``BNHead``: a linear map per patch to class
logits), the logits are upsampled bilinearly to the mask resolution and trained with pixel-wise
cross-entropy that skips ``ignore_index`` pixels. Facts from DINOv2's ADE20K linear config
(``dinov2/eval/segmentation``): last block only, BN then linear, no dropout, AdamW lr 1e-3 weight
decay 1e-4, linear warm-up over 1500 of 40k iterations then poly (power 1) decay to 0; mIoU is
accumulated over the whole set (intersection and union per class), averaged over classes whose
union is not empty.

Because the backbone is frozen, each image's patch tokens are computed once and cached in memory
(float16), so every epoch costs only the head. This makes three differences with DINOv2's mmseg
runs, so numbers are close to but not the same as the paper's: no training augmentation (random
scale / crop / flip / photometric), one fixed view per image (``crop`` or ``resize`` below, where
DINOv2 slides 512-px windows), and IoU measured at the transformed mask resolution instead of the
original image size.

Data layout (ADE20K's): ``DIR/images/NAME.jpg`` with ``DIR/annotations/NAME.png``, or the split
folders ``DIR/images/{training,validation}`` + ``DIR/annotations/{training,validation}``
(``train``/``val`` also accepted). A mask is a single-channel PNG of class ids (8-bit, palette
indices as in VOC, or 16-bit). Class ids map to training targets as follows:

- default: id ``k`` is class ``k`` for ``0 <= k < num_classes``; ``ignore_index`` (255) is skipped.
- ``reduce_zero_label`` (ADE20K, whose 0 means "other / unlabeled" and 1..150 are the classes):
  0 and 255 are skipped, id ``k`` becomes class ``k - 1`` (mmseg's ``reduce_zero_label``).

Any other id is a configuration error (wrong ``num_classes`` or a missing ``--reduce-zero-label``)
and stops the run with a message saying so; an unreadable, colour, or wrongly sized mask, or an
image without a mask, is a bad file: skipped and listed, never a crash.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.decode import ImageDecodeError, open_image
from ..data.transforms import EvalTransform, center_crop_box, resized_size
from ..extract import autocast_context, check_resolution, default_num_workers, make_loader

__all__ = [
    "LinearSegHead",
    "SegFeatures",
    "SegResult",
    "SegTransform",
    "add_parser",
    "confusion_matrix",
    "evaluate_linear_seg",
    "extract_patch_features",
    "find_pairs",
    "fit_linear_seg",
    "iou_per_class",
    "map_class_ids",
    "miou",
    "pixel_accuracy",
    "read_mask",
    "train_linear_seg",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SPLIT_NAMES = {"training": ("training", "train"), "validation": ("validation", "val")}
# DINOv2's schedule: 1500 linear warm-up iterations out of 40000 (kept as a fraction here).
WARMUP_FRACTION = 1500 / 40000
WARMUP_RATIO = 1e-6


# ---------------------------------------------------------------------------------- metrics
def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class.

    ``pred`` and ``target`` are integer arrays or tensors of the same shape; pixels whose target
    is ``ignore_index`` are left out (whatever was predicted there). Computed with one
    ``bincount`` on the tensors' device, so a GPU evaluation never copies masks back.
    """
    p = torch.as_tensor(pred)
    t = torch.as_tensor(target).to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    p, t = p.reshape(-1).long(), t.reshape(-1).long()
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if t.numel():
        if int(t.min()) < 0 or int(t.max()) >= num_classes:
            bad = int(t.max()) if int(t.max()) >= num_classes else int(t.min())
            raise ValueError(
                f"target holds class id {bad}, outside 0..{num_classes - 1} and not "
                f"ignore_index {ignore_index}"
            )
        if int(p.min()) < 0 or int(p.max()) >= num_classes:
            raise ValueError(f"predictions outside 0..{num_classes - 1}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN where the union is empty (class absent from both
    the ground truth and the predictions), so that ``nanmean`` skips it as mmseg does."""
    conf = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def miou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes with a non-empty union (NaN when there is none)."""
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    """Correct pixels over labelled pixels (mmseg's ``aAcc``)."""
    conf = np.asarray(confusion)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


# ---------------------------------------------------------------------------------- data
def _split_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    images, annotations = root / "images", root / "annotations"
    if not images.is_dir() or not annotations.is_dir():
        raise FileNotFoundError(
            f"{root}: expected the ADE20K layout, {root}/images/ and {root}/annotations/ (masks: "
            "PNGs of class ids named like the images)"
        )
    if split is not None:
        for name in SPLIT_NAMES.get(split, (split,)):
            if (images / name).is_dir():
                if not (annotations / name).is_dir():
                    raise FileNotFoundError(f"{images / name} has no matching {annotations / name}")
                return images / name, annotations / name
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir() if p.is_file()):
        return images, annotations
    subdirs = sorted(p.name for p in images.iterdir() if p.is_dir())
    hint = f" (sub-folders: {', '.join(subdirs)})" if subdirs else ""
    want = f" and no {split!r} split folder" if split else ""
    raise FileNotFoundError(f"{images} holds no images{want}{hint}")


def find_pairs(
    root: str | os.PathLike, split: str | None = None
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """``(image, mask)`` pairs under an ADE20K-layout folder, and ``(image, reason)`` for images
    without a mask (skipped, not fatal).

    ``split`` (``"training"``/``"validation"``): use ``images/<split>`` and ``annotations/<split>``
    when they exist (``train``/``val`` are accepted too), else the flat layout.
    """
    img_dir, ann_dir = _split_dirs(Path(os.path.abspath(os.fspath(root))), split)
    pairs, skipped = [], []
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = ann_dir / (p.stem + ".png")
        if mask.is_file():
            pairs.append((p, mask))
        else:
            skipped.append((str(p), f"no annotation {mask}"))
    return pairs, skipped


class MaskError(Exception):
    """A mask file that cannot serve as class ids; ``reason`` is short and human-readable."""


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A PNG of class ids -> (H, W) int32. Accepts 8-bit greyscale, palette (the indices are the
    ids, as in VOC) and 16-bit greyscale; a colour mask is refused rather than guessed at."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as m:
                m.load()
                if m.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                    raise MaskError(
                        f"mode {m.mode}: expected a single-channel PNG of class ids "
                        "(8-bit greyscale, palette, or 16-bit)"
                    )
                return np.asarray(m).astype(np.int32)
    except MaskError:
        raise
    except FileNotFoundError:
        raise MaskError("file not found") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        raise MaskError(f"unreadable ({type(exc).__name__}: {exc})") from None


def map_class_ids(
    ids: np.ndarray, num_classes: int, *, ignore_index: int = 255, reduce_zero_label: bool = False
) -> np.ndarray:
    """File class ids -> training targets as uint8 (see the module docstring for the mapping).

    Raises ``ValueError`` naming the offending id when an id is neither a class nor ignored.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if reduce_zero_label:
        ignored = (ids == 0) | (ids == ignore_index)
        out = ids - 1
    else:
        ignored = ids == ignore_index
        out = ids.copy()
    out[ignored] = ignore_index
    bad = ~ignored & ((out < 0) | (out >= num_classes))
    if bad.any():
        raw = int(ids[bad].max())
        hint = (
            " ADE20K-style masks (0 = other, classes from 1) need --reduce-zero-label."
            if not reduce_zero_label and raw == num_classes
            else ""
        )
        raise ValueError(
            f"class id {raw} in the mask is not a class of --num-classes "
            f"{num_classes} (nor ignore index {ignore_index}).{hint}"
        )
    return out.astype(np.uint8)


class SegTransform:
    """One geometry for an image and its mask, so every pixel keeps its label.

    ``crop``: the shorter side goes to ``resolution`` and the centre ``resolution`` square is
    kept (DINOv2's eval transform with resize ratio 1; torchvision rounding). ``resize``: the
    whole image is resized to ``resolution`` x ``resolution`` (every pixel kept, aspect changed).
    Images are resampled bicubic and normalized with ImageNet statistics; masks nearest-neighbour.
    """

    def __init__(self, resolution: int, mode: str = "crop"):
        if mode not in ("crop", "resize"):
            raise ValueError(f"transform mode must be 'crop' or 'resize', got {mode!r}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.mode = mode
        self._normalize = EvalTransform(resolution, resize_ratio=1.0)

    def _geometry(self, img: Image.Image, resample) -> Image.Image:
        r = self.resolution
        if self.mode == "resize":
            return img if img.size == (r, r) else img.resize((r, r), resample=resample)
        size = resized_size(img.width, img.height, r)
        if size != img.size:
            img = img.resize(size, resample=resample)
        return img if img.size == (r, r) else img.crop(center_crop_box(img.width, img.height, r, r))

    def image(self, img: Image.Image) -> torch.Tensor:
        return self._normalize.to_tensor(self._geometry(img, Image.Resampling.BICUBIC))

    def mask(self, ids: np.ndarray) -> np.ndarray:
        # mode "I" (int32) so 16-bit ids survive; NEAREST never invents an id between two regions
        m = self._geometry(
            Image.fromarray(np.ascontiguousarray(ids, dtype=np.int32)), Image.Resampling.NEAREST
        )
        return np.asarray(m, dtype=np.int32)

    def __repr__(self) -> str:
        return f"SegTransform({self.resolution}, mode={self.mode!r})"


class _PairDataset(torch.utils.data.Dataset):
    """Item ``i`` -> ``(i, (image tensor, mask ids), None)`` or ``(i, None, reason)``: the item
    protocol of ``collate_skipping_errors``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], transform: SegTransform):
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image_path, mask_path = self.pairs[i]
        try:
            img = open_image(image_path)
        except ImageDecodeError as exc:
            return i, None, f"image: {exc.reason}"
        try:
            ids = read_mask(mask_path)
        except MaskError as exc:
            return i, None, f"mask {mask_path}: {exc}"
        if ids.shape != (img.height, img.width):
            return (
                i,
                None,
                (
                    f"mask {mask_path} is {ids.shape[1]}x{ids.shape[0]}, the image "
                    f"{img.width}x{img.height}"
                ),
            )
        try:
            return i, (self.transform.image(img), self.transform.mask(ids)), None
        except Exception as exc:  # noqa: BLE001 - a transform failure is still one bad sample
            return i, None, f"transform failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------- features
@dataclass
class SegFeatures:
    """Cached frozen features of one split: what every epoch of the probe reads."""

    feats: torch.Tensor  # (N, D, h, w) float16: last block's normed patch tokens
    masks: torch.Tensor  # (N, H, W) uint8 training targets (ignore_index = skipped)
    paths: list[str]  # image paths, row order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def extract_patch_features(
    model: torch.nn.Module,
    pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    *,
    num_classes: int,
    resolution: int,
    transform: str = "crop",
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> SegFeatures:
    """Run the frozen ``model`` once over ``pairs`` and keep (patch tokens, targets) in memory.

    Patch tokens are ``model.get_intermediate_layers(x, n=1, reshape=True, norm=True)``, stored
    as float16 (half the memory; normed tokens are O(1), well inside its range). Bad images and
    masks are skipped and listed in ``skipped``; a mask id outside the classes raises.
    """
    check_resolution(model, resolution)
    seg_transform = SegTransform(resolution, transform)
    device = torch.device(device)
    params = list(model.parameters())
    param_dtype = params[0].dtype if params else torch.float32
    autocast = autocast_context(device.type, dtype, param_dtype=param_dtype)
    if params and params[0].device != device:
        model.to(device)
    was_training = model.training
    model.eval()

    dataset = _PairDataset(pairs, seg_transform)
    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    from tqdm import tqdm

    feats, masks, paths, skipped = [], [], [], []
    bar = tqdm(
        total=len(dataset),
        unit="img",
        desc=desc,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        with torch.inference_mode(), autocast:
            for indices, samples, errors in loader:
                skipped += [(dataset.pairs[i][0], reason) for i, reason in errors]
                if samples is not None:
                    images, ids = samples
                    for i, m in zip(indices, ids):
                        try:
                            masks.append(
                                torch.from_numpy(
                                    map_class_ids(
                                        m,
                                        num_classes,
                                        ignore_index=ignore_index,
                                        reduce_zero_label=reduce_zero_label,
                                    )
                                )
                            )
                        except ValueError as exc:
                            raise ValueError(f"{dataset.pairs[i][1]}: {exc}") from None
                    x = images.to(device, dtype=param_dtype, non_blocking=True)
                    out = model.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
                    feats.append(out.to(torch.float16).cpu())
                    paths += [dataset.pairs[i][0] for i in indices]
                bar.update(len(indices) + len(errors))
    finally:
        bar.close()
        if was_training:
            model.train()
    if not feats:
        return SegFeatures(
            torch.empty(0, 0, 0, 0, dtype=torch.float16),
            torch.empty(0, resolution, resolution, dtype=torch.uint8),
            [],
            skipped,
        )
    return SegFeatures(torch.cat(feats), torch.stack(masks), paths, skipped)


# ---------------------------------------------------------------------------------- the probe
class LinearSegHead(torch.nn.Module):
    """DINOv2's ``BNHead``: BatchNorm over the channels, then a 1x1 conv (a linear map per patch)."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(dim) if batchnorm else torch.nn.Identity()
        self.conv = torch.nn.Conv2d(dim, num_classes, kernel_size=1)
        # mmseg's cls_seg init: normal(0, 0.01) weights, zero bias
        torch.nn.init.normal_(self.conv.weight, std=0.01)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, D, h, w) -> logits (B, C, h, w), or bilinearly upsampled to ``size`` (H, W)."""
        logits = self.conv(self.bn(feats))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """mmcv's poly (power 1, min 0) with linear warm-up from ``WARMUP_RATIO``."""
    factor = 1.0 - step / total
    if step < warmup:
        factor *= 1.0 - (1.0 - WARMUP_RATIO) * (1.0 - step / warmup)
    return factor


def fit_linear_seg(
    feats: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    *,
    num_classes: int,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    ignore_index: int = 255,
    batchnorm: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[LinearSegHead, list[float]]:
    """Train a ``LinearSegHead`` on cached ``feats`` (N, D, h, w) against ``masks`` (N, H, W).

    AdamW with DINOv2's warm-up + poly schedule. The loss is the mean cross-entropy over labelled
    pixels of a batch (torch's ``ignore_index`` mean; mmseg 0.x divided by all pixels, a constant
    factor AdamW does not care about). Returns the head in eval mode and the mean loss per epoch.
    """
    feats, masks = torch.as_tensor(feats), torch.as_tensor(masks)
    if feats.ndim != 4 or masks.ndim != 3 or len(feats) != len(masks):
        raise ValueError(
            f"need feats (N, D, h, w) and masks (N, H, W) with the same N, got "
            f"{tuple(feats.shape)} and {tuple(masks.shape)}"
        )
    if len(feats) == 0:
        raise ValueError("no training samples")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})"
        )
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearSegHead(feats.shape[1], num_classes, batchnorm).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(feats) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, round(total * WARMUP_FRACTION))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))
    size = tuple(masks.shape[-2:])
    from tqdm import tqdm

    history = []
    head.train()
    for _ in tqdm(
        range(epochs),
        desc="probe",
        unit="epoch",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ):
        order = torch.randperm(len(feats), generator=gen)
        loss_sum, pixels = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = feats[idx].to(device, torch.float32, non_blocking=True)
            y = masks[idx].to(device, non_blocking=True).long()
            n_valid = int((y != ignore_index).sum())
            # all pixels ignored, or BatchNorm given a single value per channel: skip the step
            if n_valid == 0 or (batchnorm and x.shape[0] * x.shape[2] * x.shape[3] == 1):
                sched.step()
                continue
            loss = F.cross_entropy(head(x, size), y, ignore_index=ignore_index, reduction="sum")
            opt.zero_grad(set_to_none=True)
            (loss / n_valid).backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            pixels += n_valid
        history.append(loss_sum / pixels if pixels else float("nan"))
    head.eval()
    return head, history


@torch.no_grad()
def evaluate_linear_seg(
    head: LinearSegHead,
    feats: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    *,
    num_classes: int,
    ignore_index: int = 255,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The (C, C) confusion matrix of ``head``'s argmax predictions at the masks' resolution."""
    feats, masks = torch.as_tensor(feats), torch.as_tensor(masks)
    device = torch.device(device)
    head = head.to(device).eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    size = tuple(masks.shape[-2:])
    for start in range(0, len(feats), batch_size):
        x = feats[start : start + batch_size].to(device, torch.float32)
        y = masks[start : start + batch_size].to(device)
        conf += confusion_matrix(head(x, size).argmax(1), y, num_classes, ignore_index)
    return conf


@dataclass
class SegResult:
    miou: float
    per_class_iou: np.ndarray  # (C,) NaN for classes absent from ground truth and predictions
    pixel_acc: float
    confusion: np.ndarray  # (C, C) rows = true class, columns = predicted
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]]  # (image path, reason), train and val
    losses: list[float]  # mean training loss per epoch
    seconds: float

    def summary(self) -> str:
        return (
            f"mIoU {self.miou:.4f}  pixel acc {self.pixel_acc:.4f}  ({self.num_train} train, "
            f"{self.num_val} val images, {len(self.skipped)} skipped, {self.seconds:.1f} s)"
        )


def train_linear_seg(
    model: torch.nn.Module,
    train_dir: str | os.PathLike,
    val_dir: str | os.PathLike,
    *,
    num_classes: int,
    resolution: int | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
    transform: str = "crop",
    weight_decay: float = 1e-4,
    batchnorm: bool = True,
    dtype: str | torch.dtype | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> SegResult:
    """Linear segmentation probe of a frozen ``model``: features of ``train_dir`` and ``val_dir``
    (ADE20K layout, see the module docstring) computed once, head trained, val mIoU measured.

    ``resolution``: the square input side in pixels, a multiple of the patch size (default: the
    model's ``img_size``). ``batch_size`` is used for both the backbone and the probe.
    """
    if not 1 <= num_classes <= 255:
        raise ValueError(
            f"num_classes must be in 1..255 (masks are stored as uint8), got {num_classes}"
        )
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be in 0..255, got {ignore_index}")
    if resolution is None:
        resolution = int(getattr(getattr(model, "config", None), "img_size", 0) or 0)
        if not resolution:
            raise ValueError("the model has no config.img_size: pass resolution=")
    start = time.perf_counter()
    splits = {}
    for name, root, split in (("train", train_dir, "training"), ("val", val_dir, "validation")):
        pairs, missing = find_pairs(root, split)
        if not pairs:
            raise FileNotFoundError(f"{name}: no image with a mask under {root}")
        data = extract_patch_features(
            model,
            pairs,
            num_classes=num_classes,
            resolution=resolution,
            transform=transform,
            ignore_index=ignore_index,
            reduce_zero_label=reduce_zero_label,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            num_workers=num_workers,
            progress=progress,
            desc=name,
        )
        data.skipped = missing + data.skipped
        if not data.paths:
            raise ValueError(
                f"{name}: every sample under {root} was skipped; first reason: "
                f"{data.skipped[0][0]}: {data.skipped[0][1]}"
            )
        splits[name] = data
    train, val = splits["train"], splits["val"]
    head, losses = fit_linear_seg(
        train.feats,
        train.masks,
        num_classes=num_classes,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        device=device,
        ignore_index=ignore_index,
        batchnorm=batchnorm,
        seed=seed,
        progress=progress,
    )
    conf = evaluate_linear_seg(
        head,
        val.feats,
        val.masks,
        num_classes=num_classes,
        ignore_index=ignore_index,
        batch_size=batch_size,
        device=device,
    )
    if conf.sum() == 0:
        raise ValueError("the validation masks hold no labelled pixel (all ignore_index)")
    return SegResult(
        miou=miou(conf),
        per_class_iou=iou_per_class(conf),
        pixel_acc=pixel_accuracy(conf),
        confusion=conf,
        num_train=len(train.paths),
        num_val=len(val.paths),
        skipped=train.skipped + val.skipped,
        losses=losses,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------- CLI
_EPILOG = """\
examples:
  vssl eval seg --model dinov2-vits14 --weights dinov2_vits14_pretrain.pth \\
      --train ADEChallengeData2016 --num-classes 150 --reduce-zero-label --resolution 518
  vssl eval seg --model vit-test-p14 --train seg/train --val seg/val --num-classes 4 \\
      --resolution 112 --epochs 20     # smoke test (random weights)

DIR holds images/NAME.jpg and annotations/NAME.png (PNG of class ids), or the ADE20K split
folders images/{training,validation} and annotations/{training,validation}: then the same root
serves --train (training) and --val (validation). Features are cached in memory as float16:
N x D x (resolution/patch)^2 x 2 bytes per split.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .results import add_result_args

    p = subparsers.add_parser(
        "seg",
        help="linear segmentation probe on patch tokens (mIoU)",
        description="DINOv2's linear segmentation probe: a frozen backbone's last-block patch "
        "tokens, BatchNorm + a linear layer per patch, logits upsampled to the mask, "
        "cross-entropy; prints per-class IoU, mIoU and pixel accuracy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="a zoo name (`vssl models`) or a checkpoint (.pth/.safetensors/"
        "transformers directory)",
    )
    p.add_argument("--weights", metavar="PATH", default=None, help="weights for a zoo-name --model")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="allow a zoo model without --weights (random weights: smoke tests only)",
    )
    p.add_argument("--train", required=True, metavar="DIR", help="training images + masks")
    p.add_argument(
        "--val",
        metavar="DIR",
        default=None,
        help="validation images + masks (default: --train, whose "
        "images/validation split is then used)",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        required=True,
        metavar="N",
        help="classes after the id mapping (ADE20K: 150)",
    )
    p.add_argument(
        "--reduce-zero-label",
        action="store_true",
        help="ADE20K ids: 0 (other) is ignored and id k becomes class k-1",
    )
    p.add_argument(
        "--ignore-index",
        type=int,
        default=255,
        metavar="ID",
        help="mask id left out of the loss and the IoU (default 255)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        metavar="PX",
        help="square input side, a multiple of the patch size (default: the model's img_size)",
    )
    p.add_argument(
        "--transform",
        choices=("crop", "resize"),
        default="crop",
        help="crop: shorter side to PX, centre square; resize: whole image to PX x PX "
        "(default crop)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=30,
        help="probe epochs (default 30, about DINOv2's 40k iterations x 16 images on ADE20K)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument(
        "--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)"
    )
    p.add_argument(
        "--no-bn",
        action="store_true",
        help="a bare linear layer (DINOv2's head has a BatchNorm before it)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="images per batch, backbone and probe (default 16)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="backbone dtype (default fp32); the probe trains in fp32",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="decoding processes (default: min(4, CPU count); 0 = in this process)",
    )
    p.add_argument("--seed", type=int, default=0, help="probe init and shuffling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"vssl eval seg: error: {msg}", file=sys.stderr, flush=True)
    return 2


def run(args: argparse.Namespace) -> int:
    """The ``vssl eval seg`` command: 0 on success, 2 on a user error."""
    from ..models import create_model, list_models
    from .results import format_table, record

    for name, value, low in (
        ("--num-classes", args.num_classes, 1),
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            return _fail(f"{name} must be >= {low}, got {value}")
    if args.lr <= 0:
        return _fail(f"--lr must be > 0, got {args.lr}")
    val_dir = args.val if args.val is not None else args.train
    try:
        train_root = Path(os.path.abspath(args.train))
        if args.val is None and _split_dirs(train_root, "validation")[0] == train_root / "images":
            return _fail(
                f"--val is needed: {args.train} has no images/validation split, and "
                "scoring the probe on its own training images says nothing"
            )
    except FileNotFoundError as exc:
        return _fail(str(exc))
    try:
        model = create_model(
            args.model,
            args.weights,
            dtype=args.dtype,
            device=args.device,
            random_init=args.random_init,
        )
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure: say what it was, no traceback
        return _fail(f"cannot load model {args.model!r}: {exc}")
    if args.weights is None and args.model in list_models():
        print(
            f"WARNING: {args.model} has RANDOM weights (no --weights given): a smoke test only",
            file=sys.stderr,
            flush=True,
        )
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    try:
        result = train_linear_seg(
            model,
            args.train,
            val_dir,
            num_classes=args.num_classes,
            resolution=args.resolution,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            device=args.device,
            ignore_index=args.ignore_index,
            reduce_zero_label=args.reduce_zero_label,
            transform=args.transform,
            weight_decay=args.weight_decay,
            batchnorm=not args.no_bn,
            dtype=args.dtype,
            num_workers=max(0, num_workers),
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    except torch.cuda.OutOfMemoryError:
        return _fail(f"out of GPU memory at --batch-size {args.batch_size}: try a smaller one")

    for path, reason in result.skipped[:20]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(result.skipped) > 20:
        print(f"... and {len(result.skipped) - 20} more skipped", file=sys.stderr)
    gt_pixels = result.confusion.sum(1)
    rows = [
        {"class": c, "iou": None if math.isnan(v) else float(v), "val_pixels": int(n)}
        for c, (v, n) in enumerate(zip(result.per_class_iou, gt_pixels))
    ]
    print(format_table(rows, ["class", "iou", "val_pixels"]))
    print()
    print(
        format_table(
            [
                {"metric": "seg_miou", "value": result.miou},
                {"metric": "seg_pixel_acc", "value": result.pixel_acc},
            ]
        )
    )
    print(result.summary())
    resolution = args.resolution or int(model.config.img_size)
    record(
        args.results,
        protocol="seg",
        metrics={"seg_miou": result.miou, "seg_pixel_acc": result.pixel_acc},
        model=args.run_name or args.model,
        checkpoint=args.weights,
        dataset=args.dataset or Path(os.path.abspath(val_dir)).name,
        extra={
            "num_classes": args.num_classes,
            "resolution": resolution,
            "transform": args.transform,
            "epochs": args.epochs,
            "lr": args.lr,
            "batchnorm": not args.no_bn,
            "num_train": result.num_train,
            "num_val": result.num_val,
            "num_skipped": len(result.skipped),
            "per_class_iou": [
                None if math.isnan(v) else round(float(v), 6) for v in result.per_class_iou
            ],
        },
    )
    return 0
