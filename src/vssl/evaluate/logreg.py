"""``vssl eval logreg``: DINOv2's logistic-regression protocol on frozen CLS features.

``dinov2/eval/log_regression.py``: L2-regularized multinomial logistic regression solved with
L-BFGS (cuML there, float64, up to 1000 iterations) for each C in ``10 ** linspace(-6, 5, 45)``;
C is chosen on 10% of the training set, then the model is refit on all of it with that C and
reported on the test set (top-1, top-5).

The solver here is ``torch.optim.LBFGS`` on the objective of scikit-learn's
``LogisticRegression(penalty="l2", C=C)`` -- ``0.5 * ||W||^2 + C * sum_i log_loss_i`` with the
intercept not penalized, softmax over all classes (sigmoid with one weight vector for two
classes) -- divided by ``C * n`` so that the gradient tolerance reads like scikit-learn's. torch
rather than scikit-learn (which has no GPU path) or cuML (CUDA only), so that the same code runs
on a laptop and on a GPU with ImageNet-sized feature sets. The sweep visits C in increasing order
and starts each fit from the previous solution: the problem is strictly convex in W, so the
optimum is the same, reached in fewer iterations.

Other differences from DINOv2: the validation split is stratified by class (DINOv2 takes a random
10%), and a fit stops when the largest gradient entry is below ``tol`` (default 1e-6) or stops
improving, where DINOv2 asks cuML for 1e-12, i.e. in practice 1000 iterations.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["C_GRID", "LogReg", "LogRegResult", "add_parser", "fit_logreg", "run", "sweep_logreg"]

# dinov2/eval/log_regression.py: C_POWER_RANGE = linspace(-6, 5, 45), DEFAULT_MAX_ITER = 1000.
C_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))
DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-6
HISTORY = 10  # L-BFGS memory, scipy's (and so scikit-learn's) default


@dataclass
class LogReg:
    """A fitted model in scikit-learn's layout: ``coef`` (K, D) and ``intercept`` (K,), K = 1 for
    two classes (the logit of ``classes[1]``); ``classes`` are the label values of the columns."""

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    C: float
    n_iter: int
    converged: bool  # stopped on a tolerance, not on max_iter

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, dtype=self.coef.dtype) @ self.coef.T + self.intercept
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, len(classes)) probabilities."""
        z = self.decision_function(x)
        if z.ndim == 1:
            p1 = 1.0 / (1.0 + np.exp(-z))
            return np.stack([1.0 - p1, p1], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[self.predict_proba(x).argmax(axis=1)]


def _objective(x, y, w, b, C, binary):
    """scikit-learn's L2 logistic loss divided by C * n: mean log-loss + ||W||^2 / (2 C n)."""
    z = torch.addmm(b, x, w.T)
    if binary:
        data = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y)
    else:
        data = torch.nn.functional.cross_entropy(z, y)
    return data + (w * w).sum() / (2.0 * C * x.shape[0])


def fit_logreg(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray,
    C: float,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    init: LogReg | None = None,
) -> LogReg:
    """Fit L2 logistic regression with L-BFGS; the same minimizer as scikit-learn's
    ``LogisticRegression(C=C)``. Stops when the largest gradient entry of the scaled objective is
    ``<= tol``, the objective stops changing, or after ``max_iter`` iterations. ``init``: start
    from this solution (same classes and width), e.g. the previous C of a sweep."""
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a positive number, got {C}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    y = np.asarray(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"logistic regression needs at least 2 classes in the training labels, "
            f"got {len(classes)}"
        )
    device = torch.device(device)
    xt = (
        x.to(device, dtype)
        if isinstance(x, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(x)).to(device, dtype)
    )
    if xt.ndim != 2 or xt.shape[0] != len(y):
        raise ValueError(f"x must be (N, D) with N = len(y) = {len(y)}, got {tuple(xt.shape)}")
    binary = len(classes) == 2
    k = 1 if binary else len(classes)
    yt = torch.from_numpy(y_idx).to(device)
    yt = yt.to(dtype) if binary else yt.long()
    warm = init is not None and np.array_equal(init.classes, classes)
    if warm and init.coef.shape == (k, xt.shape[1]):
        w0, b0 = torch.from_numpy(init.coef), torch.from_numpy(init.intercept)
    else:
        w0, b0 = torch.zeros(k, xt.shape[1]), torch.zeros(k)
    w = w0.to(device, dtype).clone().requires_grad_()
    b = b0.to(device, dtype).clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=64 * torch.finfo(dtype).eps,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = _objective(xt, yt, w, b, C, binary)
        loss.backward()
        return loss

    opt.step(closure)
    n_iter = int(opt.state[w].get("n_iter", 0))
    closure()
    grad_max = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    with torch.no_grad():
        if not binary:  # the unpenalized intercept is defined up to a shift; keep it centred
            b -= b.mean()
    # Converged: the gradient test passed, or L-BFGS stopped on no progress before its cap.
    converged = grad_max <= tol or n_iter < max_iter
    return LogReg(
        coef=w.detach().cpu().numpy(),
        intercept=b.detach().cpu().numpy(),
        classes=classes,
        C=float(C),
        n_iter=n_iter,
        converged=converged,
    )


@dataclass
class LogRegResult:
    """The C sweep (validation accuracy per C), the refit model and its test accuracy (fractions
    in [0, 1])."""

    sweep: list[dict]  # {"C", "val_top1", "n_iter", "converged"} in increasing C
    best_C: float
    model: LogReg  # refit on train + val with best_C
    test_top1: float
    test_top5: float | None  # None with fewer than 5 classes
    num_classes: int
    train_indices: np.ndarray
    val_indices: np.ndarray
    seconds: float
    notes: list[str] = field(default_factory=list)


def _topk_accuracy(model: LogReg, x: np.ndarray, y: np.ndarray, k: int) -> float:
    proba = model.predict_proba(x)
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float((model.classes[top] == np.asarray(y)[:, None]).any(axis=1).mean())


def sweep_logreg(
    train,
    test,
    *,
    c_grid: Sequence[float] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    num_classes: int | None = None,
    progress: bool = False,
) -> LogRegResult:
    """DINOv2's protocol on ``train.cls``/``test.cls`` (N, D) with integer ``labels``: fit every C
    of ``c_grid`` (default ``C_GRID``) on the training rows, pick the first best validation top-1
    on a stratified ``val_fraction`` of ``train``, refit on all of ``train``, report on ``test``."""
    from .linear import stratified_split

    t0 = time.perf_counter()
    c_grid = sorted(float(c) for c in (C_GRID if c_grid is None else c_grid))
    if not c_grid or any(not (c > 0 and math.isfinite(c)) for c in c_grid):
        raise ValueError(f"the C grid must hold positive numbers, got {c_grid}")
    for split, f in (("train", train), ("test", test)):
        if getattr(f, "labels", None) is None:
            raise ValueError(
                f"the {split} features have no labels: logistic regression needs "
                "images in class subfolders (first-level folder name = label)"
            )
    x_all, y_all = np.asarray(train.cls), np.asarray(train.labels, dtype=np.int64)
    x_test, y_test = np.asarray(test.cls), np.asarray(test.labels, dtype=np.int64)
    if x_all.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"train features are {x_all.shape[1]}-d, test features "
            f"{x_test.shape[1]}-d: embed both with the same model"
        )
    if num_classes is None:
        classes = getattr(train, "classes", None)
        num_classes = len(classes) if classes else int(max(y_all.max(), y_test.max())) + 1
    notes = []
    missing = sorted(set(range(num_classes)) - set(np.unique(y_all).tolist()))
    if missing:
        notes.append(f"{len(missing)} class(es) have no training rows and are never predicted")

    tr_idx, val_idx = stratified_split(y_all, val_fraction, seed)
    x_tr = torch.from_numpy(np.ascontiguousarray(x_all[tr_idx])).to(device, dtype)
    sweep, prev, best = [], None, None
    from tqdm import tqdm

    for C in tqdm(c_grid, desc="logreg C", unit="C", disable=not progress, file=sys.stderr):
        prev = fit_logreg(
            x_tr,
            y_all[tr_idx],
            C,
            max_iter=max_iter,
            tol=tol,
            device=device,
            dtype=dtype,
            init=prev,
        )
        acc = float((prev.predict(x_all[val_idx]) == y_all[val_idx]).mean())
        sweep.append({"C": C, "val_top1": acc, "n_iter": prev.n_iter, "converged": prev.converged})
        if best is None or acc > best[0]:  # ties keep the first, i.e. the smaller C
            best = (acc, prev)
    best_C = best[1].C
    # The refit on train + val starts from the chosen fit (a warm start: same optimum, sooner).
    model = fit_logreg(
        x_all, y_all, best_C, max_iter=max_iter, tol=tol, device=device, dtype=dtype, init=best[1]
    )
    top1 = _topk_accuracy(model, x_test, y_test, 1)
    top5 = _topk_accuracy(model, x_test, y_test, 5) if num_classes >= 5 else None
    if not all(s["converged"] for s in sweep) or not model.converged:
        notes.append(f"some fits stopped at --max-iter {max_iter} before converging")
    return LogRegResult(
        sweep=sweep,
        best_C=best_C,
        model=model,
        test_top1=top1,
        test_top5=top5,
        num_classes=num_classes,
        train_indices=tr_idx,
        val_indices=val_idx,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl eval logreg --train feats/train --test feats/test
  vssl eval logreg --model dinov2-vits14 --weights W.pth --train data/train --test data/test \\
      --device cuda --c-grid 0.01 0.1 1 10

C is chosen on a stratified --val-fraction of --train (default: DINOv2's 45 values
10^-6 .. 10^5), then the model is refit on all of --train and reported on --test.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl eval logreg``."""
    from .features import add_feature_args
    from .results import add_result_args

    p = subparsers.add_parser(
        "logreg",
        help="L-BFGS logistic regression with a sweep over the regularization C",
        description="DINOv2's logistic-regression evaluation: L2-regularized multinomial "
        "logistic regression on the CLS embeddings, solved with L-BFGS (same "
        "objective as scikit-learn's LogisticRegression), for each C of a grid; the "
        "best C on a validation split of --train is refit on all of --train and "
        "reported on --test. Runs on --device (a GPU helps for large sets).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    add_feature_args(p)
    g = p.add_argument_group("logistic regression")
    g.add_argument(
        "--c-grid",
        type=float,
        nargs="+",
        default=None,
        metavar="C",
        help="inverse regularization strengths (default: DINOv2's 45 values "
        "10**linspace(-6, 5, 45))",
    )
    g.add_argument(
        "--max-iter",
        type=int,
        default=DEFAULT_MAX_ITER,
        metavar="N",
        help=f"L-BFGS iterations per fit (default {DEFAULT_MAX_ITER})",
    )
    g.add_argument(
        "--tol",
        type=float,
        default=DEFAULT_TOL,
        help="stop when the largest gradient entry of the mean loss is below this "
        f"(default {DEFAULT_TOL:g})",
    )
    g.add_argument(
        "--solver-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="solver precision (default float64, as DINOv2)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="stratified share of --train held out to choose C (default 0.1)",
    )
    g.add_argument("--seed", type=int, default=0, help="validation split seed (default 0)")
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"vssl eval logreg: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``vssl eval logreg``: 0 on success, 2 on a user error (message on stderr)."""
    from pathlib import Path

    from .features import features_from_args
    from .results import format_table, record

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.solver_dtype]
    try:
        if args.max_iter < 1 or not args.tol > 0:
            raise ValueError(
                f"--max-iter must be >= 1 and --tol > 0, got {args.max_iter}, {args.tol}"
            )
        train = features_from_args(args, "train").require(labels=True)
        test = features_from_args(args, "test", classes=train.classes).require(labels=True)
        result = sweep_logreg(
            train,
            test,
            c_grid=args.c_grid,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_iter=args.max_iter,
            tol=args.tol,
            device=args.device,
            dtype=dtype,
            num_classes=train.num_classes,
            progress=sys.stderr.isatty(),
        )
    except ValueError as e:
        return _error(str(e))

    print(
        f"logreg: {len(result.train_indices)} train / {len(result.val_indices)} val / "
        f"{len(test)} test images, {result.num_classes} classes, {len(result.sweep)} values of "
        f"C ({result.seconds:.1f} s)"
    )
    # C as text: the table's 4-decimal floats would print 1e-06 as 0.0000
    rows = [
        {
            "C": f"{s['C']:.3g}",
            "val_top1": s["val_top1"],
            "iterations": s["n_iter"],
            "best": "*" if s["C"] == result.best_C else "",
        }
        for s in result.sweep
    ]
    print(format_table(rows))
    for note in result.notes:
        print(f"note: {note}")
    summary = {"C": f"{result.best_C:.3g}", "test_top1": result.test_top1}
    metrics = {"logreg_top1": result.test_top1}
    if result.test_top5 is not None:
        summary["test_top5"] = metrics["logreg_top5"] = result.test_top5
    print()
    print(format_table([summary]), flush=True)
    record(
        args.results,
        protocol="logreg",
        metrics=metrics,
        model=args.run_name or args.model or train.source,
        checkpoint=args.weights,
        dataset=args.dataset or Path(args.test).name,
        extra={
            "best_C": result.best_C,
            "val_top1": max(s["val_top1"] for s in result.sweep),
            "max_iter": args.max_iter,
            "tol": args.tol,
            "num_train": len(train),
            "num_test": len(test),
            "num_classes": result.num_classes,
            "notes": result.notes,
            "train": train.source,
            "test": test.source,
        },
    )
    return 0
