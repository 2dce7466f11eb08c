"""`vssl curate filter` against the same thresholds computed row by row in Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vssl.cli import main
from vssl.curate.filter import filter_manifest


def _coyo(path, n, seed, start_id):
    rng = np.random.default_rng(seed)
    w = rng.integers(50, 1200, n)
    h = rng.integers(50, 1200, n)
    clip = rng.normal(0.29, 0.05, n)
    rows = {
        "id": np.arange(start_id, start_id + n),
        "url": [f"https://example.com/{start_id + i}.jpg" for i in range(n)],
        "text": [f"alt text {i}" for i in range(n)],
        "image_phash": [f"{v:016x}" for v in rng.integers(0, n // 3, n)],  # many exact repeats
        "width": w,
        "height": h,
        "aesthetic_score_laion_v2": rng.normal(4.77, 0.8, n),
        "watermark_score": rng.beta(1, 4, n),
        "nsfw_score_opennsfw2": rng.beta(1, 20, n),
        "nsfw_score_gantman": rng.beta(1, 20, n),
        "text_length": rng.integers(1, 300, n),
    }
    for i in (5, 6):  # two rows without a pHash that pass every threshold
        rows["image_phash"][i] = None
        rows["width"][i] = rows["height"][i] = 500
        rows["watermark_score"][i] = rows["nsfw_score_opennsfw2"][i] = 0.0
        rows["nsfw_score_gantman"][i] = 0.0
        rows["text_length"][i] = 100
    clip = [None if i % 97 == 0 else float(c) for i, c in enumerate(clip)]
    clip[5] = clip[6] = 0.35
    rows["clip_similarity_vitb32"] = pa.array(clip, pa.float64())
    pq.write_table(pa.table(rows), path, row_group_size=300)


@pytest.fixture
def manifests(tmp_path):
    _coyo(tmp_path / "part-0.parquet", 1500, 0, 0)
    _coyo(tmp_path / "part-1.parquet", 1200, 1, 10_000)
    return tmp_path


def _reference(folder, dedup):
    """The rules applied row by row, in file order; the rows left after each."""
    rows = []
    for f in sorted(folder.glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    rules = [
        lambda r: r["clip_similarity_vitb32"] is not None and r["clip_similarity_vitb32"] >= 0.28,
        lambda r: r["watermark_score"] <= 0.5,
        lambda r: r["nsfw_score_opennsfw2"] <= 0.1 and r["nsfw_score_gantman"] <= 0.1,
        lambda r: min(r["width"], r["height"]) >= 200,
        lambda r: max(r["width"], r["height"]) <= 3 * min(r["width"], r["height"]),
        lambda r: r["text_length"] > 20,
    ]
    counts = []
    for rule in rules:
        rows = [r for r in rows if rule(r)]
        counts.append(len(rows))
    if dedup:
        seen, kept = set(), []
        for r in rows:
            if r["image_phash"] is None or r["image_phash"] not in seen:
                kept.append(r)
                seen.add(r["image_phash"])
        rows = kept
        counts.append(len(rows))
    return counts, sorted(r["id"] for r in rows)


RULES = dict(
    min_clip_similarity=0.28,
    max_watermark=0.5,
    max_nsfw=0.1,
    min_size=200,
    max_aspect_ratio=3,
    where=["text_length > 20"],
)


@pytest.mark.parametrize("dedup", [False, True])
def test_matches_row_by_row_reference(manifests, tmp_path, dedup):
    out = tmp_path / "kept.parquet"
    res = filter_manifest(
        str(manifests / "part-*.parquet"), out, dedup_phash=dedup, memory_limit="200MB", **RULES
    )
    counts, ids = _reference(manifests, dedup)
    assert res.rows_in == 2700
    assert [n for _, n in res.kept] == counts
    assert 0 < res.rows_out == counts[-1] < counts[0]
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == ids
    assert table.column_names == pq.read_schema(manifests / "part-0.parquet").names
    names = [name for name, _ in res.kept]
    assert names[0] == "clip_similarity_vitb32 >= 0.28"
    assert names[2] == "nsfw_score_opennsfw2 <= 0.1 and nsfw_score_gantman <= 0.1"
    if dedup:
        assert table.column("image_phash").null_count == 4  # rows without a pHash all kept
        assert names[-1] == "one row per image_phash"


def test_cli_report_and_errors(manifests, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    src = str(manifests / "part-0.parquet")
    assert main(["curate", "filter", src, "--out", str(out), "--min-aesthetic", "5"]) == 0
    printed = capsys.readouterr().out
    n = sum(a >= 5 for a in pq.read_table(src).column("aesthetic_score_laion_v2").to_pylist())
    assert f"aesthetic_score_laion_v2 >= 5  {n:>13,}" in printed and "input" in printed
    assert pq.read_metadata(out).num_rows == n

    assert main(["curate", "filter", src, "--out", str(out), "--where", "nosuch > 1"]) == 2
    err = capsys.readouterr().err
    assert "where nosuch > 1" in err and "nosuch" in err and "clip_similarity_vitb32" in err

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"URL": ["a", "b"], "score": [0.1, 0.9]}), plain)
    argv = ["curate", "filter", str(plain), "--out", str(out), "--min-clip-similarity", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "clip_similarity_vitb32" in err and "URL, score" in err and "--clip-column" in err
    assert main([*argv, "--clip-column", "score"]) == 0
    assert pq.read_table(out).column("URL").to_pylist() == ["b"]
    assert main(["curate", "filter", str(plain), "--out", str(out), "--dedup-phash"]) == 2
    assert "image_phash" in capsys.readouterr().err
    assert main(["curate", "filter", str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
