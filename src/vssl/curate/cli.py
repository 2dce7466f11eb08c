"""``vssl curate STEP``: one subcommand per curation step, each defined beside its code.

A module in this package that defines ``add_parser(subparsers)`` is a curation step: it registers
its subcommand and sets ``func`` to a function ``args -> exit code``, and its ``HELP`` constant is
its line in ``vssl curate --help``. Modules keep heavy imports (faiss, duckdb, OCR) inside their
functions so ``vssl --help`` stays fast. Discovery instead of a hand-kept list: adding a step is
adding one module.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

# the order a user runs them in; steps not listed follow alphabetically
ORDER = ["filter", "textrich", "dedup", "retrieve", "cluster", "sample", "browse"]


def _steps() -> list:
    names = [m.name for m in pkgutil.iter_modules(_package_path())]
    names = [n for n in names if not n.startswith("_") and n != "cli"]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    modules = [importlib.import_module(f"{__package__}.{n}") for n in names]
    return [m for m in modules if hasattr(m, "add_parser")]


def _package_path() -> list[str]:
    return list(importlib.import_module(__package__).__path__)


def add_curate_parser(subparsers) -> argparse.ArgumentParser:
    steps = _steps()
    epilog = "steps:\n" + "\n".join(
        f"  {m.__name__.rsplit('.', 1)[1]:<10} {getattr(m, 'HELP', '')}" for m in steps
    )
    p = subparsers.add_parser(
        "curate",
        help="curate image data: filter, text-rich, dedup, retrieve, cluster, sample, browse",
        description="Curate web-scale image data the way DINOv2 and Web-SSL did. Every step reads "
        "and writes parquet manifests, so curate -> `vssl data pack` -> `vssl pretrain` chains.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    sub = p.add_subparsers(dest="step", metavar="STEP")
    for m in steps:
        m.add_parser(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p
