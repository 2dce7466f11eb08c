"""k-nearest-neighbour classification on frozen features, DINOv2's protocol, and `vssl eval knn`.

The protocol (``dinov2/eval/knn.py``): L2-normalize the CLS features, take each test image's
``max(ks)`` most cosine-similar training images, turn their similarities into weights with a
softmax at temperature T (0.07) over those ``max(ks)`` neighbours, and for each k sum the weights
of the first k neighbours per class; the class with the largest sum is the prediction (top-1), the
five largest are the top-5 (reported with >= 5 classes). Because the softmax normalizer is shared
by all classes of a row, this ranks classes exactly as ``sum exp(sim / T)`` over the k neighbours.
Ties between class scores go to the lower class index.

Neighbour search on CPU is faiss's exact search (``vssl/neighbors.py``: ``faiss.knn``, blocked
GEMMs with heap selection inside the loop); the torch version it replaced spent its extra time in
``torch.topk`` over each 65 536-column block and was 1.6x slower at 100k x 100k x 768, k=200
(BENCHMARKS.md). Features on a GPU (the training-time monitor) keep a torch search blocked over
test and training rows with a running top-k merge, so memory stays bounded there too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_KS", "KNNResult", "add_parser", "knn_classify", "run"]

DEFAULT_KS = (10, 20, 100, 200)


@dataclass
class KNNResult:
    """Accuracies (fractions in [0, 1]) and predictions for each k."""

    ks: list[int]  # the k used, ascending (clipped to the training set size)
    top1: dict[int, float] | None  # None without test labels
    top5: dict[int, float] | None  # None without test labels or with fewer than 5 classes
    predictions: dict[int, np.ndarray]  # (N_test,) int64 predicted class per k
    num_classes: int
    temperature: float
    num_train: int
    num_test: int
    clipped: list[int] = field(default_factory=list)  # requested k larger than the training set

    def metrics(self) -> dict[str, float]:
        """``{"knn_top1@k": ..., "knn_top5@k": ...}`` for the results file."""
        out: dict[str, float] = {}
        for k in self.ks:
            if self.top1 is not None:
                out[f"knn_top1@{k}"] = self.top1[k]
            if self.top5 is not None:
                out[f"knn_top5@{k}"] = self.top5[k]
        return out

    def rows(self) -> list[dict]:
        """One table row per k: ``{"k", "top1", "top5"}``."""
        return [
            {
                "k": k,
                "top1": None if self.top1 is None else self.top1[k],
                "top5": None if self.top5 is None else self.top5[k],
            }
            for k in self.ks
        ]


def _as_matrix(x, name: str, device):
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t).all(dim=1)).nonzero()[:5, 0].tolist()
        raise ValueError(f"{name} contains NaN or inf (rows {bad}...): the features are broken")
    return t


def _as_labels(y, n: int, name: str, device):
    import torch

    t = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    if t.shape != (n,) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(
            f"{name} must be ({n},) integer class indices, got shape {tuple(t.shape)} {t.dtype}"
        )
    return t.to(device=device, dtype=torch.int64)


def _topk_blocked(query, train, k: int, block: int):
    """Top-``k`` similarities (descending) and indices of ``query`` rows among ``train`` rows,
    one ``len(query) x block`` similarity block at a time, merging a running top-k."""
    best_v = best_i = None
    for start in range(0, train.shape[0], block):
        sim = query @ train[start : start + block].T
        v, i = sim.topk(min(k, sim.shape[1]), dim=1)
        i += start
        if best_v is not None:
            v, j = _cat(best_v, v).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
            i = _cat(best_i, i).gather(1, j)
        best_v, best_i = v, i
    return best_v, best_i


def _cat(a, b):
    import torch

    return torch.cat((a, b), dim=1)


def knn_classify(
    train_feats,
    train_labels,
    test_feats,
    test_labels=None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: str = "cpu",
    batch_size: int = 1024,
    train_block: int = 65536,
) -> KNNResult:
    """DINOv2's weighted kNN classifier (see the module docstring) for every k in ``ks``.

    Features are (N, D) numpy arrays or torch tensors (not modified; normalized copies are made),
    labels integer class indices. ``num_classes`` defaults to the largest label + 1. A k larger
    than the training set is clipped to it with a warning. ``batch_size`` test rows and
    ``train_block`` training rows bound the similarity block held at once (default 256 MB).
    Without ``test_labels`` only the predictions are returned.
    """
    import torch
    import torch.nn.functional as F

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1 or train_block < 1:
        raise ValueError("batch_size and train_block must be >= 1")
    with torch.inference_mode():
        train = _as_matrix(train_feats, "train features", device)
        test = _as_matrix(test_feats, "test features", device)
        if train.shape[1] != test.shape[1]:
            raise ValueError(
                f"train features have width {train.shape[1]}, test features "
                f"{test.shape[1]}: they come from different models or layers"
            )
        n_train, n_test = train.shape[0], test.shape[0]
        ytrain = _as_labels(train_labels, n_train, "train labels", device)
        ytest = (
            None if test_labels is None else _as_labels(test_labels, n_test, "test labels", device)
        )
        top_label = max(int(ytrain.max()), -1 if ytest is None else int(ytest.max()))
        low = min(int(ytrain.min()), 0 if ytest is None else int(ytest.min()))
        if num_classes is None:
            num_classes = top_label + 1
        if low < 0 or top_label >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), found {low}..{top_label}")

        clipped = [k for k in ks if k > n_train]
        if clipped:
            warnings.warn(
                f"k={', '.join(map(str, clipped))} exceeds the {n_train} training "
                f"images: using k={n_train} instead",
                stacklevel=2,
            )
            ks = sorted({min(k, n_train) for k in ks})
        max_k = ks[-1]

        train = F.normalize(train, dim=1)
        preds = {k: [] for k in ks}
        hits1 = {k: 0 for k in ks}
        hits5 = {k: 0 for k in ks}
        with_top5 = num_classes >= 5
        on_cpu = train.device.type == "cpu"
        if on_cpu:  # faiss: one exact search of all test rows (vssl/neighbors.py)
            from ..neighbors import exact_knn

            all_sims, all_idx = exact_knn(F.normalize(test, dim=1).numpy(), train.numpy(), max_k)
            all_sims, all_idx = torch.from_numpy(all_sims), torch.from_numpy(all_idx)
        for start in range(0, n_test, batch_size):
            q = F.normalize(test[start : start + batch_size], dim=1)
            if on_cpu:
                sims = all_sims[start : start + batch_size]
                idx = all_idx[start : start + batch_size]
            else:
                sims, idx = _topk_blocked(q, train, max_k, train_block)
            weights = (sims / temperature).softmax(dim=1)  # over the max_k neighbours, as DINOv2
            neighbour_labels = ytrain[idx]
            for k in ks:
                scores = torch.zeros(q.shape[0], num_classes, device=q.device)
                scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
                # a stable sort keeps tied classes in index order (torch.topk's tie order is
                # unspecified), so results are reproducible
                order = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]
                preds[k].append(order[:, 0])
                if ytest is not None:
                    y = ytest[start : start + batch_size, None]
                    hits1[k] += int((order[:, :1] == y).sum())
                    if with_top5:
                        hits5[k] += int((order == y).any(dim=1).sum())
        predictions = {k: torch.cat(p).cpu().numpy() for k, p in preds.items()}
    return KNNResult(
        ks=ks,
        top1=None if ytest is None else {k: hits1[k] / n_test for k in ks},
        top5=None if ytest is None or not with_top5 else {k: hits5[k] / n_test for k in ks},
        predictions=predictions,
        num_classes=num_classes,
        temperature=float(temperature),
        num_train=n_train,
        num_test=n_test,
        clipped=clipped,
    )


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl embed dinov2-vitb14 --weights dinov2_vitb14.pth --input data/train --output feats/train
  vssl embed dinov2-vitb14 --weights dinov2_vitb14.pth --input data/val --output feats/val
  vssl eval knn --train feats/train --test feats/val
  vssl eval knn --model dinov2-vitb14 --weights dinov2_vitb14.pth \\
      --train data/train --test data/val --k 20         # embeds on the fly, cached

Labels are the class subfolders the images were embedded from (DIR/<class>/<image>); the test
split must use the training split's class names. Accuracies are fractions in [0, 1].
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl eval knn``."""
    from .features import add_feature_args
    from .results import add_result_args

    p = subparsers.add_parser(
        "knn",
        help="k-nearest-neighbour classification on frozen features (DINOv2 protocol)",
        description="Weighted kNN classification with DINOv2's protocol: cosine similarity of\n"
        "L2-normalized CLS features; the k nearest training images vote with weights\n"
        "softmax(similarity / T). Prints top-1 / top-5 accuracy per k.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_KS),
        metavar="K",
        help="numbers of neighbours (default: 10 20 100 200)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.07,
        metavar="T",
        help="softmax temperature of the votes (default 0.07)",
    )
    add_feature_args(p)
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"vssl eval knn: error: {msg}", file=sys.stderr, flush=True)
    return 2


def run(args: argparse.Namespace) -> int:
    """``vssl eval knn``: 0 on success, 2 on a user error (message on stderr)."""
    from .features import features_from_args
    from .results import format_table, record

    if any(k < 1 for k in args.k):
        return _fail(f"--k values must be >= 1, got {args.k}")
    if not args.temperature > 0:
        return _fail(f"--temperature must be > 0, got {args.temperature}")
    try:
        train = features_from_args(args, "train").require(labels=True)
        test = features_from_args(args, "test", classes=train.classes).require(labels=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = knn_classify(
                train.cls,
                train.labels,
                test.cls,
                test.labels,
                ks=args.k,
                temperature=args.temperature,
                num_classes=train.num_classes,
                device=args.device,
            )
    except ValueError as exc:
        return _fail(str(exc))
    for w in caught:
        print(f"vssl eval knn: warning: {w.message}", file=sys.stderr, flush=True)

    print(
        f"kNN: {result.num_train} train / {result.num_test} test images, "
        f"{result.num_classes} classes, T={result.temperature}"
    )
    print(format_table(result.rows(), ["k", "top1", "top5"]), flush=True)
    record(
        args.results,
        protocol="knn",
        metrics=result.metrics(),
        model=args.run_name or args.model or train.source,
        checkpoint=args.weights,
        dataset=args.dataset or Path(args.test).name,
        extra={
            "temperature": result.temperature,
            "ks": result.ks,
            "num_train": result.num_train,
            "num_test": result.num_test,
            "num_classes": result.num_classes,
            "train": train.source,
            "test": test.source,
        },
    )
    return 0
