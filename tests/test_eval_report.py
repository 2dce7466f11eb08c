"""Results file and `vssl eval report`: the pivot, the markdown, the HTML page, bad input."""

from __future__ import annotations

import json
import re

import pytest

from vssl.cli import main
from vssl.evaluate.report import curves, pivot, to_html, to_markdown
from vssl.evaluate.results import format_table, read_results, record


def _write(tmp_path):
    f = tmp_path / "r.jsonl"
    record(
        f,
        protocol="knn",
        metrics={"knn_top1@20": 0.5, "knn_top5@20": 0.9},
        model="A",
        dataset="cifar",
    )
    record(
        f,
        protocol="knn",
        metrics={"knn_top1@20": 0.75},
        model="B",
        dataset="cifar",
        extra={"k": 20},
    )
    record(f, protocol="knn", metrics={"knn_top1@20": 0.6}, model="A", dataset="cifar")  # newer
    for step, v in [(0, 0.1), (100, 0.3), (50, 0.2)]:
        record(f, protocol="monitor", metrics={"knn_top1": v}, model="A", extra={"step": step})
    return f


def test_record_appends_json_lines(tmp_path):
    f = _write(tmp_path)
    lines = f.read_text().splitlines()
    assert len(lines) == 7
    first = json.loads(lines[0])
    assert {k: first[k] for k in ("protocol", "model", "dataset", "metric", "value")} == {
        "protocol": "knn",
        "model": "A",
        "dataset": "cifar",
        "metric": "knn_top1@20",
        "value": 0.5,
    }
    assert json.loads(lines[2])["k"] == 20 and "time" in first
    assert record("-", protocol="x", metrics={"m": 1.0})[0]["value"] == 1.0  # "-" writes nothing


def test_pivot_latest_wins_and_curves_sorted(tmp_path):
    rows = read_results([_write(tmp_path)])
    runs, table = pivot(rows)
    assert runs == ["A", "B"]
    assert table[("knn", "cifar", "knn_top1@20")] == {"A": 0.6, "B": 0.75}
    assert table[("knn", "cifar", "knn_top5@20")] == {"A": 0.9}
    assert curves(rows) == {"knn_top1": {"A": [(0.0, 0.1), (50.0, 0.2), (100.0, 0.3)]}}


def test_markdown_and_html(tmp_path):
    rows = read_results([_write(tmp_path)])
    md = to_markdown(rows)
    assert "| knn | cifar | knn_top1@20 | 0.6000 | **0.7500** |" in md
    assert "| knn | cifar | knn_top5@20 | 0.9000 | - |" in md
    page = to_html(rows)
    assert page.count("<svg") == 3  # two bar charts + one training curve
    # bars are drawn to scale on a 0..1 axis: B's bar is 0.75/0.6 times A's
    heights = {
        m.group(2): float(m.group(1))
        for m in re.finditer(
            r'height="([\d.]+)" fill="[^"]+"><title>(\w): ',
            page[page.index("<svg") :].split("</svg>")[0],
        )
    }
    assert heights["B"] / heights["A"] == pytest.approx(0.75 / 0.6, rel=1e-2)
    assert "<polyline" in page and "class=best" in page


def test_bad_results_file_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"protocol": "knn", "metric": "a", "value": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        read_results([f])
    f.write_text('{"protocol": "knn"}\n')
    with pytest.raises(ValueError, match=r"missing \['metric', 'value'\]"):
        read_results([f])


def test_report_cli(tmp_path, capsys):
    f = _write(tmp_path)
    out = tmp_path / "rep.html"
    assert (
        main(["eval", "report", str(f), "--html", str(out), "--markdown", str(tmp_path / "r.md")])
        == 0
    )
    assert "**0.7500**" in capsys.readouterr().out
    assert out.read_text().startswith("<!doctype html>") and (tmp_path / "r.md").is_file()
    assert main(["eval", "report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_format_table():
    text = format_table([{"k": 10, "top1": 0.51234}, {"k": 200, "top1": 0.5}])
    assert text.splitlines()[0].split() == ["k", "top1"]
    assert "0.5123" in text and "200" in text
