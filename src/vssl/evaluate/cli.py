"""``vssl eval PROTOCOL``: one subcommand per protocol, each defined beside its evaluator.

Every protocol module exposes ``add_parser(subparsers)`` which registers its subcommand and sets
``func`` to a function ``args -> exit code``. Modules keep heavy imports (faiss, scikit-learn,
transformers) inside their functions so ``vssl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

# (module, one line for the protocol list in `vssl eval --help`)
PROTOCOLS = [
    ("knn", "k-nearest-neighbour classification on frozen features (DINOv2 protocol)"),
    ("linear", "linear probes: the DINOv2 grid of blocks x avgpool x learning rates in one pass"),
    ("logreg", "L-BFGS logistic regression with a sweep over the regularization strength"),
    ("zeroshot", "zero-shot classification with a two-tower (image-text) model"),
    ("retrieval", "image<->text retrieval recall@1/5/10 with a two-tower model"),
    ("align", "mutual-kNN alignment between image features and a text model's caption features"),
    ("seg", "linear segmentation probe on patch tokens (mIoU)"),
    ("report", "render results files side by side as markdown and an HTML page"),
]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    epilog = "protocols:\n" + "\n".join(f"  {name:<10} {text}" for name, text in PROTOCOLS)
    p = subparsers.add_parser(
        "eval",
        help="evaluate frozen features: knn, linear, logreg, zeroshot, retrieval, align, seg",
        description="Evaluate a model's frozen features with DINOv2's protocols. Features come from "
        "a `vssl embed` output folder, or are embedded on the fly (and cached) when "
        "--model is given. Every run prints a table and appends JSON lines to a "
        "results file; `vssl eval report` puts runs side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL")
    for name, _ in PROTOCOLS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p
