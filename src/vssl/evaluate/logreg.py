"""``vssl eval logreg``: DINOv2's logistic-regression protocol on frozen CLS features.

``dinov2/eval/log_regression.py``: L2-regularized multinomial logistic regression solved with
L-BFGS (cuML there, float64, up to 1000 iterations) for each C in ``10 ** linspace(-6, 5, 45)``;
C is chosen on 10% of the training set, then the model is refit on all of it with that C and
reported on the test set (top-1, top-5).

The solver here is L-BFGS, written in torch, on the objective of scikit-learn's
``LogisticRegression(penalty="l2", C=C)`` -- ``0.5 * ||W||^2 + C * sum_i log_loss_i`` with the
intercept not penalized, softmax over all classes (sigmoid with one weight vector for two
classes) -- divided by ``C * n`` so that the gradient tolerance reads like scikit-learn's. torch
rather than scikit-learn (which has no GPU path) or cuML (CUDA only), so that the same code runs
on a laptop and on a GPU with ImageNet-sized feature sets. What makes the 45-value sweep take
seconds rather than minutes (issue 16: 510 s for 900 x 192 features before):

- the objective and its gradient in closed form, one GEMM each way, no autograd;
- the features centred inside the solver (an exact reparametrization: the intercept absorbs the
  mean), and L-BFGS's initial inverse Hessian from the feature covariance and the penalty,
  ``(a Cov(x) + I / (C n))^-1``, so that correlated, unevenly scaled embeddings converge like
  whitened ones;
- the sweep visits C in increasing order; each fit starts from the previous solution, or from
  the path extrapolated through the previous two (whichever has the lower objective), and keeps
  L-BFGS's curvature pairs (exact for the new C after a shift: only the quadratic penalty
  changes). The problem is strictly convex in W, so each C's optimum is the same as from a cold
  start, reached in fewer iterations;
- a progress bar (stderr) with one update per C: its value, iterations, validation top-1.

Other differences from DINOv2: the validation split is stratified by class (DINOv2 takes a random
10%), and a fit stops when the largest gradient entry is below ``tol`` (default 1e-6, 100x
tighter than scikit-learn's default) or stops improving, where DINOv2 asks cuML for 1e-12, i.e.
in practice 1000 iterations.
"""

from __future__ import annotations

import argparse
import contextlib
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
# Below this many multiply-adds per GEMM (N x (D + 1) x K) a CPU solve runs on one thread: the ops
# are too small to gain from more, and on a busy machine each op's OpenMP hand-off waits for a
# descheduled thread (measured: a 900 x 192 sweep ~50x slower on 2 threads of a loaded 2-core box).
SINGLE_THREAD_WORK = 100_000_000


@contextlib.contextmanager
def _cpu_threads(device, work: int):
    if torch.device(device).type != "cpu" or work >= SINGLE_THREAD_WORK:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


class _Memory:
    """L-BFGS curvature pairs ``(s, y)`` carried from one C of a sweep to the next. Only the
    penalty depends on C, and it is quadratic, so a pair stays an exact secant pair of the new
    objective once ``y`` gains ``(lam_new - lam_old) * s`` on the penalized entries."""

    def __init__(self):
        self.s: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.rho: list[float] = []
        self.lam = None  # the penalty weight 1 / (C n) the pairs were taken at

    def push(self, s: torch.Tensor, y: torch.Tensor, sy: float) -> None:
        if len(self.s) == HISTORY:
            del self.s[0], self.y[0], self.rho[0]
        self.s.append(s)
        self.y.append(y)
        self.rho.append(1.0 / sy)

    def retarget(self, lam: float, mask: torch.Tensor) -> None:
        if self.lam is not None and lam != self.lam:
            pairs = [(s, y.add(s * mask, alpha=lam - self.lam)) for s, y in zip(self.s, self.y)]
            self.s, self.y, self.rho = [], [], []
            for s, y in pairs:
                sy = float((s * y).sum())
                if sy > 0:
                    self.push(s, y, sy)
        self.lam = lam

    def gamma(self, h0) -> float:
        """Scale of the initial matrix ``h0`` from the newest pair (1 without pairs)."""
        if not self.s:
            return 1.0
        y = self.y[-1]
        return (1.0 / self.rho[-1]) / float((y * h0(y)).sum())

    def direction(self, g: torch.Tensor, h0) -> torch.Tensor:
        """``-H g`` by the two-loop recursion, ``H0 = gamma * h0`` (``h0``: a function that
        applies a fixed symmetric positive-definite matrix)."""
        q = g.clone()
        qf = q.view(-1)
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
            a = rho * float(torch.dot(s.view(-1), qf))
            q.sub_(y, alpha=a)
            alphas.append(a)
        q = h0(q).mul_(self.gamma(h0))
        qf = q.view(-1)
        for s, y, rho, a in zip(self.s, self.y, self.rho, reversed(alphas)):
            q.add_(s, alpha=a - rho * float(torch.dot(y.view(-1), qf)))
        return q.neg_()


class _Problem:
    """One training set on the solver's device, ready for many fits (one per C).

    The features are centred inside the solver: ``z = W x + b = W (x - mu) + (b + W mu)``, and the
    intercept is not penalized, so fitting ``(W, b + W mu)`` on centred rows is the same problem
    (same W, same objective value) with the intercept decoupled from the mean feature offset
    (CLS embeddings often have large offsets, which makes the raw problem ill-conditioned).
    The intercept is a column of ones appended to the rows, so one GEMM gives all logits.
    Parameters are ``theta`` (K, D + 1): ``[W, b + W mu]``.
    """

    def __init__(self, x, y, device, dtype):
        y = np.asarray(y)
        self.classes, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes) < 2:
            raise ValueError(
                f"logistic regression needs at least 2 classes in the training labels, "
                f"got {len(self.classes)}"
            )
        device = torch.device(device)
        xt = (
            x.to(device, dtype)
            if isinstance(x, torch.Tensor)
            else torch.from_numpy(np.ascontiguousarray(x)).to(device, dtype)
        )
        if xt.ndim != 2 or xt.shape[0] != len(y):
            raise ValueError(f"x must be (N, D) with N = len(y) = {len(y)}, got {tuple(xt.shape)}")
        self.n, self.d = xt.shape
        self.binary = len(self.classes) == 2
        self.k = 1 if self.binary else len(self.classes)
        self.mu = xt.mean(0)
        xa = torch.empty(self.n, self.d + 1, device=device, dtype=dtype)
        torch.sub(xt, self.mu, out=xa[:, : self.d])
        xa[:, self.d] = 1.0
        self.xa = xa
        # eigenvectors of the feature covariance, for the preconditioner
        xc = xa[:, : self.d]
        evals, self.evecs = torch.linalg.eigh(xc.T @ xc / self.n)
        self.evals = evals.clamp_min(0.0)
        yt = torch.from_numpy(y_idx.astype(np.int64)).to(device)
        self.y = yt.to(dtype)[None, :] if self.binary else yt
        # flat positions of the true class in the (K, N) logits
        self.y_flat = yt * self.n + torch.arange(self.n, device=device)
        self.mask = torch.ones(1, self.d + 1, device=device, dtype=dtype)
        self.mask[0, self.d] = 0.0  # the intercept is not penalized

    def zeros(self) -> torch.Tensor:
        return self.xa.new_zeros(self.k, self.d + 1)

    def to_theta(self, coef: np.ndarray, intercept: np.ndarray) -> torch.Tensor:
        """(K, D + 1) solver parameters from scikit-learn's layout."""
        w = torch.from_numpy(np.asarray(coef)).to(self.xa)
        b = torch.from_numpy(np.asarray(intercept)).to(self.xa)
        return torch.cat([w, (b + w @ self.mu)[:, None]], dim=1)

    def from_theta(self, theta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        w, b = theta[:, : self.d], theta[:, self.d]
        b = b - w @ self.mu
        if not self.binary:  # the unpenalized intercept is defined up to a shift; keep it centred
            b = b - b.mean()
        return w.cpu().numpy().copy(), b.cpu().numpy().copy()

    def value_grad(self, theta: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
        """scikit-learn's L2 logistic loss divided by C * n, ``lam = 1 / (C n)``: mean log-loss +
        ``lam / 2 * ||W||^2``, and its gradient, in closed form (no autograd). Logits are laid
        out (K, N), the faster GEMM shape for few classes."""
        z = theta @ self.xa.T  # (K, N)
        if self.binary:  # log(1 + e^z) - y z;  d/dz = sigmoid(z) - y
            loss = (torch.nn.functional.softplus(z) - self.y * z).mean()
            r = torch.sigmoid(z).sub_(self.y)
        else:  # logsumexp(z) - z_y;  d/dz = softmax(z) - onehot(y)
            zmax = z.amax(dim=0, keepdim=True)
            r = torch.sub(z, zmax).exp_()
            norm = r.sum(dim=0, keepdim=True)
            r.div_(norm)
            lse = norm.log_().add_(zmax)
            loss = lse.mean() - z.view(-1)[self.y_flat].mean()
            r.view(-1)[self.y_flat] -= 1.0
        wm = theta * self.mask
        grad = torch.addmm(wm, r, self.xa, beta=lam, alpha=1.0 / self.n)
        return float(loss + (0.5 * lam) * wm.square().sum()), grad

    def grad_max(self, grad: torch.Tensor) -> float:
        """Largest entry of the gradient in scikit-learn's parameters (W, b): the intercept's
        gradient is the same, W's gains ``grad_b * mu``."""
        gb = grad[:, self.d :]
        return max(float((grad[:, : self.d] + gb * self.mu).abs().max()), float(gb.abs().max()))

    def precond(self, lam: float):
        """L-BFGS's initial inverse Hessian (up to a scalar), as a function: at uniform
        probabilities the data term's Hessian for one class's weights is ``a * Cov(x)`` with
        ``a = p (1 - p)``, the penalty adds ``lam * I``, and (features centred) the intercept's is
        ``a``. ``(a Cov + lam I)^-1`` from the covariance's eigenvectors: two (K, D) x (D, D)
        products per iteration, small beside the data GEMMs, and it makes correlated, unevenly
        scaled features (embeddings are both) as easy as whitened ones."""
        a = 0.25 if self.binary else (1.0 / self.k) * (1.0 - 1.0 / self.k)
        u, inv = self.evecs, 1.0 / (a * self.evals + lam)
        d = self.d

        def apply(v: torch.Tensor) -> torch.Tensor:
            w = ((v[:, :d] @ u) * inv) @ u.T
            return torch.cat([w, v[:, d:] / a], dim=1)

        return apply

    def solve(
        self,
        theta: torch.Tensor,
        C: float,
        max_iter: int,
        tol: float,
        memory: _Memory | None = None,
        fg: tuple[float, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, int, bool]:
        """L-BFGS from ``theta`` (history ``HISTORY``, diagonal initial matrix, backtracking Armijo
        line search: the objective is strictly convex in W, so every step gives a positive-
        curvature pair). ``memory``: curvature pairs of a previous C, updated in place; ``fg``:
        the objective and gradient at ``theta`` when known. Returns ``(theta, n_iter, converged)``."""
        lam = 1.0 / (C * self.n)
        mem = _Memory() if memory is None else memory
        mem.retarget(lam, self.mask)
        h0 = self.precond(lam)
        f, g = self.value_grad(theta, lam) if fg is None else fg
        if self.grad_max(g) <= tol:
            return theta, 0, True
        ftol = 64 * torch.finfo(theta.dtype).eps
        for it in range(1, max_iter + 1):
            d = mem.direction(g, h0)
            gtd = float((g * d).sum())
            if not gtd < 0:  # not a descent direction (rounding): restart from the gradient
                mem.s, mem.y, mem.rho = [], [], []
                d = -h0(g)
                gtd = float((g * d).sum())
            t = 1.0
            for _ in range(60):  # backtracking: Armijo (c1 = 1e-4), quadratic interpolation
                theta_new = theta + t * d
                f_new, g_new = self.value_grad(theta_new, lam)
                if math.isfinite(f_new) and f_new <= f + 1e-4 * t * gtd:
                    break
                if math.isfinite(f_new):
                    t_q = -gtd * t * t / (2.0 * (f_new - f - gtd * t))
                    t = min(max(t_q, 0.1 * t), 0.5 * t)
                else:
                    t *= 0.1
            else:  # no decrease along d: the objective is flat to rounding here
                return theta, it - 1, True
            s, y = theta_new - theta, g_new - g
            sy = float((s * y).sum())
            if sy > 1e-12 * float((s * s).sum()):  # convex: sy > 0 except for rounding
                mem.push(s, y, sy)
            f_old, theta, f, g = f, theta_new, f_new, g_new
            if self.grad_max(g) <= tol:
                return theta, it, True
            if f_old - f <= ftol * max(abs(f_old), abs(f), 1.0):
                return theta, it, it < max_iter  # no more progress in floating point
        return theta, max_iter, False


def _check_fit_args(C: float, max_iter: int) -> None:
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a positive number, got {C}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


def _fit(
    prob: _Problem,
    C: float,
    max_iter: int,
    tol: float,
    init: LogReg | None = None,
    theta: torch.Tensor | None = None,
    memory: _Memory | None = None,
    fg: tuple[float, torch.Tensor] | None = None,
) -> tuple[LogReg, torch.Tensor]:
    """Solve from ``theta`` (solver parameters), else from ``init`` when it has the same classes
    and width, else from zero; returns the model and its solver parameters."""
    if theta is None:
        if (
            init is not None
            and np.array_equal(init.classes, prob.classes)
            and init.coef.shape == (prob.k, prob.d)
        ):
            theta = prob.to_theta(init.coef, init.intercept)
        else:
            theta = prob.zeros()
    theta, n_iter, converged = prob.solve(theta, C, max_iter, tol, memory, fg)
    coef, intercept = prob.from_theta(theta)
    model = LogReg(
        coef=coef,
        intercept=intercept,
        classes=prob.classes,
        C=float(C),
        n_iter=n_iter,
        converged=converged,
    )
    return model, theta


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
    _check_fit_args(C, max_iter)
    with _cpu_threads(device, int(np.prod(np.shape(x))) * len(np.unique(y))):
        return _fit(_Problem(x, y, device, dtype), C, max_iter, tol, init)[0]


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


def _path_start(prob: _Problem, c_grid: list[float], thetas: list, j: int):
    """Where the fit at ``c_grid[j]`` starts, with its objective and gradient: the previous C's
    solution, or the line through the previous two solutions extended in log C (a first-order
    predictor along the regularization path) when that is lower. Along DINOv2's grid it cuts the
    sweep's L-BFGS iterations about threefold; the optimum of each C is unchanged."""
    lam = 1.0 / (c_grid[j] * prob.n)
    if not thetas:
        theta = prob.zeros()
        return (theta, *prob.value_grad(theta, lam))
    start = (thetas[-1], *prob.value_grad(thetas[-1], lam))
    if len(thetas) >= 2:
        r = math.log(c_grid[j] / c_grid[j - 1]) / math.log(c_grid[j - 1] / c_grid[j - 2])
        guess = thetas[-1] + r * (thetas[-1] - thetas[-2])
        f, g = prob.value_grad(guess, lam)
        if f < start[1]:
            start = (guess, f, g)
    return start


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
    _check_fit_args(c_grid[0], max_iter)
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
    prob = _Problem(x_all[tr_idx], y_all[tr_idx], device, dtype)
    x_val = torch.from_numpy(np.ascontiguousarray(x_all[val_idx])).to(prob.xa)
    y_val = y_all[val_idx]
    sweep, prev, best = [], None, None
    from tqdm import tqdm

    # Confident fits at large C drive probabilities into float64's denormal range, where x86
    # arithmetic is 10-30x slower: flush them to zero (torch has no getter: reset to its default).
    flush = prob.xa.device.type == "cpu" and torch.set_flush_denormal(True)
    threads = _cpu_threads(device, prob.n * (prob.d + 1) * prob.k)
    threads.__enter__()
    bar = tqdm(
        total=len(c_grid) + 1,
        desc="logreg",
        unit="fit",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0,  # every C shows (46 updates)
    )
    try:
        thetas, mem = [], _Memory()
        for C in c_grid:
            theta, f, g = _path_start(prob, c_grid, thetas, len(thetas))
            prev, theta = _fit(prob, C, max_iter, tol, theta=theta, memory=mem, fg=(f, g))
            thetas.append(theta)
            z = x_val @ torch.from_numpy(prev.coef).to(x_val).T + torch.from_numpy(
                prev.intercept
            ).to(x_val)
            idx = (z[:, 0] > 0).long() if prob.binary else z.argmax(dim=1)
            acc = float((prob.classes[idx.cpu().numpy()] == y_val).mean())
            sweep.append(
                {"C": C, "val_top1": acc, "n_iter": prev.n_iter, "converged": prev.converged}
            )
            if best is None or acc > best[0]:  # ties keep the first, i.e. the smaller C
                best = (acc, prev)
            bar.set_postfix_str(f"C={C:.3g} iters={prev.n_iter} val_top1={acc:.4f}", refresh=False)
            bar.update(1)
        best_C = best[1].C
        prob = thetas = mem = None  # free the training copy before the refit builds its own
        bar.set_postfix_str(f"refit on train+val, C={best_C:.3g}")
        # The refit on train + val starts from the chosen fit (a warm start: same optimum, sooner).
        model, _ = _fit(_Problem(x_all, y_all, device, dtype), best_C, max_iter, tol, init=best[1])
        bar.update(1)
    finally:
        bar.close()
        threads.__exit__(None, None, None)
        if flush:
            torch.set_flush_denormal(False)
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
            progress=True,  # one update per C: readable in a log file too
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
