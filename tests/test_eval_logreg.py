"""L-BFGS logistic regression against scikit-learn's LogisticRegression, the C sweep, and
`vssl eval logreg`."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402 - bundled with scikit-learn, no download
from sklearn.linear_model import LogisticRegression  # noqa: E402

import vssl  # noqa: E402
from vssl.embed import embed_images  # noqa: E402
from vssl.evaluate import logreg as logreg_mod  # noqa: E402
from vssl.evaluate.features import load_features  # noqa: E402
from vssl.evaluate.linear import stratified_split  # noqa: E402
from vssl.evaluate.logreg import C_GRID, fit_logreg, sweep_logreg  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small problems: one thread avoids OpenMP hand-offs that dominate on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """Real 8x8 handwritten digits (10 classes), scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def sklearn_objective(coef, intercept, x, y, C):
    """0.5 ||W||^2 + C * sum_i log-loss_i, scikit-learn's L2 objective (intercept unpenalized)."""
    z = x @ coef.T + intercept
    if coef.shape[0] == 1:  # binary: one logit for classes[1]
        s = np.where(y == np.unique(y)[1], 1.0, -1.0)
        loss = np.logaddexp(0.0, -s * z[:, 0]).sum()
    else:
        zmax = z.max(axis=1, keepdims=True)
        lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
        loss = (lse - z[np.arange(len(y)), np.searchsorted(np.unique(y), y)]).sum()
    return 0.5 * (coef**2).sum() + C * loss


def test_dinov2_c_grid():
    assert len(C_GRID) == 45
    assert C_GRID[0] == pytest.approx(1e-6) and C_GRID[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(C_GRID)), 11 / 44)


@pytest.mark.parametrize("C", [0.01, 0.2])
def test_matches_scikit_learn_multinomial(digits, C):
    x, y = digits
    xtr, ytr, xte = x[:300], y[:300], x[300:600]
    sk = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(xtr, ytr)
    m = fit_logreg(xtr, ytr, C, tol=1e-9, max_iter=3000)
    assert m.converged and np.array_equal(m.classes, sk.classes_)
    scale = np.abs(sk.coef_).max()
    np.testing.assert_allclose(m.coef, sk.coef_, atol=1e-5 * scale)
    np.testing.assert_allclose(m.intercept, sk.intercept_, atol=1e-4)
    np.testing.assert_allclose(m.predict_proba(xte), sk.predict_proba(xte), atol=1e-5)
    assert np.array_equal(m.predict(xte), sk.predict(xte))
    # the same objective, minimized at least as well as scikit-learn does
    ours = sklearn_objective(m.coef, m.intercept, xtr, ytr, C)
    theirs = sklearn_objective(sk.coef_, sk.intercept_, xtr, ytr, C)
    assert ours <= theirs * (1 + 1e-11)


def test_matches_scikit_learn_binary(digits):
    x, y = digits
    xtr, xte = x[:300], x[300:500]
    ytr = np.where(y[:300] == 3, 7, 2)  # two classes, arbitrary label values
    sk = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(xtr, ytr)
    m = fit_logreg(xtr, ytr, 0.5, tol=1e-9)
    assert m.coef.shape == sk.coef_.shape == (1, 64)
    np.testing.assert_allclose(m.coef, sk.coef_, atol=1e-5 * np.abs(sk.coef_).max())
    # the intercept is the flattest direction here: both solvers stop within ~1e-5 of each other
    # at objective values equal to 1e-11 relative
    np.testing.assert_allclose(m.intercept, sk.intercept_, rtol=2e-5)
    np.testing.assert_allclose(m.predict_proba(xte), sk.predict_proba(xte), atol=1e-6)
    assert np.array_equal(m.predict(xte), sk.predict(xte))
    ours = sklearn_objective(m.coef, m.intercept, xtr, ytr, 0.5)
    assert ours == pytest.approx(
        sklearn_objective(sk.coef_, sk.intercept_, xtr, ytr, 0.5), rel=1e-11
    )


def test_sweep_picks_the_validation_best_c_and_refits_on_train_plus_val(digits):
    x, y = digits
    train = SimpleNamespace(cls=x[:400].astype(np.float32), labels=y[:400], classes=None)
    test = SimpleNamespace(cls=x[400:700].astype(np.float32), labels=y[400:700], classes=None)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    r = sweep_logreg(train, test, c_grid=grid[::-1], val_fraction=0.25, seed=1)
    tr, val = stratified_split(train.labels, 0.25, seed=1)
    assert np.array_equal(r.train_indices, tr) and np.array_equal(r.val_indices, val)
    assert [s["C"] for s in r.sweep] == list(grid)  # visited in increasing C
    xt = train.cls.astype(np.float64)
    accs = []
    for s in r.sweep:  # scikit-learn fit on the same training rows, scored on the same val rows
        sk = LogisticRegression(C=s["C"], max_iter=10_000).fit(xt[tr], train.labels[tr])
        accs.append(float((sk.predict(xt[val]) == train.labels[val]).mean()))
    assert [s["val_top1"] for s in r.sweep] == accs
    # digits: C=1 and C=100 tie at the top; the first (more regularized) one is kept
    assert accs[2] == accs[3] == max(accs) > accs[1] > accs[0]
    assert r.best_C == 1.0
    # the reported model: refit on train + val with the best C, scored on test
    sk = LogisticRegression(C=r.best_C, tol=1e-8, max_iter=10_000).fit(xt, train.labels)
    xte = test.cls.astype(np.float64)
    np.testing.assert_allclose(r.model.predict_proba(xte), sk.predict_proba(xte), atol=1e-4)
    assert r.test_top1 == float((sk.predict(xte) == test.labels).mean())
    top5 = sk.classes_[np.argsort(-sk.predict_proba(xte), axis=1)[:, :5]]
    assert r.test_top5 == float((top5 == test.labels[:, None]).any(1).mean())


def test_sweep_path_reaches_the_cold_start_optima(digits):
    """The sweep's warm starts (previous solution or the path extrapolated through the previous
    two, L-BFGS pairs carried over) change where each fit starts, not where it ends."""
    x, y = digits
    prob = logreg_mod._Problem(x[:400], y[:400], "cpu", torch.float64)
    grid = list(C_GRID[14:22])  # 1e-2.5 .. 1e-0.75: the path bends here
    thetas, mem = [], logreg_mod._Memory()
    for j, C in enumerate(grid):
        theta, f, g = logreg_mod._path_start(prob, grid, thetas, j)
        warm, theta = logreg_mod._fit(prob, C, 3000, 1e-9, theta=theta, memory=mem, fg=(f, g))
        thetas.append(theta)
        cold = fit_logreg(x[:400], y[:400], C, tol=1e-9, max_iter=3000)
        assert warm.converged and cold.converged
        scale = np.abs(cold.coef).max()
        np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-5 * scale)
        np.testing.assert_allclose(warm.intercept, cold.intercept, atol=1e-5)
        if j >= 2:  # the warm start saves iterations
            assert warm.n_iter < cold.n_iter, (C, warm.n_iter, cold.n_iter)


def test_dinov2_sweep_iteration_budget_and_progress(digits, capsys):
    """The 45-value sweep in a bounded number of L-BFGS iterations (machine-independent; issue 16:
    minutes on 900 x 192 features before), with a progress bar on stderr."""
    x, y = digits
    train = SimpleNamespace(cls=x[:1000], labels=y[:1000], classes=None)
    test = SimpleNamespace(cls=x[1000:], labels=y[1000:], classes=None)
    r = sweep_logreg(train, test, progress=True)
    iters = [s["n_iter"] for s in r.sweep]
    # measured 399 (+30 for the refit); cold starts need several times more, and the previous
    # solver (torch.optim.LBFGS, warm starts only) capped 21 of 45 fits at 1000 on ViT features
    assert sum(iters) < 1000, iters
    assert all(s["converged"] for s in r.sweep) and r.model.converged
    assert r.test_top1 > 0.9
    err = capsys.readouterr().err
    assert "logreg" in err and "val_top1=" in err and "refit" in err


def test_binary_sweep_matches_scikit_learn(digits):
    x, y = digits
    yb = np.where(y == 3, 7, 2)  # two classes, arbitrary label values
    train = SimpleNamespace(cls=x[:400], labels=yb[:400], classes=None)
    test = SimpleNamespace(cls=x[400:700], labels=yb[400:700], classes=None)
    grid = (1e-3, 1e-2, 0.1, 1.0)
    r = sweep_logreg(train, test, c_grid=grid, val_fraction=0.25, seed=0, num_classes=2)
    tr, val = stratified_split(yb[:400], 0.25, seed=0)
    for s in r.sweep:
        sk = LogisticRegression(C=s["C"], tol=1e-8, max_iter=10_000).fit(x[tr], yb[tr])
        assert s["val_top1"] == float((sk.predict(x[val]) == yb[val]).mean())
    sk = LogisticRegression(C=r.best_C, tol=1e-8, max_iter=10_000).fit(x[:400], yb[:400])
    np.testing.assert_allclose(
        r.model.predict_proba(x[400:700]), sk.predict_proba(x[400:700]), atol=1e-4
    )
    assert r.test_top5 is None


def test_bad_inputs_are_clear_errors(digits):
    x, y = digits
    with pytest.raises(ValueError, match="C must be a positive number"):
        fit_logreg(x[:20], y[:20], 0.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_logreg(x[:5], np.zeros(5, dtype=int), 1.0)
    f = SimpleNamespace(cls=x[:50], labels=None)
    with pytest.raises(ValueError, match="no labels"):
        sweep_logreg(f, f)
    g = SimpleNamespace(cls=x[:50], labels=y[:50], classes=None)
    with pytest.raises(ValueError, match="C grid must hold positive numbers"):
        sweep_logreg(g, g, c_grid=[1.0, -1.0])


# ------------------------------------------------------------------------------------ CLI
CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


def _cifar(shared_data, split, per_class):
    root = shared_data / "cifar10-subset" / split
    return [(p, c) for c in CLASSES for p in sorted((root / c).glob("*.jpg"))[:per_class]]


def _parser():
    p = argparse.ArgumentParser(prog="vssl eval")
    logreg_mod.add_parser(p.add_subparsers())
    return p


def test_cli_end_to_end(shared_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = vssl.create_model("vit-test-p14", random_init=True, layerscale=1.0)
    train_dir, test_dir = tmp_path / "train", tmp_path / "cifar-test"
    embed_images(model, _cifar(shared_data, "train", 8), train_dir, num_workers=0, progress=False)
    embed_images(model, _cifar(shared_data, "test", 3), test_dir, num_workers=0, progress=False)
    results = tmp_path / "res.jsonl"
    args = _parser().parse_args(
        [
            "logreg",
            "--train",
            str(train_dir),
            "--test",
            str(test_dir),
            "--c-grid",
            "0.1",
            "1",
            "--max-iter",
            "100",
            "--results",
            str(results),
        ]
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "35 train / 5 val / 15 test images, 5 classes, 2 values of C" in out
    assert "val_top1=" in captured.err  # progress, one update per C, even when not a terminal
    assert out.count("*") == 1

    rows = [json.loads(line) for line in results.read_text().splitlines()]
    got = {r["metric"]: r["value"] for r in rows}
    assert set(got) == {"logreg_top1", "logreg_top5"}
    assert rows[0]["protocol"] == "logreg" and rows[0]["dataset"] == "cifar-test"
    train, test = load_features(train_dir), load_features(test_dir, classes=CLASSES)
    ref = sweep_logreg(train, test, c_grid=(0.1, 1.0), max_iter=100)
    assert got["logreg_top1"] == ref.test_top1 and got["logreg_top5"] == ref.test_top5
    assert rows[0]["best_C"] == ref.best_C

    # a test split with a class the training split lacks
    odd = tmp_path / "odd"
    embed_images(
        model,
        [(p, "zebra") for p, _ in _cifar(shared_data, "test", 1)],
        odd,
        num_workers=0,
        progress=False,
    )
    args = _parser().parse_args(
        ["logreg", "--train", str(train_dir), "--test", str(odd), "--results", "-"]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "vssl eval logreg: error:" in err and "'zebra'" in err


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["logreg", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "vssl eval logreg --train feats/train --test feats/test" in text
    for flag in ("--c-grid", "--max-iter", "--val-fraction", "--model", "--results"):
        assert flag in text
