"""Streaming over shards: rank/worker splits, equal batch counts, determinism, resampling."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vssl.data.pack import pack
from vssl.data.sources import Sample
from vssl.data.stream import FileDataset, ShardStream, shuffle_buffer

PER_SHARD = 10


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, 3)).save(buf, "PNG")
    return buf.getvalue()


def _write_shards(root: Path, n_shards: int, per_shard: int = PER_SHARD, sizes: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"s-{s:06d}.tar", "w") as tf:
            for j in range(per_shard):
                key = f"{s:03d}_{j:03d}"
                for ext, data in (("png", _png(s * per_shard + j)), ("cls", str(s).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    if sizes:
        (root / "sizes.json").write_text(
            json.dumps({f"s-{s:06d}.tar": per_shard for s in range(n_shards)})
        )
    return str(root / f"s-{{000000..{n_shards - 1:06d}}}.tar")


def _run_rank(pattern, rank, world, workers, batch_size, **kw):
    """What a DataLoader on this rank would see: per-worker sample keys and the batch count."""
    ds = ShardStream(pattern, rank=rank, world_size=world, batch_size=batch_size, **kw)
    per_worker = [[s.key for s in ds.iter_worker(w, workers)] for w in range(workers)]
    batches = sum(math.ceil(len(k) / batch_size) for k in per_worker)
    return ds, per_worker, batches


@pytest.mark.parametrize("n_shards", [5, 1])
def test_ranks_and_workers_disjoint_and_equal_batches(tmp_path, n_shards):
    pattern = _write_shards(tmp_path / "sh", n_shards)
    world, workers, bs = 2, 2, 4
    total = n_shards * PER_SHARD
    seen, batch_counts, shard_sets = [], [], []
    for rank in range(world):
        ds, per_worker, batches = _run_rank(pattern, rank, world, workers, bs, shuffle_buffer=8)
        assert ds.samples_per_rank == total // (world * bs) * bs == len(ds)
        assert sum(len(k) for k in per_worker) == ds.samples_per_rank
        assert all(len(k) % bs == 0 for k in per_worker)  # only full batches
        batch_counts.append(batches)
        for w in range(workers):
            shards, mod, res = ds.worker_split(w, workers)
            shard_sets.append((set(shards), mod, res))
        seen.append([set(k) for k in per_worker])
    assert batch_counts[0] == batch_counts[1] == total // (world * bs)
    flat = [s for rank in seen for s in rank]
    for a, b in itertools.combinations(flat, 2):
        assert not (a & b), "two consumers saw the same sample"
    if n_shards == 5:  # whole shards per worker, disjoint; 3 shards on rank 0, 2 on rank 1
        for (a, ma, _), (b, mb, _) in itertools.combinations(shard_sets, 2):
            assert ma == mb == 1 and not (a & b)
        assert sum(len(s) for s, _, _ in shard_sets) == 5
    else:  # one shard shared by all four consumers, split by sample
        assert {(m, r) for _, m, r in shard_sets} == {(4, 0), (4, 1), (4, 2), (4, 3)}


def test_uneven_rank_wraps_around_to_its_quota(tmp_path):
    pattern = _write_shards(tmp_path / "sh", 5)
    # rank 1 owns 2 shards (20 samples) but must yield as many as rank 0 (24): it wraps around
    ds, per_worker, _ = _run_rank(pattern, 1, 2, 1, 4, shuffle=False)
    keys = per_worker[0]
    assert len(keys) == 24 and len(set(keys)) == 20
    owned = {k.split("_")[0] for k in keys}
    assert len(owned) == 2


def test_order_is_reproducible_per_epoch(tmp_path):
    pattern = _write_shards(tmp_path / "sh", 4)

    def keys(epoch, seed=0):
        ds = ShardStream(pattern, rank=0, world_size=1, seed=seed, shuffle_buffer=16)
        ds.set_epoch(epoch)
        return [s.key for s in ds.iter_worker(0, 1)]

    e0 = keys(0)
    assert len(e0) == 40 and sorted(e0) == sorted(keys(1))
    assert e0 == keys(0)
    assert e0 != keys(1) and e0 != keys(0, seed=1)
    assert e0 != sorted(e0)  # sample level shuffle happened


def test_resampled_yields_requested_count(tmp_path):
    pattern = _write_shards(tmp_path / "sh", 3)
    ds = ShardStream(pattern, resampled=True, epoch_len=45, rank=0, world_size=1, batch_size=5)
    got = [s.key for s in ds.iter_worker(0, 1)]
    assert len(got) == 45 == len(ds)
    ds2 = ShardStream(pattern, resampled=True, epoch_len=45, rank=0, world_size=1, batch_size=5)
    assert [s.key for s in ds2.iter_worker(0, 1)] == got
    # two workers on two ranks: exact quotas
    ds3 = ShardStream(pattern, resampled=True, epoch_len=55, rank=1, world_size=2, batch_size=5)
    assert [len(list(ds3.iter_worker(w, 2))) for w in range(2)] == [15, 10]  # 5 batches
    # no epoch length: infinite
    inf = ShardStream(pattern, resampled=True, epoch_len=None, rank=0, world_size=1)
    inf.epoch_len = None
    assert len(list(itertools.islice(inf.iter_worker(0, 1), 100))) == 100


def test_epoch_length_required_for_multi_rank_without_sizes(tmp_path):
    pattern = _write_shards(tmp_path / "sh", 2, sizes=False)
    with pytest.raises(ValueError, match="epoch_len"):
        ShardStream(pattern, rank=0, world_size=2)
    single = ShardStream(pattern, rank=0, world_size=1)  # one plain pass
    assert len(list(single.iter_worker(0, 1))) == 20
    ok = ShardStream(pattern, rank=1, world_size=2, epoch_len=20, batch_size=2)
    assert len(list(ok.iter_worker(0, 1))) == 10


class _ToTensor:
    draft_size = (4, 4)

    def __call__(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)


def test_dataloader_with_workers_and_tuples(tmp_path):
    pattern = _write_shards(tmp_path / "sh", 3)
    ds = ShardStream(
        pattern, rank=0, world_size=1, batch_size=4, transform=_ToTensor(), output="tuple"
    )
    assert ds.source.draft_size == (4, 4)  # the transform's draft_size reaches open_image
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 30 // 4
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64


def test_draft_size_decodes_big_jpegs_smaller(tmp_path):
    root = tmp_path / "f" / "cls"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(root / "big.jpg")

    class Draft:
        draft_size = (100, 100)

        def __call__(self, img):
            return img.size

    assert FileDataset(tmp_path / "f", transform=Draft())[0].image == (128, 128)
    assert FileDataset(tmp_path / "f", transform=lambda im: im.size)[0].image == (512, 512)
    pack(tmp_path / "f", tmp_path / "sh")
    ds = ShardStream(tmp_path / "sh", transform=Draft(), rank=0, world_size=1)
    assert next(iter(ds)).image == (128, 128)


def test_file_dataset_skips_bad_items(tmp_path):
    root = tmp_path / "f"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(_png(1))
    (root / "a" / "1.png").write_bytes(b"\x89PNG broken")
    (root / "b" / "0.png").write_bytes(_png(2))
    ds = FileDataset(root, output="tuple", transform=_ToTensor())
    assert len(ds) == 3 and ds.classes == ["a", "b"]
    x, y = ds[1]  # broken -> the next good one (b/0, label 1)
    assert y == 1 and x.shape == (3, 8, 8)
    assert [k for k, _ in ds.skipped] == ["a/1"]
    s = FileDataset(root)[0]
    assert isinstance(s, Sample) and s.key == "a/0" and s.label == 0


def test_shuffle_buffer_is_a_permutation():
    import random

    out = list(shuffle_buffer(iter(range(100)), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(shuffle_buffer(iter(range(5)), 0, random.Random(0))) == list(range(5))


def test_unreadable_shards_raise_instead_of_looping(tmp_path):
    root = tmp_path / "sh"
    root.mkdir()
    with tarfile.open(root / "bad-000000.tar", "w") as tf:
        for j in range(3):
            info = tarfile.TarInfo(f"{j:03d}.jpg")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"junk"))
    (root / "missing-000000.tar").write_bytes(b"not a tar at all" * 100)
    ds = ShardStream(str(root / "bad-000000.tar"), epoch_len=8, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(ds.iter_worker(0, 1))
    assert len(ds.skipped) == 2  # rank 0 of 2 shares the one shard: samples 0 and 2
    ds = ShardStream(
        str(root / "missing-000000.tar"), epoch_len=8, rank=0, world_size=1, resampled=True
    )
    with pytest.raises(RuntimeError, match="gave no record"):
        list(ds.iter_worker(0, 1))


def test_array_transforms_get_arrays_from_folders_and_shards(tmp_path):
    """A transform that declares ``accepts_array`` receives (H, W, 3) uint8 pixels equal to the
    PIL image's; other transforms keep getting PIL images."""
    root = tmp_path / "f" / "cls"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a.jpg")

    class Arr:
        accepts_array = True

        def __call__(self, img):
            return img

    arr = FileDataset(tmp_path / "f", transform=Arr())[0].image
    pil = FileDataset(tmp_path / "f", transform=lambda im: im)[0].image
    assert isinstance(arr, np.ndarray) and arr.shape == (40, 56, 3) and arr.dtype == np.uint8
    assert isinstance(pil, Image.Image) and np.array_equal(arr, np.asarray(pil))
    pack(tmp_path / "f", tmp_path / "sh")
    shard = next(iter(ShardStream(tmp_path / "sh", transform=Arr(), rank=0, world_size=1))).image
    assert isinstance(shard, np.ndarray) and np.array_equal(shard, arr)


def test_skips_in_dataloader_workers_reach_the_run_summary(tmp_path):
    """Each worker holds its own copy of the dataset; with ``skipped.path`` set, the main process
    still sees every skip of the run, from folders and from shards."""
    from torch.utils.data import DataLoader

    from vssl.data.sources import SkipLog

    root = tmp_path / "f" / "c"
    root.mkdir(parents=True)
    for i in range(8):
        (root / f"{i}.png").write_bytes(_png(i) if i % 3 else b"not an image")  # 0, 3, 6 bad
    ds = FileDataset(tmp_path / "f", output="tuple", transform=_ToTensor())
    ds.skipped.path = tmp_path / "skipped.jsonl"
    list(DataLoader(ds, batch_size=2, num_workers=2))
    assert len(ds.skipped) == 0  # the workers' copies saw them, not this one
    log = SkipLog.read(tmp_path / "skipped.jsonl")
    assert sorted(k for k, _ in log) == ["c/0", "c/3", "c/6"] and len(log) == 3
    assert log.summary().startswith("3 skipped (3 not an image")

    import io
    import tarfile

    (tmp_path / "sh").mkdir()
    with tarfile.open(tmp_path / "sh" / "shard-000000.tar", "w") as tar:  # bad members kept
        for f in sorted(root.iterdir()):
            data = f.read_bytes()
            info = tarfile.TarInfo(f"c/{f.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    st = ShardStream(
        tmp_path / "sh",
        transform=_ToTensor(),
        output="tuple",
        rank=0,
        world_size=1,
        shuffle=False,
        epoch_len=5,
    )
    st.skipped.path = tmp_path / "skipped-shards.jsonl"
    list(DataLoader(st, batch_size=1, num_workers=2))
    # a worker that wraps around to fill its quota meets a bad member again: a set, not a list
    assert {k for k, _ in SkipLog.read(st.skipped.path)} == {
        "shard-000000.tar:c/0",
        "shard-000000.tar:c/3",
        "shard-000000.tar:c/6",
    }
    assert len(SkipLog.read(tmp_path / "missing.jsonl")) == 0
