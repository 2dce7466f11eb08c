"""``vssl eval linear``: DINOv2's grid of linear probes on frozen features, trained in one pass.

The grid (``dinov2/eval/linear.py``): the input of a head is the concatenation of the normed CLS
tokens of the last ``n`` blocks (n in {1, 4}), optionally followed by the mean of the last block's
normed patch tokens (``create_linear_input``), times 13 learning rates scaled by batch size / 256.
Every head is a linear layer initialised with N(0, 0.01) weights and zero bias, trained with SGD
(momentum 0.9, no weight decay) under a cosine schedule to zero; the head with the best accuracy
on a validation split is reported on the test split.

Where this differs from DINOv2, and why: the features are frozen *and cached* (no training
augmentation, no backbone forward per step), so the cost is the heads alone; the schedule is
counted in passes over the training rows (DINOv2: 10 x 1250 iterations of 128 on ImageNet, pass
``iterations=12500`` for that); and the head is chosen on a validation split carved from the
training set, where DINOv2 picks it on the split it reports.

The heads of one input variant live in one tensor of shape ``(D_in, K, C)``: a mini-batch is one
GEMM per variant for all K learning rates, and the columns of different heads never mix (each
head's loss depends only on its own columns).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "DINOV2_LRS",
    "HeadResult",
    "LinearResult",
    "add_parser",
    "init_head",
    "linear_input",
    "minibatches",
    "run",
    "scale_lr",
    "stratified_split",
    "train_linear_grid",
]

# dinov2/eval/linear.py defaults: learning rates before scaling, batch size, blocks, momentum.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_BATCH_SIZE = 128
DEFAULT_EPOCHS = 10
N_BLOCKS = (1, 4)
MOMENTUM = 0.9
INIT_STD = 0.01


def scale_lr(lr: float, batch_size: int) -> float:
    """DINOv2's linear scaling rule: the listed rates are for a (global) batch of 256."""
    return lr * batch_size / 256.0


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a seeded, class-stratified validation split: ``(train_idx, val_idx)``, both sorted.

    Each class with ``n`` rows gives ``round(val_fraction * n)`` of them to validation (at most
    ``n - 1``, so every class keeps a training row). Written here rather than taken from
    scikit-learn so that vssl does not need scikit-learn at run time for one split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = min(int(math.floor(val_fraction * len(rows) + 0.5)), len(rows) - 1)
        val.append(rows[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    if len(val_idx) == 0:
        raise ValueError(
            f"a validation fraction of {val_fraction} of {len(labels)} labelled rows leaves no "
            "validation rows: raise --val-fraction or use more training images"
        )
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def minibatches(n: int, batch_size: int, iterations: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``iterations`` batches of row positions in ``range(n)``: a fresh seeded permutation per
    epoch, the incomplete last batch of an epoch dropped (DINOv2's loader uses ``drop_last``).
    A batch larger than ``n`` is cut to ``n``."""
    if n < 1:
        raise ValueError("no training rows")
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    done = 0
    while done < iterations:
        perm = rng.permutation(n)
        for j in range(min(per_epoch, iterations - done)):
            yield perm[j * batch_size : (j + 1) * batch_size]
        done += min(per_epoch, iterations - done)


def head_name(n_blocks: int, avgpool: bool) -> str:
    return f"{n_blocks} block{'s' if n_blocks > 1 else ''}" + (" + avgpool" if avgpool else "")


def init_head(
    d_in: int, num_classes: int, *, seed: int, n_blocks: int, avgpool: bool, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's head init, ``weight ~ N(0, 0.01)`` as a ``(d_in, C)`` matrix (``x @ weight``) and
    a zero bias. Each head draws from its own generator keyed by (seed, config, lr), so a head
    starts the same whatever else is in the grid."""
    key = zlib.crc32(f"{n_blocks}/{int(avgpool)}/{float(lr)!r}".encode())
    g = torch.Generator().manual_seed(seed * 0x9E3779B1 % (2**61) + key)
    weight = torch.randn((d_in, num_classes), generator=g, dtype=torch.float32) * INIT_STD
    return weight, torch.zeros(num_classes, dtype=torch.float32)


def linear_input(
    layers: torch.Tensor, avgpool: torch.Tensor | None, n_blocks: int, use_avgpool: bool
) -> torch.Tensor:
    """DINOv2's ``create_linear_input``: ``layers`` (B, L, D) CLS tokens, oldest block first ->
    (B, n*D [+ D]) = the last ``n`` blocks' CLS tokens in block order, then the avgpool."""
    if n_blocks > layers.shape[1]:
        raise ValueError(f"{n_blocks} blocks requested, the features have {layers.shape[1]}")
    parts = [layers[:, -n_blocks:].reshape(layers.shape[0], -1)]
    if use_avgpool:
        if avgpool is None:
            raise ValueError("avgpool requested but the features have none")
        parts.append(avgpool)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@dataclass
class HeadResult:
    """One trained head of the grid and its validation accuracy (a fraction in [0, 1])."""

    n_blocks: int
    avgpool: bool
    lr: float  # as listed (DINOv2's convention: before batch-size scaling)
    scaled_lr: float  # the rate SGD used
    val_top1: float
    weight: np.ndarray  # (D_in, C): logits = x @ weight + bias
    bias: np.ndarray  # (C,)

    @property
    def config(self) -> str:
        return head_name(self.n_blocks, self.avgpool)


@dataclass
class LinearResult:
    """The grid, the head chosen on validation, and its test accuracy (fractions in [0, 1])."""

    heads: list[HeadResult]
    best: HeadResult
    test_top1: float
    test_top5: float | None  # None with fewer than 5 classes
    num_classes: int
    train_indices: np.ndarray  # rows of the train features the heads were trained on
    val_indices: np.ndarray  # rows of the train features held out to choose the head
    iterations: int
    batch_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _as_tensor(a, device) -> torch.Tensor:
    """A float32 copy in memory (``a`` may be a read-only memory map) on ``device``."""
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(device)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """(..., B, C) logits -> (...,) count of rows whose label is among the top k."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == y.view(-1, 1)).any(-1).sum(-1)


class _HeadGrid:
    """K heads (one per learning rate) for each input variant ``(n_blocks, avgpool)``.

    A variant's weights are one ``(D_in, K, C)`` tensor: column block k is head k, so one GEMM
    gives every head's logits and the heads never mix (head k's loss reads only its columns).
    """

    def __init__(self, variants, dim, num_classes, lrs, *, seed, device):
        self.variants, self.k, self.c = variants, len(lrs), num_classes
        self.weights, self.biases = [], []
        for n, a in variants:
            d_in = n * dim + (dim if a else 0)
            inits = [
                init_head(d_in, num_classes, seed=seed, n_blocks=n, avgpool=a, lr=lr) for lr in lrs
            ]
            self.weights.append(torch.stack([w for w, _ in inits], dim=1).to(device))
            self.biases.append(torch.stack([b for _, b in inits]).to(device))
        self.params = [p.requires_grad_() for p in self.weights + self.biases]
        self.momentum = [torch.zeros_like(p) for p in self.params]

    def logits(self, v: int, xl: torch.Tensor, xa: torch.Tensor | None) -> torch.Tensor:
        """(B, K, C) logits of variant ``v``'s heads from CLS blocks ``xl`` and avgpool ``xa``."""
        n, a = self.variants[v]
        x = linear_input(xl, xa, n, a)
        kc = self.k * self.c
        return torch.addmm(self.biases[v].view(1, kc), x, self.weights[v].view(-1, kc)).view(
            len(x), self.k, self.c
        )

    def step(self, xl, xa, y, lrs: torch.Tensor) -> None:
        """One SGD step of every head on one mini-batch, head k with learning rate ``lrs[k]``."""
        b = len(y)
        y_heads = y.repeat_interleave(self.k)  # row b*K + k of the flattened logits is (b, head k)
        # The sum over heads of each head's mean cross-entropy (DINOv2 also sums its heads'
        # losses): head k's gradient is exactly the gradient of its own loss.
        loss = sum(
            torch.nn.functional.cross_entropy(
                self.logits(v, xl, xa).view(b * self.k, self.c), y_heads, reduction="sum"
            )
            / b
            for v in range(len(self.variants))
        )
        for p in self.params:
            p.grad = None
        loss.backward()
        # torch.optim.SGD's momentum update (dampening 0, no weight decay), written out because
        # each head needs its own learning rate while the K heads share one tensor.
        with torch.no_grad():
            for p, buf in zip(self.params, self.momentum):
                buf.mul_(MOMENTUM).add_(p.grad)
                p.addcmul_(
                    buf, lrs.view((1, self.k, 1) if p.dim() == 3 else (self.k, 1)), value=-1.0
                )

    @torch.no_grad()
    def top1_correct(self, layers, avgpool, labels, rows, chunk=4096) -> np.ndarray:
        """(V, K) number of ``rows`` each head classifies right (features read in chunks)."""
        device = self.weights[0].device
        n_max = max(n for n, _ in self.variants)
        hits = torch.zeros(len(self.variants), self.k, dtype=torch.long, device=device)
        for s in range(0, len(rows), chunk):
            sel = rows[s : s + chunk]
            xl = _as_tensor(layers[sel][:, -n_max:], device)
            xa = _as_tensor(avgpool[sel], device) if avgpool is not None else None
            y = torch.from_numpy(labels[sel]).to(device)
            for v in range(len(self.variants)):
                hits[v] += _topk_correct(self.logits(v, xl, xa).transpose(0, 1), y, 1)
        return hits.cpu().numpy()


def _grid_variants(n_blocks, avgpool, avail_blocks: int, has_avg: bool, notes: list[str]):
    """The (n, avgpool) input variants the features can feed; what they cannot goes to ``notes``."""
    pools = list(dict.fromkeys(bool(a) for a in avgpool))
    if True in pools and not has_avg:
        pools.remove(True)
        notes.append("skipped avgpool: the features have no avgpool.npy (embed with --avgpool)")
    variants = []
    for n in dict.fromkeys(int(n) for n in n_blocks):
        if n < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n}")
        if n > avail_blocks:
            notes.append(
                f"skipped n={n}: the features hold the CLS tokens of {avail_blocks} "
                f"block(s) (embed with --layers {n})"
            )
            continue
        variants += [(n, a) for a in pools]
    if not variants:
        raise ValueError(
            "no head of the grid can be trained on these features: " + "; ".join(notes)
        )
    return variants


def _blocks(f):
    """(N, L, D) CLS tokens of the last L blocks; plain CLS embeddings count as one block."""
    layers = getattr(f, "layers", None)
    if layers is None and getattr(f, "cls", None) is not None:
        layers = np.asarray(f.cls)[:, None, :]
    if layers is None:
        raise ValueError("the features have neither layers nor cls embeddings")
    return layers


def train_linear_grid(
    train,
    test,
    *,
    n_blocks: Sequence[int] = N_BLOCKS,
    avgpool: Sequence[bool] = (False, True),
    lrs: Sequence[float] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    iterations: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    progress: bool = False,
) -> LinearResult:
    """Train the grid (``n_blocks`` x ``avgpool`` x ``lrs``) on ``train`` and report on ``test``.

    ``train``/``test``: objects with ``labels`` (N,) int and ``layers`` (N, L, D) and/or ``cls``
    (N, D) and optionally ``avgpool`` (N, D) -- a ``vssl.evaluate.features.Features``. One block
    falls back to ``cls`` without ``layers``; configs the features cannot feed (n > L, avgpool
    absent) are skipped and listed in ``notes``. ``lrs`` are DINOv2's unscaled rates (default
    ``DINOV2_LRS``), multiplied by (batch size used) / 256; the batch is cut to the number of
    training rows when they are fewer. The cosine schedule runs over ``iterations`` steps
    (default ``epochs`` passes over the training rows). A stratified, seeded ``val_fraction``
    of ``train`` picks the head and is never trained on.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    lrs = tuple(dict.fromkeys(float(lr) for lr in (DINOV2_LRS if lrs is None else lrs)))
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"learning rates must be positive numbers, got {list(lrs)}")
    if batch_size < 1 or epochs < 1 or (iterations is not None and iterations < 1):
        raise ValueError("batch_size, epochs and iterations must be >= 1")
    for split, f in (("train", train), ("test", test)):
        if getattr(f, "labels", None) is None or len(f.labels) == 0:
            raise ValueError(
                f"the {split} features have no labels: a linear probe needs images "
                "in class subfolders (first-level folder name = label)"
            )
    tr_layers, te_layers = _blocks(train), _blocks(test)
    if tr_layers.shape[2] != te_layers.shape[2]:
        raise ValueError(
            f"train features are {tr_layers.shape[2]}-d, test features "
            f"{te_layers.shape[2]}-d: embed both splits with the same model"
        )
    has_avg = all(getattr(f, "avgpool", None) is not None for f in (train, test))
    notes: list[str] = []
    variants = _grid_variants(
        n_blocks, avgpool, min(tr_layers.shape[1], te_layers.shape[1]), has_avg, notes
    )
    tr_avg = np.asarray(train.avgpool) if has_avg else None
    te_avg = np.asarray(test.avgpool) if has_avg else None

    y_all = np.asarray(train.labels, dtype=np.int64)
    y_test = np.asarray(test.labels, dtype=np.int64)
    if num_classes is None:
        classes = getattr(train, "classes", None)
        num_classes = len(classes) if classes else int(max(y_all.max(), y_test.max())) + 1
    if min(y_all.min(), y_test.min()) < 0 or max(y_all.max(), y_test.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}); pass the train split's classes "
            "when loading the test split"
        )

    tr_idx, val_idx = stratified_split(y_all, val_fraction, seed)
    n_max = max(n for n, _ in variants)
    # The training features (only the blocks the grid uses) in memory, float32, on the device.
    layers_t = _as_tensor(tr_layers[:, -n_max:], device)
    avg_t = _as_tensor(tr_avg, device) if has_avg else None
    y_t = torch.from_numpy(y_all).to(device)
    tr_pos = torch.from_numpy(tr_idx).to(device)

    grid = _HeadGrid(variants, layers_t.shape[2], num_classes, lrs, seed=seed, device=device)
    bs = min(batch_size, len(tr_idx))
    base_lrs = torch.tensor([scale_lr(lr, bs) for lr in lrs], device=device)
    total = iterations if iterations is not None else epochs * max(1, len(tr_idx) // bs)

    from tqdm import tqdm

    # Confident heads drive softmax probabilities below float32's normal range, and denormal
    # arithmetic is 10-30x slower on x86 CPUs: flush them to zero while training (they are below
    # 1e-38, far from any gradient that matters). torch has no getter for this flag, so it goes
    # back to torch's default (off) afterwards.
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    bar = tqdm(
        total=total,
        unit="it",
        desc="linear",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for t, batch in enumerate(minibatches(len(tr_idx), bs, total, seed)):
            rows = tr_pos[torch.from_numpy(batch).to(device)]
            # cosine annealing to 0 over `total` steps, as CosineAnnealingLR(eta_min=0)
            lr_t = base_lrs * (0.5 * (1.0 + math.cos(math.pi * t / total)))
            grid.step(layers_t[rows], avg_t[rows] if avg_t is not None else None, y_t[rows], lr_t)
            bar.update(1)
    finally:
        bar.close()
        if flush:
            torch.set_flush_denormal(False)

    val_acc = grid.top1_correct(tr_layers, tr_avg, y_all, val_idx) / len(val_idx)
    heads = []
    for v, (n, a) in enumerate(variants):
        w = grid.weights[v].detach().cpu().numpy()
        b = grid.biases[v].detach().cpu().numpy()
        heads += [
            HeadResult(
                n,
                a,
                lr,
                scale_lr(lr, bs),
                float(val_acc[v, j]),
                np.ascontiguousarray(w[:, j]),
                b[j].copy(),
            )
            for j, lr in enumerate(lrs)
        ]
    # The first head with the best validation accuracy in grid order (DINOv2 keeps the first max).
    best = heads[int(np.argmax([h.val_top1 for h in heads]))]

    # Only the chosen head is reported on test.
    w_best = torch.from_numpy(best.weight).to(device)
    b_best = torch.from_numpy(best.bias).to(device)
    hits1 = hits5 = 0
    with torch.no_grad():
        for s in range(0, len(y_test), 4096):
            xl = _as_tensor(te_layers[s : s + 4096, -n_max:], device)
            xa = _as_tensor(te_avg[s : s + 4096], device) if te_avg is not None else None
            logits = linear_input(xl, xa, best.n_blocks, best.avgpool) @ w_best + b_best
            y = torch.from_numpy(y_test[s : s + 4096]).to(device)
            hits1 += int(_topk_correct(logits, y, 1))
            hits5 += int(_topk_correct(logits, y, 5))
    return LinearResult(
        heads=heads,
        best=best,
        test_top1=hits1 / len(y_test),
        test_top5=hits5 / len(y_test) if num_classes >= 5 else None,
        num_classes=num_classes,
        train_indices=tr_idx,
        val_indices=val_idx,
        iterations=total,
        batch_size=bs,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl embed dinov2-vitb14 --weights W.pth -i data/train -o feats/train --layers 4 --avgpool
  vssl embed dinov2-vitb14 --weights W.pth -i data/test -o feats/test --layers 4 --avgpool
  vssl eval linear --train feats/train --test feats/test
  vssl eval linear --model dinov2-vitb14 --weights W.pth --train data/train --test data/test

The grid is --n-blocks x avgpool (off, on) x --lrs; all heads train together in one pass over the
cached features. The head with the best accuracy on a stratified --val-fraction of --train is
reported on --test.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl eval linear``."""
    from .features import add_feature_args
    from .results import add_result_args

    p = subparsers.add_parser(
        "linear",
        help="DINOv2 linear-probe grid (blocks x avgpool x learning rates) in one pass",
        description="Train DINOv2's grid of linear heads on frozen features: the CLS tokens of the "
        "last 1 or 4 blocks, with or without the average of the last block's patch "
        "tokens, times a list of learning rates (scaled by batch size / 256); SGD, "
        "momentum 0.9, cosine schedule. Needs features from `vssl embed --layers 4 "
        "--avgpool` (or --model, which embeds them on the fly).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    add_feature_args(p)
    g = p.add_argument_group("linear probe")
    g.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"passes over the training rows (default {DEFAULT_EPOCHS})",
    )
    g.add_argument(
        "--iterations",
        type=int,
        default=None,
        metavar="N",
        help="SGD steps instead of --epochs (DINOv2 on ImageNet: 12500)",
    )
    g.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=list(DINOV2_LRS),
        metavar="LR",
        help="learning rates for a batch of 256 (default: DINOv2's 13, 1e-5 .. 0.1)",
    )
    g.add_argument(
        "--probe-batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"SGD mini-batch (default {DEFAULT_BATCH_SIZE}; --batch-size is the embedding batch)",
    )
    g.add_argument(
        "--n-blocks",
        type=int,
        nargs="+",
        default=list(N_BLOCKS),
        metavar="N",
        help="last blocks whose CLS tokens are concatenated (default 1 4)",
    )
    g.add_argument(
        "--avgpool",
        choices=("both", "on", "off"),
        default="both",
        help="heads with/without the patch-token average appended (default both)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="stratified share of --train held out to choose the head (default 0.1)",
    )
    g.add_argument("--seed", type=int, default=0, help="split, batches and init (default 0)")
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"vssl eval linear: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``vssl eval linear``: 0 on success, 2 on a user error (message on stderr)."""
    from pathlib import Path

    from .features import features_from_args
    from .results import format_table, record

    avg = {"both": (False, True), "on": (True,), "off": (False,)}[args.avgpool]
    n_max = max(args.n_blocks)
    need = {"layers": n_max if n_max > 1 else 0, "avgpool": True in avg}
    try:
        try:
            train = features_from_args(args, "train", **need).require(labels=True)
            test = features_from_args(args, "test", classes=train.classes, **need).require(
                labels=True
            )
        except ValueError as e:
            if "layers" in str(e) or "avgpool" in str(e):
                raise ValueError(f"{e}; or shrink the grid (--n-blocks 1, --avgpool off)") from None
            raise
        result = train_linear_grid(
            train,
            test,
            n_blocks=args.n_blocks,
            avgpool=avg,
            lrs=args.lrs,
            epochs=args.epochs,
            iterations=args.iterations,
            batch_size=args.probe_batch_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            device=args.device,
            num_classes=train.num_classes,
            progress=sys.stderr.isatty(),
        )
    except ValueError as e:
        return _error(str(e))

    print(
        f"linear: {len(result.train_indices)} train / {len(result.val_indices)} val / "
        f"{len(test)} test images, {result.num_classes} classes, {len(result.heads)} heads, "
        f"{result.iterations} iterations of batch {result.batch_size} "
        f"({result.seconds:.1f} s)"
    )
    # learning rates as text: the table's 4-decimal floats would print 1e-05 as 0.0000
    rows = [
        {
            "config": h.config,
            "lr": f"{h.lr:g}",
            "scaled_lr": f"{h.scaled_lr:.4g}",
            "val_top1": h.val_top1,
            "best": "*" if h is result.best else "",
        }
        for h in result.heads
    ]
    print(format_table(rows))
    for note in result.notes:
        print(f"note: {note}")
    b = result.best
    summary = {
        "config": b.config,
        "lr": f"{b.lr:g}",
        "val_top1": b.val_top1,
        "test_top1": result.test_top1,
    }
    metrics = {"linear_top1": result.test_top1}
    if result.test_top5 is not None:
        summary["test_top5"] = metrics["linear_top5"] = result.test_top5
    print()
    print(format_table([summary]), flush=True)
    record(
        args.results,
        protocol="linear",
        metrics=metrics,
        model=args.run_name or args.model or train.source,
        checkpoint=args.weights,
        dataset=args.dataset or Path(args.test).name,
        extra={
            "best_config": b.config,
            "best_n_blocks": b.n_blocks,
            "best_avgpool": b.avgpool,
            "best_lr": b.lr,
            "best_scaled_lr": b.scaled_lr,
            "val_top1": b.val_top1,
            "iterations": result.iterations,
            "batch_size": result.batch_size,
            "num_train": int(len(result.train_indices)),
            "num_val": int(len(result.val_indices)),
            "num_test": len(test),
            "num_classes": result.num_classes,
            "notes": result.notes,
            "train": train.source,
            "test": test.source,
        },
    )
    return 0
