"""``vssl compare``: train several recipes on the same images for the same budget, evaluate every
encoder with the same protocols, and write one report.

Web-SSL's question (does visual representation learning need language?) is answered by a
language-supervised and a vision-only model trained on the same images and measured the same way.
For each entry of ``RECIPES_OR_RUN_DIRS``:

- a recipe (a shipped name or a YAML file) is trained on ``--data`` for ``--minutes`` of training
  time in ``OUTPUT/runs/<name>/`` through ``vssl pretrain``'s own code. As ``vssl quickstart`` does,
  the recipe's schedules (warm-up, cosine, the method's own) are compressed into the steps that a
  timed probe says fit the budget, and the trainer's time budget stops it at the limit anyway.
  An image–text recipe given a labelled folder without captions gets ``data.captions=templates``
  (said in the report). A run folder that already holds ``backbone.safetensors`` is reused, so a
  second ``vssl compare`` on the same ``--output`` only evaluates;
- a run folder given as a path is evaluated as it is.

Every encoder (the run's ``backbone.safetensors``) then goes through the same protocols on the
same images: kNN (k=20, DINOv2's weighted vote) and the linear probe (DINOv2's logistic-regression
sweep) on the CLS features of a class-balanced subset of ``--data`` / ``--test``, and zero-shot
classification (CLIP's prompts) where the run has a text tower. ``OUTPUT/compare.md`` and
``OUTPUT/compare.html`` hold one row per method; every number is also appended to the results file.
The comparison knows no method: anything ``vssl pretrain`` trains takes part.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

__all__ = ["add_compare_parser", "evaluate_run", "run_compare", "train_recipe"]

_EPILOG = """\
examples:
  vssl compare cpu_tiny32 cpu_mae32 cpu_clip32 --data cifar/train --test cifar/test \\
      --minutes 20 --output cmp/
  vssl compare runs/webdino_1b runs/clip_vitb16 --data imagenet/train --test imagenet/val \\
      --output cmp/     # finished runs: evaluated only
"""


def _say(msg: str) -> None:
    print(f"vssl compare: {msg}", file=sys.stderr, flush=True)


def _is_run(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def _label(entry: str) -> str:
    p = Path(entry)
    return p.name if _is_run(p) else (p.stem if p.suffix in (".yaml", ".yml") else entry)


# ------------------------------------------------------------------------------------- training
def train_recipe(
    recipe_name: str,
    data: str,
    run_dir: Path,
    minutes: float,
    overrides: list[str] = (),
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train ``recipe_name`` on ``data`` for ``minutes`` of training in ``run_dir`` (module doc),
    or for exactly ``steps`` steps (the schedule compressed into them; ``minutes`` still caps
    the time); returns ``{"steps", "seconds", "captions"}``."""
    import torch

    from .pretrain import build_data, build_method, run_pretrain
    from .quickstart import _endless, _rescale_schedule, _time_step
    from .train.config import load_recipe, save_recipe

    recipe = load_recipe(recipe_name, list(overrides))
    recipe.data.train = str(data)
    recipe.data.num_workers = min(recipe.data.num_workers, 1)  # 2 CPU cores: one loader worker
    recipe.train = dataclasses.replace(recipe.train, output_dir=str(run_dir), seed=seed)
    torch.manual_seed(seed)
    method, _ = build_method(recipe)
    captions = None
    if method.views().captions and recipe.data.captions is None and Path(data).is_dir():
        recipe.data.captions = "templates"  # a labelled folder has no captions of its own
        captions = "class-name templates"
    data_obj = build_data(recipe, method.views(), device="cpu")
    if steps is None:
        if hasattr(method, "prepare"):
            method.prepare(data_obj, run_dir)  # e.g. the tokenizer, before the probe's forward
        batches = _endless(data_obj)
        t_step = _time_step(method, batches) * 1.08  # quickstart's measured overhead factor
        batches.close()
        del batches
        steps = max(1, int(minutes * 60.0 / t_step))
        plan = f"{steps} steps of ~{t_step:.2f} s in {minutes:g} min"
    else:
        plan = f"{steps} steps (at most {minutes:g} min)"
    del data_obj, method
    recipe.train = dataclasses.replace(
        _rescale_schedule(recipe, steps), time_budget_s=max(minutes * 60.0, 1.0)
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "config.yaml")
    _say(f"{recipe_name}: {plan} -> {run_dir}")
    summary = run_pretrain(recipe, progress=progress)
    return {"steps": summary["step"], "seconds": summary["seconds"], "captions": captions}


# ----------------------------------------------------------------------------------- evaluation
def _features_and_labels(monitor, encoder):
    feats = monitor.features(encoder)
    return (
        {s: feats[s].cpu().numpy() for s in ("train", "test")},
        {s: monitor.labels[s].numpy() for s in ("train", "test")},
    )


def evaluate_run(
    run_dir: Path,
    train: str,
    test: str,
    *,
    max_per_split: int | None = 5000,
    k: int = 20,
    seed: int = 0,
    c_grid=None,
) -> dict[str, dict[str, float]]:
    """``{protocol: {metric: value}}`` for a run folder's encoder (and text tower)."""
    import numpy as np

    from .evaluate.knn import knn_classify
    from .evaluate.logreg import sweep_logreg
    from .evaluate.monitor import KNNMonitor
    from .methods.clip import is_two_tower_run
    from .models.checkpoints import run_backbone
    from .models.zoo import create_model

    backbone = run_backbone(run_dir)
    if backbone is None:
        raise ValueError(
            f"{run_dir} has no backbone.safetensors (the run has not finished): resume it with "
            "`vssl pretrain` on that folder, or give it as a recipe to train"
        )
    encoder = create_model(str(backbone)).eval()
    monitor = KNNMonitor(
        train, test, every_n_steps=1, k=k, max_per_split=max_per_split, num_workers=0, seed=seed
    )
    x, y = _features_and_labels(monitor, encoder)
    out: dict[str, dict[str, float]] = {}
    knn = knn_classify(
        x["train"], y["train"], x["test"], y["test"], ks=(k,), num_classes=len(monitor.classes)
    )
    out["knn"] = {"top1": knn.top1[knn.ks[0]]}
    lr = sweep_logreg(
        SimpleNamespace(cls=x["train"], labels=y["train"], classes=monitor.classes),
        SimpleNamespace(cls=x["test"], labels=y["test"], classes=monitor.classes),
        c_grid=c_grid,
        seed=seed,
    )
    out["linear"] = {"top1": lr.test_top1, "best_C": lr.best_C}
    if is_two_tower_run(run_dir):
        from .evaluate.two_tower import encode_image_files
        from .evaluate.zeroshot import (
            read_templates,
            topk_accuracy,
            zeroshot_classifier,
            zeroshot_logits,
        )
        from .methods.clip import load_run

        model = load_run(run_dir)
        names = [c.replace("_", " ") for c in monitor.classes]
        classifier = zeroshot_classifier(model, names, read_templates("clip7"))
        items = monitor._items["test"]  # the same class-balanced test images as kNN / linear
        emb, kept, _ = encode_image_files(model, [p for p, _ in items])
        index = {c: i for i, c in enumerate(monitor.classes)}
        labels = np.array([index[items[i][1]] for i in kept])
        acc = topk_accuracy(zeroshot_logits(emb, classifier), labels, (1,))
        out["zeroshot"] = {"top1": acc[1]}
    return out


# --------------------------------------------------------------------------------------- report
_COLUMNS = (("knn", "top1", "kNN top-1"), ("linear", "top1", "linear top-1"))
_ZS = ("zeroshot", "top1", "zero-shot top-1")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _rows(results: list[dict]) -> tuple[list[tuple], list[list[str]]]:
    cols = list(_COLUMNS) + ([_ZS] if any("zeroshot" in r["metrics"] for r in results) else [])
    rows = []
    for r in results:
        m = r["metrics"]
        rows.append(
            [
                r["label"],
                r["method"],
                str(r.get("steps") or "-"),
                "-" if r.get("seconds") is None else f"{r['seconds'] / 60:.1f}",
                *(_fmt(m.get(p, {}).get(k)) for p, k, _ in cols),
                r.get("note") or "",
            ]
        )
    return cols, rows


def to_markdown(results: list[dict], header: str) -> str:
    cols, rows = _rows(results)
    names = ["run", "method", "steps", "train min", *(c[2] for c in cols), "note"]
    lines = [header, "", "| " + " | ".join(names) + " |"]
    lines.append("|" + "|".join(["---"] * 4 + ["---:"] * len(cols) + ["---"]) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_html(results: list[dict], header: str) -> str:
    from .evaluate.report import _bar_chart

    cols, rows = _rows(results)
    names = ["run", "method", "steps", "train min", *(c[2] for c in cols), "note"]
    runs = [r["label"] for r in results]
    charts = []
    for p, k, title in cols:
        vals = {r["label"]: r["metrics"][p][k] for r in results if p in r["metrics"]}
        charts.append(_bar_chart(title, vals, runs))
    table = "<tr>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    table += "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vssl compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px}}svg{{margin:6px}}</style></head>
<body><h1>vssl compare</h1><p>{html.escape(header)}</p>
<table>{table}</table>
<h2>Metrics</h2><div>{"".join(charts)}</div></body></html>
"""


# ------------------------------------------------------------------------------------------ CLI
def run_compare(
    entries: list[str],
    data: str,
    test: str,
    minutes: float,
    output: str,
    *,
    overrides: list[str] = (),
    results_file: str | None = None,
    max_per_split: int | None = 5000,
    steps: int | None = None,
    seed: int = 0,
    c_grid=None,
    progress: bool = False,
) -> list[dict]:
    """Train / reuse, evaluate and report every entry (module docstring); returns the rows."""
    import yaml

    from .evaluate.results import record
    from .models.checkpoints import run_backbone

    if not entries:
        raise ValueError("give at least one recipe or run folder to compare")
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    for name, p in (("--data", data), ("--test", test)):
        if not Path(p).is_dir():
            raise FileNotFoundError(f"{name} {p} is not a folder of class subfolders")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    labels = [_label(e) for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two entries have the same name ({labels}): give distinct ones")
    results = []
    for entry, label in zip(entries, labels):
        path = Path(entry)
        note = None
        run_steps = seconds = None
        if _is_run(path):
            run_dir = path
            note = "given run"
        else:
            run_dir = out / "runs" / label
            if run_backbone(run_dir) is not None:
                note = "reused run"
            else:
                info = train_recipe(
                    entry,
                    data,
                    run_dir,
                    minutes,
                    overrides,
                    steps=steps,
                    seed=seed,
                    progress=progress,
                )
                run_steps, seconds = info["steps"], info["seconds"]
                if info["captions"]:
                    note = f"captions: {info['captions']}"
        if run_steps is None:  # a reused or given run: what its metrics say
            metrics_file = run_dir / "metrics.jsonl"
            if metrics_file.is_file():
                lines = metrics_file.read_text(encoding="utf-8").strip().splitlines()
                rows = [json.loads(x) for x in lines if x.strip().startswith("{")]
                run_steps = max((r.get("step", 0) for r in rows), default=None)
                seconds = max((r.get("seconds", 0) for r in rows), default=None)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        method = str((cfg.get("method") or {}).get("name", "?"))
        if (cfg.get("data") or {}).get("captions") == "templates" and not note:
            note = "captions: class-name templates"
        _say(f"evaluating {label} ({run_dir})")
        metrics = evaluate_run(
            run_dir, data, test, max_per_split=max_per_split, seed=seed, c_grid=c_grid
        )
        for protocol, vals in metrics.items():
            record(
                results_file,
                protocol=protocol,
                metrics={k: v for k, v in vals.items() if k == "top1"},
                model=label,
                checkpoint=str(run_backbone(run_dir)),
                dataset=Path(test).resolve().name,
                extra={
                    "compare": str(out),
                    "method": method,
                    "minutes": minutes,
                    "steps": run_steps,
                    **{k: v for k, v in vals.items() if k != "top1"},
                },
            )
        results.append(
            {
                "label": label,
                "method": method,
                "run": str(run_dir),
                "steps": run_steps,
                "seconds": seconds,
                "metrics": metrics,
                "note": note,
            }
        )
    header = (
        f"Trained on {data} for {minutes:g} min of training each (same images, same seed); "
        f"evaluated on {test}: kNN (k=20) and linear probe (logistic regression, C swept on a "
        "validation split) on CLS features of the same class-balanced images"
        + (f" (at most {max_per_split} per split)" if max_per_split else "")
        + "; zero-shot (CLIP's 7 prompts) where the run has a text tower."
    )
    from ._io import atomic_write

    md, page = to_markdown(results, header), to_html(results, header)
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
    atomic_write(out / "compare.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    print(md)
    _say(f"report: {out / 'compare.md'}, {out / 'compare.html'}")
    return results


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="train recipes on the same images for the same budget and compare their encoders",
        description="Train each recipe on the same images (--data) for the same training time "
        "(--minutes, or --steps), reuse finished runs and run folders given as paths, evaluate "
        "every encoder with the same protocols on --test (kNN k=20, a logistic-regression linear "
        "probe, zero-shot where the run has a text tower) and write OUTPUT/compare.md and "
        "OUTPUT/compare.html (one row per method); every number is appended to --results.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "entries",
        nargs="+",
        metavar="RECIPE_OR_RUN",
        help="recipe names / YAML files to train, or finished run folders to evaluate",
    )
    p.add_argument("--data", required=True, help="training images: class subfolders")
    p.add_argument("--test", required=True, help="test images: the same class subfolders")
    p.add_argument(
        "--minutes", type=float, default=20.0, help="training minutes per recipe (default 20)"
    )
    p.add_argument("--output", "-o", required=True, help="folder for runs/ and the report")
    p.add_argument(
        "--max-per-split",
        type=int,
        default=5000,
        metavar="N",
        help="class-balanced images per split for kNN / linear / zero-shot (default 5000; 0: all)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every trained recipe, e.g. --set train.batch_size_per_rank=64",
    )
    p.add_argument(
        "--results",
        default="vssl_results.jsonl",
        metavar="FILE",
        help="append every number here (default vssl_results.jsonl; '-': nowhere)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="train every recipe for exactly N steps instead of what fits --minutes (which "
        "still caps each run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
    return p


def _cmd(args: argparse.Namespace) -> int:
    run_compare(
        args.entries,
        args.data,
        args.test,
        args.minutes,
        args.output,
        overrides=args.set,
        results_file=args.results,
        max_per_split=args.max_per_split or None,
        steps=args.steps,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    return 0
