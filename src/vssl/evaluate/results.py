"""One results file for every protocol: a JSON line per metric, so runs compare side by side.

Each line: ``{"time", "protocol", "model", "checkpoint", "dataset", "metric", "value", ...extra}``.
``vssl eval report`` reads these files back (see ``report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

DEFAULT_RESULTS = "vssl_results.jsonl"


def add_result_args(parser: argparse.ArgumentParser) -> None:
    """``--results``, ``--dataset``, ``--run-name``: the same three options on every protocol."""
    g = parser.add_argument_group("results")
    g.add_argument(
        "--results",
        metavar="FILE",
        default=DEFAULT_RESULTS,
        help=f"append one JSON line per metric here (default {DEFAULT_RESULTS}); "
        "'-' writes nothing",
    )
    g.add_argument(
        "--dataset",
        metavar="NAME",
        default=None,
        help="dataset name in the results (default: the test input's folder name)",
    )
    g.add_argument(
        "--run-name",
        metavar="NAME",
        default=None,
        help="model label in the results (default: the model name or features folder)",
    )


def record(
    path: str | os.PathLike | None,
    *,
    protocol: str,
    metrics: Mapping[str, float],
    model: str | None = None,
    checkpoint: str | None = None,
    dataset: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> list[dict]:
    """Append one line per ``metrics`` item to ``path`` (``None`` or ``"-"``: write nothing) and
    return the rows. Appending a whole line with one ``write`` keeps concurrent runs readable."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows = []
    for name, value in metrics.items():
        row = {
            "time": now,
            "protocol": protocol,
            "model": model,
            "checkpoint": checkpoint,
            "dataset": dataset,
            "metric": name,
            "value": float(value),
        }
        if extra:
            row.update({k: v for k, v in extra.items() if k not in row})
        rows.append(row)
    if path is not None and str(path) != "-" and rows:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
        with open(p, "a", encoding="utf-8") as f:
            f.write(text)
    return rows


def read_results(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows of one or more results files; a malformed line is an error naming file and line."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
                missing = {"protocol", "metric", "value"} - set(row)
                if missing:
                    raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
                rows.append(row)
    return rows


def format_table(rows: list[Mapping[str, object]], columns: list[str] | None = None) -> str:
    """A plain aligned text table (floats with 4 significant decimals)."""
    if not rows:
        return "(no results)"
    columns = columns or list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
