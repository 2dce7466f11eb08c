"""Datasets for training: a streaming dataset over WebDataset shards, and a map-style one over files.

:class:`ShardStream` (``IterableDataset``) splits shards by rank (``torch.distributed`` when it is
initialized, else the ``rank``/``world_size`` arguments, else ``RANK``/``WORLD_SIZE``) and then by
DataLoader worker; shuffles deterministically from ``(seed, epoch)`` at shard level (the same
permutation on every rank, so the split stays disjoint) and at sample level (a shuffle buffer);
and, crucially for DDP, gives **every rank the same number of batches**: with an epoch length
``N`` (from ``sizes.json`` next to the shards, or ``epoch_len=``) each rank yields exactly
``N // (world_size * batch_size)`` batches of ``batch_size`` samples, split across its workers in
whole batches. A worker that runs out of shards starts over on them (reshuffled); one with a quota
met stops. Uneven shard counts therefore never leave one rank waiting in an all-reduce.

When there are fewer shards than ranks (or than a rank's workers), the shards are shared and split
by sample instead (sample ``i`` of the stream goes to consumer ``i % n``), so no consumer is empty.

``resampled=True``: each worker draws shards with replacement (seeded by seed, epoch, rank,
worker), forever, or up to the same per-rank quota when an epoch length is known.

Use the same ``batch_size`` in the DataLoader as here. ``set_epoch`` must be called before the
DataLoader iterator is created (with ``persistent_workers=True`` workers keep the epoch they were
started with, so leave that off or rebuild the loader).

:class:`FileDataset` is map-style over a folder, list or parquet manifest (``FolderDataset`` is an
alias). A bad image is recorded in ``skipped`` and replaced by the next good index, so a
DataLoader never sees an exception for it.

Both take ``transform`` (applied to the decoded RGB image; its ``draft_size`` attribute, if any,
is passed on to ``open_image`` so big JPEGs decode at reduced scale; a true ``accepts_array``
attribute makes the image an (H, W, 3) uint8 array instead of PIL) and ``output="sample"``
(a :class:`~vssl.data.sources.Sample` whose ``image`` is the transformed image) or ``"tuple"``
(``(image, label)``, label ``-1`` when unknown, ready for the default collate).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError
from .sources import (
    FileSource,
    Record,
    Sample,
    ShardSource,
    SkipLog,
    read_sizes,
    transform_accepts_array,
    transform_draft_size,
)

__all__ = ["FileDataset", "FolderDataset", "ShardStream", "dist_info", "shuffle_buffer"]

log = logging.getLogger(__name__)
OUTPUTS = ("sample", "tuple")


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit arguments, else torch.distributed, else RANK/WORLD_SIZE."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, ws = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, ws = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = ws if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
    return rank, world_size


def _rng(*parts) -> random.Random:
    # a str seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED
    return random.Random("/".join(str(p) for p in parts))


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Yield ``items`` in a shuffled order using a buffer of ``size`` (0 or 1: unchanged)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def _finish(sample: Sample, transform: Callable | None, output: str, skipped: SkipLog):
    """Apply the transform; None (recorded) when it fails."""
    if transform is not None:
        try:
            sample.image = transform(sample.image)
        except Exception as exc:  # noqa: BLE001 - one bad input, not a crashed run
            skipped.add(sample.key, f"transform failed: {type(exc).__name__}: {exc}")
            return None
    if output == "tuple":
        return sample.image, -1 if sample.label is None else sample.label
    return sample


class ShardStream(IterableDataset):
    """Stream samples from WebDataset shards for (distributed) training; see the module doc.

    ``shards``: a brace pattern, folder, list... (:func:`~vssl.data.sources.expand_shards`).
    ``epoch_len``: samples per epoch over all ranks; None reads ``sizes.json`` (required when
    ``world_size > 1`` and not resampled, so that ranks stay in step). ``batch_size``: the
    DataLoader's per-rank batch size (quotas are whole batches). ``shuffle_buffer``: samples held
    for sample-level shuffling per worker (0: off). ``rank``/``world_size``: override detection.
    """

    def __init__(
        self,
        shards,
        *,
        epoch_len: int | None = None,
        batch_size: int = 1,
        transform: Callable | None = None,
        output: str = "sample",
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        decode: bool = True,
        draft_size: tuple[int, int] | int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.source = ShardSource(
            shards,
            decode=decode,
            draft_size=draft_size or transform_draft_size(transform),
            max_pixels=max_pixels,
            as_array=decode and transform_accepts_array(transform),
        )
        self.shards = self.source.shards
        self.rank, self.world_size = dist_info(rank, world_size)
        self.batch_size = batch_size
        self.transform, self.output = transform, output
        self.seed, self.epoch = seed, 0
        self.shuffle, self.buffer_size, self.resampled = shuffle, shuffle_buffer, resampled
        if epoch_len is None:
            sizes = read_sizes(self.shards)
            epoch_len = sum(sizes.values()) if sizes is not None else None
        if epoch_len is None and self.world_size > 1 and not resampled:
            raise ValueError(
                "ShardStream needs the epoch length for world_size > 1 (every rank must yield the "
                "same number of batches): write sizes.json next to the shards (`vssl data pack` "
                "does) or pass epoch_len=<samples per epoch>"
            )
        self.epoch_len = epoch_len
        if epoch_len is not None and self.batches_per_rank == 0:
            raise ValueError(
                f"epoch_len {epoch_len} is smaller than one batch per rank "
                f"({self.world_size} ranks x batch {batch_size})"
            )

    @property
    def skipped(self) -> SkipLog:
        return self.source.skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def batches_per_rank(self) -> int | None:
        if self.epoch_len is None:
            return None
        return self.epoch_len // (self.world_size * self.batch_size)

    @property
    def samples_per_rank(self) -> int | None:
        b = self.batches_per_rank
        return None if b is None else b * self.batch_size

    def worker_quota(self, worker: int, num_workers: int) -> int | None:
        """Samples worker ``worker`` of ``num_workers`` yields this epoch (None: one pass / forever)."""
        b = self.batches_per_rank
        if b is None:
            return None
        return (b // num_workers + (worker < b % num_workers)) * self.batch_size

    def __len__(self) -> int:
        if self.samples_per_rank is None:
            raise TypeError("length unknown: pass epoch_len or provide sizes.json")
        return self.samples_per_rank

    # -- splitting
    def shard_order(self) -> list[str]:
        """This epoch's shard permutation: the same on every rank and worker."""
        order = list(self.shards)
        if self.shuffle:
            _rng(self.seed, self.epoch, "shards").shuffle(order)
        return order

    def worker_split(self, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shards, modulus, residue): the worker reads ``shards`` and keeps stream sample ``i``
        when ``i % modulus == residue`` (modulus 1 when it has whole shards of its own)."""
        order = self.shard_order()
        ws, r = self.world_size, self.rank
        if len(order) >= ws:
            mine, mod, res = order[r::ws], 1, 0
        else:
            mine, mod, res = order, ws, r
        if len(mine) >= num_workers:
            return mine[worker::num_workers], mod, res
        # fewer shards than workers: share them, split by sample (i % mod == res, then by worker)
        return mine, mod * num_workers, res + mod * worker

    # -- iteration
    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator:
        """What DataLoader worker ``worker`` of ``num_workers`` yields (callable directly in tests)."""
        quota = self.worker_quota(worker, num_workers)
        if quota == 0:
            return
        state = {"produced": 0}
        if self.resampled:
            records = self._resampled_records(worker, state, quota)
        else:
            records = self._epoch_records(worker, num_workers, state, quota)
        for rec in records:
            s = self.source.to_sample(rec)
            if s is None:
                continue
            out = _finish(s, self.transform, self.output, self.skipped)
            if out is None:
                continue
            yield out
            state["produced"] += 1
            if quota is not None and state["produced"] >= quota:
                return

    def _guard(self, state: dict, stale: list) -> None:
        """Resampled mode: raise when records keep coming but none is usable (all-bad shards
        would otherwise loop forever)."""
        if state["produced"] != stale[0]:
            stale[0], stale[1] = state["produced"], 0
            return
        stale[1] += 1
        if stale[1] > self.buffer_size + 10_000:
            raise RuntimeError(
                f"rank {self.rank}: {stale[1]} records read without one usable sample; the "
                f"shards are unreadable ({self.skipped.summary()})"
            )

    def _epoch_records(
        self, worker: int, num_workers: int, state: dict, quota: int | None
    ) -> Iterator[Record]:
        shards, mod, res = self.worker_split(worker, num_workers)
        if not shards:
            if quota:
                raise RuntimeError(f"rank {self.rank} worker {worker}: no shards to read")
            return
        pass_no = 0
        while True:
            before = state["produced"]
            order = list(shards)
            if pass_no and self.shuffle:
                _rng(self.seed, self.epoch, self.rank, worker, "pass", pass_no).shuffle(order)
            # the shuffle buffer drains at the end of each pass, so one epoch without wrap-around
            # yields every sample of the worker's share exactly once
            mine = (rec for i, rec in enumerate(self.source.records(order)) if i % mod == res)
            rng = _rng(self.seed, self.epoch, self.rank, worker, "samples", pass_no)
            yield from shuffle_buffer(mine, self._buffer(), rng)
            # here the consumer has handled every record of the pass (it resumed us after each)
            if quota is None:
                return
            if state["produced"] == before:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: a whole pass over its shards gave no "
                    f"usable sample, so it cannot fill its quota of {quota} "
                    f"({self.skipped.summary()})"
                )
            pass_no += 1
            if pass_no == 1:
                log.debug("rank %d worker %d wraps around its shards", self.rank, worker)

    def _resampled_records(self, worker: int, state: dict, quota: int | None) -> Iterator[Record]:
        rng = _rng(self.seed, self.epoch, self.rank, worker, "resample")
        stale = [0, 0]

        def draws():
            empty = 0
            while True:
                n = 0
                for rec in self.source.records([rng.choice(self.shards)]):
                    n += 1
                    yield rec
                empty = 0 if n else empty + 1
                if empty > 100 + 10 * len(self.shards):
                    raise RuntimeError(
                        f"rank {self.rank}: {empty} shard draws in a row gave no "
                        f"record ({self.skipped.summary()})"
                    )

        buf_rng = _rng(self.seed, self.epoch, self.rank, worker, "samples")
        for rec in shuffle_buffer(draws(), self._buffer(), buf_rng):
            yield rec
            self._guard(state, stale)

    def _buffer(self) -> int:
        return self.buffer_size if self.shuffle else 0


class FileDataset(Dataset):
    """Map-style dataset over a folder (class subfolders = labels), ``.txt`` list or parquet
    manifest; item ``i`` is a Sample (or ``(image, label)``), see the module doc."""

    def __init__(
        self,
        path,
        *,
        transform: Callable | None = None,
        output: str = "sample",
        draft_size: tuple[int, int] | int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_retries: int = 100,
    ):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.source = (
            path
            if isinstance(path, FileSource)
            else FileSource(
                path,
                draft_size=draft_size or transform_draft_size(transform),
                max_pixels=max_pixels,
                as_array=transform_accepts_array(transform),
            )
        )
        self.transform, self.output, self.max_retries = transform, output, max_retries

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def skipped(self) -> SkipLog:
        return self.source.skipped

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        n = len(self.source)
        for step in range(min(self.max_retries, n)):
            j = (i + step) % n
            try:
                s = self.source.load(j)
            except ImageDecodeError as exc:
                self.skipped.add(self.source.items[j].key, exc.reason, source=exc.path)
                continue
            out = _finish(s, self.transform, self.output, self.skipped)
            if out is not None:
                return out
        raise RuntimeError(
            f"no readable image in {min(self.max_retries, n)} items from index {i} "
            f"({self.skipped.summary()})"
        )


FolderDataset = FileDataset
