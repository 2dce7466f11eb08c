"""`vssl finetune`: end-to-end fine-tuning of a pretrained ViT for image classification.

The protocol MAE, BEiT and SplitMask report (MAE's ``main_finetune.py``; docs/architecture.md,
Fine-tuning): AdamW with layer-wise lr decay, drop path, Mixup/CutMix with label smoothing,
RandAugment, a global-average-pool (+ ``fc_norm``) or CLS head, linear warm-up then a half-cycle
cosine per step, evaluation on the test folder after every epoch, the best and the last weights,
exact resume and torchrun (DDP).

Output folder::

    finetune.json       the settings, classes and where the backbone came from
    metrics.jsonl       one line per epoch: train loss, lr, test top-1 / top-5, seconds
    ckpt/step_N/        the resumable state (model + optimizer) of the last finished epoch
    best.safetensors    the classifier of the epoch with the best test top-1 (``load_classifier``)
    last.safetensors    the classifier after the last epoch

The data are a function of ``(seed, epoch, rank)`` (order, crops) and the global RNG is re-seeded
from ``(seed, step, rank)`` at every step (RandAugment, Mixup/CutMix, drop path), so a run resumed
from its last epoch ends with the same weights as one that was never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._io import atomic_write
from .data.augment import MAEView, normalize
from .data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from .data.listing import list_inputs
from .data.transforms import EvalTransform
from .evaluate.results import DEFAULT_RESULTS, add_result_args, record
from .extract import (
    check_resolution,
    collate_skipping_errors,
    default_num_workers,
    eval_resolution,
    init_decode_worker,
)
from .train.data import derive_seed
from .train.mixup import Mixup, soft_target_cross_entropy
from .train.optim import build_optimizer, clean_name, layer_id

__all__ = [
    "Classifier",
    "FinetuneConfig",
    "FinetuneResult",
    "add_finetune_parser",
    "finetune",
    "layer_decay_groups",
    "load_classifier",
    "read_class_folders",
    "resize_pos_embed_",
    "run_finetune",
]

METRICS = "metrics.jsonl"
SETTINGS = "finetune.json"
BEST = "best.safetensors"
LAST = "last.safetensors"
_NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "register_tokens")  # MAE's no_weight_decay() set


# ------------------------------------------------------------------------------------ settings
@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run. Defaults: MAE's ViT-B recipe (``FINETUNE.md``) except
    the batch (64 per process here, 1024 in MAE: the lr follows it linearly)."""

    model: str
    train: str
    test: str
    output: str
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    img_size: int | None = None  # None: the size the backbone's family is evaluated at
    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 64  # per process
    lr: float | None = None  # absolute peak lr; None: blr * global batch / 256
    blr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    randaug_n: int = 2  # 0: no RandAugment
    randaug_m: int = 27  # kornia's 0-30 scale: 27 = timm's rand-m9 (9 of 10)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    pool: str = "avg"
    clip_grad: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    num_workers: int | None = None
    device: str | None = None
    resume: bool = False
    progress: bool = True
    results: str | None = DEFAULT_RESULTS
    dataset: str | None = None
    run_name: str | None = None

    def __post_init__(self):
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0 < self.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {self.layer_decay}"),
            (0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.blr > 0, f"--blr must be > 0, got {self.blr}"),
            (self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.pool in ("avg", "cls"), f"--pool must be avg or cls, got {self.pool!r}"),
            (self.randaug_n >= 0, f"--randaug-n must be >= 0, got {self.randaug_n}"),
            (0 < self.randaug_m < 30, f"--randaug-m must be in 1..29, got {self.randaug_m}"),
            (
                0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                f"--crop-scale must be 0 < min <= max <= 1, got {self.crop_scale}",
            ),
            (self.clip_grad is None or self.clip_grad > 0, "--clip-grad must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.random_init and self.weights is not None:
            raise ValueError("--random-init and --weights contradict each other: drop one")

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        skip = {"resume", "progress", "results", "dataset", "run_name", "num_workers", "device"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class FinetuneResult:
    top1: float
    top5: float
    best_top1: float
    best_epoch: int
    epochs_run: int
    output: Path
    img_size: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class MAESchedule:
    """MAE's per-step lr (``util/lr_sched.py``, called with the fractional epoch): linear from 0
    to ``peak`` over ``warmup`` steps (``peak * step / warmup``), then a half cosine from ``peak``
    to ``final`` at ``total`` steps. (``vssl.train.schedules.CosineSchedule`` is DINOv2's, whose
    warm-up reaches the peak one step earlier.)"""

    peak: float
    final: float
    total: int
    warmup: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * step / self.warmup
        t = (step - self.warmup) / max(self.total - self.warmup, 1)
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------ data
def read_class_folders(path: str | os.PathLike, role: str) -> list[tuple[Path, str]]:
    """``[(image path, class name)]`` of an image folder with one subfolder per class.

    A clear error for a missing path, a file, a folder without class subfolders or with one
    class; files directly in the folder (no class) are left out with a note on stderr.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{role} {root} does not exist")
    if not root.is_dir():
        raise ValueError(
            f"{role} {root} is not a folder: fine-tuning reads an image folder with one "
            f"subfolder per class ({root}/<class>/<image>)"
        )
    items = list_inputs(root)
    labelled = [(p, lab) for p, lab in items if lab is not None]
    loose = len(items) - len(labelled)
    if not labelled:
        found = f"{loose} files directly in it" if loose else "it is empty"
        raise ValueError(
            f"{role} {root} has no class subfolders ({found}): put each class's images in its "
            f"own subfolder, {root}/<class>/<image>"
        )
    classes = sorted({lab for _, lab in labelled})
    if len(classes) < 2:
        raise ValueError(
            f"{role} {root} has only one class ({classes[0]!r}): classification needs at least "
            "two class subfolders"
        )
    if loose:
        print(
            f"vssl finetune: note: {role} {root}: {loose} files directly in the folder are not "
            "in a class subfolder and are left out",
            file=sys.stderr,
            flush=True,
        )
    return labelled


def check_classes(train: list[tuple[Path, str]], test: list[tuple[Path, str]], train_dir, test_dir):
    """The sorted train classes; an error when the test folder has a class the train lacks."""
    classes = sorted({lab for _, lab in train})
    unknown = sorted({lab for _, lab in test} - set(classes))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(
            f"--test {test_dir} has {len(unknown)} classes that --train {train_dir} lacks "
            f"({shown}): the model could never predict them; add them to the training folder or "
            "remove them from the test folder"
        )
    return classes


class _FolderImages(torch.utils.data.Dataset):
    """Item ``i`` -> ``(i, (image, label), None)`` or ``(i, None, reason)`` (a bad file is
    skipped, never fatal). With ``seed`` the transform is random, drawn from ``(seed, epoch, i)``."""

    def __init__(self, items, class_index, transform, *, seed: int | None = None, as_array=False):
        self.paths = [str(p) for p, _ in items]
        self.labels = [class_index[lab] for _, lab in items]
        self.transform, self.seed, self.as_array = transform, seed, as_array
        self.draft_size = getattr(transform, "draft_size", None)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = open_image(
                self.paths[i],
                draft_size=self.draft_size,
                max_pixels=DEFAULT_MAX_PIXELS,
                as_array=self.as_array,
            )
            if self.seed is None:
                x = self.transform(img)
            else:
                x = self.transform(img, random.Random(derive_seed(self.seed, self.epoch, i)))
        except ImageDecodeError as exc:
            return i, None, exc.reason
        return i, (x, torch.tensor(self.labels[i])), None


def _loader(dataset, batches: list[list[int]], num_workers: int) -> torch.utils.data.DataLoader:
    workers = max(0, min(num_workers, len(batches)))
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_skipping_errors,
        worker_init_fn=init_decode_worker if workers else None,
    )


def epoch_batches(n: int, batch: int, world: int, rank: int, seed: int, epoch: int):
    """This rank's batches of an epoch: a permutation drawn from ``(seed, epoch)``, cut into
    ``n // (batch * world)`` global batches (the rest dropped, as MAE's ``drop_last``), global batch
    ``s`` giving rank ``r`` its ``r``-th slice: every rank runs the same number of steps."""
    g = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    perm = torch.randperm(n, generator=g).tolist()
    steps = n // (batch * world)
    return [perm[(s * world + rank) * batch : (s * world + rank + 1) * batch] for s in range(steps)]


# ------------------------------------------------------------------------------------ model
class Classifier(nn.Module):
    """A ViT with MAE's classification head: the mean of the last block's patch tokens through a
    fresh LayerNorm (``fc_norm``; the encoder's final norm is removed, as MAE's ``global_pool``
    does), or the CLS token after the encoder's norm (``pool="cls"``); then one linear layer
    initialized with std 2e-5 (MAE). The mask token is not used and not trained."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
        dim = backbone.embed_dim
        self.backbone, self.pool = backbone, pool
        if pool == "avg":
            backbone.norm = nn.Identity()
            self.fc_norm: nn.Module = nn.LayerNorm(dim, eps=backbone.config.norm_eps)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        if getattr(backbone, "mask_token", None) is not None:
            backbone.mask_token.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        if self.pool == "avg":
            return self.fc_norm(f["x_norm_patchtokens"].mean(dim=1))
        return f["x_norm_clstoken"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resize_pos_embed_(model: nn.Module, img_size: int) -> bool:
    """Resample a ViT's position embedding for ``img_size`` once, in place, with the model's own
    ``interpolate_pos_encoding`` (the scheme of the weights' origin, which ``vssl embed`` applies
    on the fly); returns whether it changed. The input must be a multiple of the patch size."""
    check_resolution(model, img_size)
    cfg = model.config
    if img_size == cfg.img_size:
        return False
    grid = img_size // cfg.patch_size
    with torch.no_grad():
        pos = model.interpolate_pos_encoding(grid * grid, img_size, img_size, torch.float32)
    model.pos_embed = nn.Parameter(pos.to(model.pos_embed.dtype).contiguous())
    model.config = cfg.replace(img_size=img_size)
    return True


def set_drop_path_(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (timm / MAE / DINOv2)."""
    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        blk.drop_path.p = rate * i / max(depth - 1, 1)
    model.config = model.config.replace(drop_path_rate=rate)


def load_backbone(cfg: FinetuneConfig) -> tuple[nn.Module, str]:
    """The backbone to fine-tune and a line saying what it is. ``random_init`` keeps the
    architecture (of a zoo name or of any checkpoint) with fresh weights drawn from ``seed``."""
    from .models.checkpoints import describe_source
    from .models.vit import VisionTransformer
    from .models.zoo import create_model, is_zoo_name

    zoo = is_zoo_name(cfg.model)
    if zoo and cfg.weights is None and not cfg.random_init:
        raise ValueError(
            f"{cfg.model} is a zoo name without weights: pass --weights PATH to fine-tune "
            "pretrained weights, or --random-init to fine-tune from scratch"
        )
    if zoo and cfg.random_init:
        model = create_model(cfg.model, random_init=True, seed=cfg.seed)
        return model, f"{cfg.model} with RANDOM weights (seed {cfg.seed}): no pretraining"
    model = create_model(cfg.model, cfg.weights)
    if cfg.random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = VisionTransformer(model.config)
        return model, (
            f"the architecture of {cfg.model} with RANDOM weights (seed {cfg.seed}): no pretraining"
        )
    what = describe_source(cfg.model) if not zoo else None
    return model, what or f"{cfg.model}" + (f" with weights {cfg.weights}" if cfg.weights else "")


def layer_decay_groups(model: Classifier, layer_decay: float) -> list[dict]:
    """AdamW groups with MAE's layer-wise lr decay (``util/lr_decay.py``).

    Layer ids are DINOv2's / MAE's (``vssl.train.optim.layer_id``): 0 for the patch embedding,
    position embedding and tokens, ``i + 1`` for block ``i``, ``L + 1`` for the rest (the head,
    ``fc_norm``, the encoder's norm); lr multiplier ``layer_decay ** (L + 1 - id)``. No weight
    decay on 1-D parameters (biases, norms, LayerScale) and on the position embedding and tokens
    (MAE's ``no_weight_decay``). Each group: ``params``, ``names``, ``lr_multiplier``,
    ``wd_multiplier``, ``layer_id``.
    """
    depth = len(model.backbone.blocks)
    groups: dict[tuple[int, float], dict] = {}
    for raw, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(raw)
        if name.startswith("backbone."):
            lid = layer_id(name[len("backbone.") :], depth)
        else:
            lid = depth + 1
        no_wd = p.ndim <= 1 or name.split(".")[-1] in _NO_WEIGHT_DECAY
        key = (lid, 0.0 if no_wd else 1.0)
        g = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_multiplier": layer_decay ** (depth + 1 - lid),
                "wd_multiplier": key[1],
                "layer_id": lid,
                # fields the trainer's groups carry, so the checkpoint code sees the same shape
                "frozen_until": 0,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _classifier_meta(model: Classifier, classes: list[str]) -> dict[str, str]:
    return {
        "format": "vssl-classifier",
        "vssl_config": json.dumps(model.backbone.config.to_dict()),
        "pool": model.pool,
        "classes": json.dumps(classes),
    }


def save_classifier(model: Classifier, classes: list[str], path: Path) -> Path:
    """One safetensors file: the classifier's weights, its ViT config, pool and class names."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = _classifier_meta(model, classes)
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def load_classifier(path: str | os.PathLike) -> tuple[Classifier, list[str]]:
    """``(classifier in eval mode, class names)`` from a ``best`` / ``last.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models.vit import VisionTransformer, ViTConfig

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "vssl-classifier":
        raise ValueError(
            f"{path} is not a `vssl finetune` classifier (no vssl-classifier metadata)"
        )
    classes = json.loads(meta["classes"])
    backbone = VisionTransformer(ViTConfig.from_dict(json.loads(meta["vssl_config"])))
    model = Classifier(backbone, len(classes), meta["pool"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), classes


# ------------------------------------------------------------------------------------ training
def _log(info, msg: str) -> None:
    if info.is_main:
        print(f"vssl finetune: {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast) -> tuple[int, int, int, int]:
    """``(top-1 hits, top-5 hits, images, skipped)`` over ``loader`` (this rank's share)."""
    was = model.training
    model.eval()
    hit1 = hit5 = n = skipped = 0
    with autocast:
        for _, batch, errors in loader:
            skipped += len(errors)
            if batch is None:
                continue
            x, y = batch
            x, y = normalize(x.to(device)), y.to(device)
            logits = model(x).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit1 += int((top[:, 0] == y).sum())
            hit5 += int((top == y[:, None]).any(dim=1).sum())
            n += len(y)
    model.train(was)
    return hit1, hit5, n, skipped


def _all_sum(values: list[float], info) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if info.distributed:
        if info.backend == "nccl":
            t = t.to(info.device)
        dist.all_reduce(t)
    return t.cpu().tolist()


def _rewrite_metrics(path: Path, finished: int) -> list[dict]:
    """Keep the lines of the first ``finished`` epochs: a resumed run redoes the later ones (an
    epoch logged after its checkpoint was written is never counted twice)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("epoch", 0) <= finished]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return rows


def finetune(cfg: FinetuneConfig, *, stop_after_epoch: int | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.train``, evaluating on ``cfg.test`` after every epoch.

    Run it in one process or in every process of a torchrun launch (DDP; gloo on CPU).
    ``stop_after_epoch``: end this call after that many epochs of the schedule (the schedule is
    still ``cfg.epochs`` long; ``--resume`` continues it), as an interruption would.
    """
    from tqdm import tqdm

    from .models.checkpoints import CheckpointError
    from .train.checkpoint import (
        checkpoint_path,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from .train.distributed import setup, teardown, wrap

    # everything that can be wrong with the inputs fails here, before any model is built
    train_items = read_class_folders(cfg.train, "--train")
    test_items = read_class_folders(cfg.test, "--test")
    classes = check_classes(train_items, test_items, cfg.train, cfg.test)
    class_index = {c: i for i, c in enumerate(classes)}
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a folder")
    previous = latest_checkpoint(out) if out.is_dir() else None
    if previous is not None and not cfg.resume:
        raise ValueError(
            f"--output {out} already holds a fine-tuning run ({previous.name}): pass --resume to "
            "continue it, or choose another --output"
        )

    info = setup(cfg.device)
    world, rank, device = info.world_size, info.rank, info.device
    global_batch = cfg.batch_size * world
    iters = len(train_items) // global_batch
    if iters == 0:
        raise ValueError(
            f"--train has {len(train_items)} images, fewer than one global batch "
            f"({cfg.batch_size} x {world} processes): lower --batch-size"
        )

    backbone, what = load_backbone(cfg)
    _log(info, f"backbone: {what}")
    img_size = cfg.img_size
    if img_size is None:
        img_size, why = eval_resolution(backbone, cfg.model)
        _log(info, f"input {img_size} px ({why}; --img-size to change)")
    native = backbone.config.img_size
    if resize_pos_embed_(backbone, img_size):
        _log(info, f"position embedding resampled from {native} to {img_size} px")
    set_drop_path_(backbone, cfg.drop_path)
    with torch.random.fork_rng(devices=[]):  # the head's init: the same for the same seed
        torch.manual_seed(derive_seed(cfg.seed, "head"))
        model = Classifier(backbone, len(classes), cfg.pool).to(device)
    model.train()

    groups = layer_decay_groups(model, cfg.layer_decay)
    optimizer = build_optimizer(groups, betas=(cfg.beta1, cfg.beta2))
    peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
    total = cfg.epochs * iters
    warmup = min(round(cfg.warmup_epochs * iters), total)
    if warmup < round(cfg.warmup_epochs * iters):
        _log(info, f"warm-up cut to the whole run ({cfg.epochs} epochs < --warmup-epochs)")
    lr_schedule = MAESchedule(peak_lr, cfg.min_lr, total, warmup)
    mixup = Mixup(
        len(classes),
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
    )
    randaug = None
    if cfg.randaug_n:
        from kornia.augmentation.auto import RandAugment

        randaug = RandAugment(n=cfg.randaug_n, m=cfg.randaug_m)

    settings = cfg.resume_key()
    start_epoch, best_top1, best_epoch = 0, -1.0, 0
    if previous is not None:
        state = {"model": model, "optimizer": optimizer}
        meta = load_checkpoint(previous, state)
        if meta.get("settings") != json.loads(json.dumps(settings)):
            saved = meta.get("settings") or {}
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise CheckpointError(
                f"--resume: {out} was fine-tuned with other settings ({', '.join(diff)} differ): "
                "a run continues exactly only with the same ones; repeat them, or choose another "
                "--output"
            )
        if meta.get("world_size") != world or meta.get("classes") != classes:
            raise CheckpointError(
                f"--resume: {out} ran on {meta.get('world_size')} processes with "
                f"{len(meta.get('classes') or [])} classes; this launch has {world} and "
                f"{len(classes)}: resume with the same launch and folders"
            )
        start_epoch = int(meta["epoch"])
        best_top1, best_epoch = float(meta["best_top1"]), int(meta["best_epoch"])
        _log(info, f"resumed {previous} (epoch {start_epoch} of {cfg.epochs})")
    elif cfg.resume:
        _log(info, f"--resume: no checkpoint in {out}; starting from the beginning")
    history = _rewrite_metrics(out / METRICS, start_epoch) if info.is_main else []
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "settings": settings,
            "backbone": what,
            "img_size": img_size,
            "classes": classes,
            "world_size": world,
            "global_batch": global_batch,
            "peak_lr": peak_lr,
            "iters_per_epoch": iters,
        }
        text = json.dumps(doc, indent=1, default=str) + "\n"
        atomic_write(out / SETTINGS, lambda tmp: Path(tmp).write_text(text))

    num_workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    view = MAEView(img_size, scale=cfg.crop_scale)  # RandomResizedCrop(bicubic) + flip, uint8
    train_set = _FolderImages(train_items, class_index, view, seed=cfg.seed, as_array=True)
    test_set = _FolderImages(test_items, class_index, EvalTransform(img_size))
    test_rows = list(range(rank, len(test_items), world))
    test_batches = [
        test_rows[i : i + cfg.batch_size] for i in range(0, len(test_rows), cfg.batch_size)
    ]
    cuda = device.type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )
    wrapped = wrap(model, "ddp" if info.distributed else "none", info)
    top1 = top5 = float("nan")
    done = start_epoch  # epochs finished
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            t0 = time.perf_counter()
            train_set.epoch = epoch
            batches = epoch_batches(len(train_items), cfg.batch_size, world, rank, cfg.seed, epoch)
            bar = tqdm(
                total=iters,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                disable=not (cfg.progress and info.is_main),
                file=sys.stderr,
                dynamic_ncols=True,
            )
            loss_sum, skipped, lr = 0.0, 0, 0.0
            for i, (_, batch, errors) in enumerate(_loader(train_set, batches, num_workers)):
                step = epoch * iters + i
                skipped += len(errors)
                if batch is None:
                    raise ValueError(
                        f"no image of a training batch could be decoded (epoch {epoch + 1}, step "
                        f"{i + 1}): {errors[0][1] if errors else ''}; clean --train"
                    )
                lr = lr_schedule(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_multiplier"]
                    g["weight_decay"] = cfg.weight_decay * g["wd_multiplier"]
                torch.manual_seed(derive_seed(cfg.seed, "step", step, rank))
                rng = np.random.default_rng(derive_seed(cfg.seed, "mixup", step, rank))
                x, y = batch
                x, y = x.to(device, non_blocking=True), y.to(device)
                x = x.float().div_(255.0)
                if randaug is not None:
                    x = randaug(x)
                x = normalize(x)
                x, target, _ = mixup(x, y, rng)
                with autocast:
                    logits = wrapped(x)
                loss = soft_target_cross_entropy(logits, target)
                loss.backward()
                if cfg.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                (global_loss,) = _all_sum([float(loss.detach())], info)
                global_loss /= world
                if not math.isfinite(global_loss):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch + 1}, step {i + 1}: lower --lr / --blr or "
                        f"lengthen --warmup-epochs; the last good state is in {out / 'ckpt'}"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += global_loss
                bar.update(1)
                bar.set_postfix(loss=f"{global_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.close()
            train_seconds = time.perf_counter() - t0
            h1, h5, n, bad = evaluate(  # each rank its shard: no DDP collective in here
                model, _loader(test_set, test_batches, num_workers), device, autocast
            )
            h1, h5, n, bad, skipped = _all_sum([h1, h5, n, bad, skipped], info)
            if n == 0:
                raise ValueError(f"no test image of --test {cfg.test} could be decoded")
            top1, top5 = h1 / n, h5 / n
            if top1 > best_top1:
                best_top1, best_epoch = top1, epoch + 1
                if info.is_main:
                    save_classifier(model, classes, out / BEST)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / iters,
                "lr": lr,
                "test_top1": top1,
                "test_top5": top5,
                "seconds": time.perf_counter() - t0,
                "train_images_per_s": iters * global_batch / train_seconds,
                "skipped_train": int(skipped),
                "skipped_test": int(bad),
            }
            meta = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * iters,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "world_size": world,
                "classes": classes,
                "settings": settings,
                "rng": "re-seeded every step from (seed, step, rank): nothing to restore",
            }
            if info.is_main:  # before the checkpoint: a resume drops a line it did not keep
                history.append(row)
                with open(out / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            save_checkpoint(
                checkpoint_path(out, (epoch + 1) * iters),
                {"model": model, "optimizer": optimizer, "meta": meta},
                keep_last=1,
            )
            _log(
                info,
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, test top-1 "
                f"{top1:.4f}, top-5 {top5:.4f} (best {best_top1:.4f} at epoch {best_epoch}), "
                f"{row['seconds']:.0f} s"
                + (
                    f", skipped {int(skipped)} train / {int(bad)} test images"
                    if skipped or bad
                    else ""
                ),
            )
            done = epoch + 1
        if info.is_main and done == cfg.epochs:
            save_classifier(model, classes, out / LAST)
    except BaseException:
        teardown(wrapped, barrier=False)  # another rank may be inside a collective
        raise
    teardown(wrapped)
    if history:
        top1, top5 = history[-1]["test_top1"], history[-1]["test_top5"]
    return FinetuneResult(
        top1=top1,
        top5=top5,
        best_top1=best_top1,
        best_epoch=best_epoch,
        epochs_run=done - start_epoch,
        output=out,
        img_size=img_size,
        history=history,
    )


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl finetune runs/my_mae/ --train cifar/train --test cifar/test --img-size 32 --epochs 50
  vssl finetune vit-tiny-p8-32 --random-init --train cifar/train --test cifar/test \\
      --epochs 50                                   # the "no pretraining" row
  vssl finetune dinov2-vits14 --weights dinov2_vits14_pretrain.pth --train DIR --test DIR \\
      --img-size 224 --layer-decay 0.65 --drop-path 0.1
  vssl finetune dinov2-vits14-hf/ --train DIR --test DIR --pool cls   # a transformers folder
  torchrun --nproc-per-node 8 -m vssl finetune RUN --train DIR --test DIR   # DDP, 8 processes
  vssl finetune RUN --train DIR --test DIR --output OUT --resume      # continue OUT exactly

The defaults are MAE's fine-tuning recipe (FINETUNE.md, ViT-B): AdamW (0.9, 0.999), peak lr
--blr 5e-4 x global batch / 256 (MAE: 1e-3 and layer decay 0.75 for ViT-L/H), weight decay 0.05,
layer decay 0.65, drop path 0.1, Mixup 0.8 / CutMix 1.0 (per batch, switch 0.5), label smoothing
0.1, RandAugment (2 ops, magnitude 27 of 30 = timm's rand-m9), 5 warm-up epochs then a cosine to
--min-lr 1e-6, global average pool + fc_norm, 100 epochs. Not included: random erasing (MAE's
reprob 0.25) and RandAugment's magnitude noise (mstd 0.5); kornia draws RandAugment's operations
once per batch where timm draws them per image.

--train and --test are image folders with one subfolder per class (DIR/<class>/<image>); the test
classes must all be in --train. Images are cropped with RandomResizedCrop(--img-size, scale
--crop-scale, bicubic) + flip for training and resized to img-size x 256/224 + center-cropped for
testing. A backbone made for another input size gets its position embedding resampled once, the
way `vssl embed` resamples it. OUTPUT gets metrics.jsonl (one line per epoch), ckpt/ (the state of
the last finished epoch, for --resume), best.safetensors and last.safetensors (the classifier:
vssl.finetune.load_classifier). The final top-1 / top-5 and the best top-1 are appended to the
results file (protocol finetune) beside kNN and linear probes: `vssl eval report` shows them.
"""


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl finetune`` (sets ``func=run_finetune``)."""
    d = FinetuneConfig("", "", "", "")
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a backbone end to end for classification (MAE / BEiT / SplitMask protocol)",
        description="Fine-tune all weights of a ViT (a zoo model with weights, a `vssl pretrain` "
        "run folder, a\ncheckpoint file or a transformers folder) plus a new linear head on an "
        "image folder with\none subfolder per class; test top-1 / top-5 after every epoch.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="RUN_OR_MODEL",
        help="a `vssl pretrain` run folder (its backbone.safetensors) or RUN/ckpt/step_N, a "
        ".pth/.safetensors file, a transformers folder, or a zoo name with --weights",
    )
    p.add_argument("--weights", metavar="PATH", help="weights for a zoo-name RUN_OR_MODEL")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the same architecture with random weights (seed --seed): the no-pretraining baseline",
    )
    g = p.add_argument_group("data")
    g.add_argument("--train", metavar="DIR", required=True, help="training folder, DIR/<class>/*")
    g.add_argument("--test", metavar="DIR", required=True, help="test folder, DIR/<class>/*")
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="PX",
        help="input size, a multiple of the patch size (default: the size the backbone's family "
        "is evaluated at, e.g. 224 for DINOv2 and MAE, 32 for the CPU recipes)",
    )
    g.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=d.crop_scale,
        metavar=("MIN", "MAX"),
        help="RandomResizedCrop area range (default 0.08 1)",
    )
    g.add_argument("--num-workers", type=int, default=None, metavar="N", help="decoding processes")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", metavar="N", type=int, default=d.epochs, help=f"default {d.epochs}")
    o.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=d.batch_size,
        help=f"per process (default {d.batch_size})",
    )
    o.add_argument(
        "--lr",
        metavar="X",
        type=float,
        default=None,
        help="peak learning rate (default: --blr x batch / 256)",
    )
    o.add_argument(
        "--blr",
        metavar="X",
        type=float,
        default=d.blr,
        help=f"base lr for a global batch of 256 (default {d.blr:g})",
    )
    o.add_argument(
        "--min-lr", metavar="X", type=float, default=d.min_lr, help=f"default {d.min_lr:g}"
    )
    o.add_argument(
        "--warmup-epochs",
        metavar="X",
        type=float,
        default=d.warmup_epochs,
        help=f"default {d.warmup_epochs:g}",
    )
    o.add_argument(
        "--weight-decay",
        metavar="X",
        type=float,
        default=d.weight_decay,
        help=f"default {d.weight_decay:g}",
    )
    o.add_argument(
        "--layer-decay",
        metavar="X",
        type=float,
        default=d.layer_decay,
        help=f"lr x decay^(depth + 1 - layer) per block (default {d.layer_decay:g}; 1 = off)",
    )
    o.add_argument(
        "--clip-grad",
        metavar="X",
        type=float,
        default=None,
        help="gradient norm clip (default off)",
    )
    o.add_argument(
        "--beta1", metavar="X", type=float, default=d.beta1, help=f"AdamW (default {d.beta1:g})"
    )
    o.add_argument(
        "--beta2", metavar="X", type=float, default=d.beta2, help=f"AdamW (default {d.beta2:g})"
    )
    r = p.add_argument_group("regularization")
    r.add_argument(
        "--drop-path", metavar="X", type=float, default=d.drop_path, help=f"default {d.drop_path:g}"
    )
    r.add_argument(
        "--mixup",
        metavar="X",
        type=float,
        default=d.mixup,
        help=f"Mixup alpha, 0 = off (default {d.mixup:g})",
    )
    r.add_argument(
        "--cutmix",
        metavar="X",
        type=float,
        default=d.cutmix,
        help=f"CutMix alpha, 0 = off (default {d.cutmix:g})",
    )
    r.add_argument(
        "--mixup-prob",
        metavar="X",
        type=float,
        default=d.mixup_prob,
        help=f"probability to mix a batch (default {d.mixup_prob:g})",
    )
    r.add_argument(
        "--mixup-switch-prob",
        metavar="X",
        type=float,
        default=d.mixup_switch_prob,
        help=f"CutMix instead of Mixup when both are on (default {d.mixup_switch_prob:g})",
    )
    r.add_argument(
        "--label-smoothing",
        metavar="X",
        type=float,
        default=d.label_smoothing,
        help=f"default {d.label_smoothing:g}",
    )
    r.add_argument(
        "--randaug-n",
        metavar="N",
        type=int,
        default=d.randaug_n,
        help=f"RandAugment operations (kornia draws them per batch), 0 = off (default {d.randaug_n})",
    )
    r.add_argument(
        "--randaug-m",
        metavar="N",
        type=int,
        default=d.randaug_m,
        help=f"RandAugment magnitude of 30 (kornia's scale; default {d.randaug_m} = timm's m9)",
    )
    m = p.add_argument_group("model and run")
    m.add_argument(
        "--pool",
        choices=("avg", "cls"),
        default=d.pool,
        help="head input: mean patch token + fc_norm (MAE, default) or the CLS token",
    )
    m.add_argument(
        "--output",
        "-o",
        metavar="DIR",
        default="runs/finetune",
        help="run folder (default runs/finetune)",
    )
    m.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    m.add_argument("--seed", metavar="N", type=int, default=d.seed, help=f"default {d.seed}")
    m.add_argument(
        "--device", default=None, help="torch device (default: cuda:LOCAL_RANK if any, else cpu)"
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_result_args(p)
    p.set_defaults(func=run_finetune)
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The settings of a parsed ``vssl finetune`` command line."""
    return FinetuneConfig(
        model=args.model,
        train=args.train,
        test=args.test,
        output=args.output,
        weights=args.weights,
        random_init=args.random_init,
        seed=args.seed,
        img_size=args.img_size,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        blr=args.blr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        drop_path=args.drop_path,
        mixup=args.mixup,
        cutmix=args.cutmix,
        mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob,
        label_smoothing=args.label_smoothing,
        randaug_n=args.randaug_n,
        randaug_m=args.randaug_m,
        crop_scale=tuple(args.crop_scale),
        pool=args.pool,
        clip_grad=args.clip_grad,
        beta1=args.beta1,
        beta2=args.beta2,
        num_workers=args.num_workers,
        device=args.device,
        resume=args.resume,
        progress=not args.no_progress,
        results=args.results,
        dataset=args.dataset,
        run_name=args.run_name,
    )


def run_finetune(args: argparse.Namespace) -> int:
    """The ``vssl finetune`` command."""
    cfg = config_from_args(args)
    result = finetune(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"finetune top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  (best top-1 "
        f"{result.best_top1:.4f} at epoch {result.best_epoch}) -> {result.output}",
        flush=True,
    )
    record_result(cfg, result)
    return 0


def record_result(cfg: FinetuneConfig, result: FinetuneResult) -> list[dict]:
    """Append the final top-1 / top-5 and the best top-1 to ``cfg.results`` (protocol
    ``finetune``)."""
    label = cfg.run_name or (
        f"{cfg.model} (random init)" if cfg.random_init else cfg.model.rstrip("/")
    )
    return record(
        cfg.results,
        protocol="finetune",
        metrics={"top1": result.top1, "top5": result.top5, "best_top1": result.best_top1},
        model=label,
        checkpoint=cfg.weights,
        dataset=cfg.dataset or Path(cfg.test).name,
        extra={
            "epochs": cfg.epochs,
            "best_epoch": result.best_epoch,
            "img_size": result.img_size,
            "pool": cfg.pool,
            "layer_decay": cfg.layer_decay,
            "output": str(result.output),
        },
    )
