"""Deterministic multi-crop batches for training, so that a resumed run sees exactly the same data.

Batch ``step`` of data epoch ``epoch`` on rank ``rank`` is a pure function of ``(seed, epoch,
step, rank)`` and the dataset:

- map-style sources (image folder, path list, parquet manifest): the epoch's order is a seeded
  permutation of the whole dataset (the same on every rank); rank ``r``'s batch ``s`` holds the
  indices ``perm[(s * world_size + r) * B : ... + B]`` (the tail that does not fill a batch on every
  rank is dropped, so all ranks take the same number of steps). Resuming at ``start_step`` is
  index arithmetic: nothing before it is decoded or augmented.
- shards (WebDataset tars): :class:`vssl.data.ShardStream` with ``set_epoch(epoch)`` (same number of
  batches on every rank). Worker ``w`` of ``W`` produces batches ``w, w + W, ...``; resuming
  mid-epoch restarts the epoch's stream and drops the first ``start_step`` batches at a batch
  boundary: their images are read and decoded again, but not cropped or collated. Exact resume
  needs the same ``num_workers`` (the split of shards over workers fixes the order).

Random crops use a per-sample generator seeded from ``(seed, epoch, index)`` (the dataset index; for
shards, the sample's position in the rank's epoch stream), masks a per-batch generator seeded
from ``(seed, epoch, step, rank)``, photometric augmentation another per-batch generator. None of it
touches the global RNGs, so DataLoader worker seeding and the number of workers do not change what
a map-style batch contains.

Geometry (crops, uint8) runs in the DataLoader workers, one whole batch per worker task; the
photometric half runs batched on the training device in the main process (docs/architecture.md, Performance).
"""

from __future__ import annotations

import atexit
import hashlib
import random
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..data.sources import FileSource, is_shard_spec
from ..data.stream import FileDataset, ShardStream, dist_info
from ..data.views import MissingViewError, ViewSpec, build_views

__all__ = ["TrainData", "derive_seed"]

_DEFAULT = object()


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across runs, processes and PYTHONHASHSEED)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _py_rng(*parts: Any) -> random.Random:
    return random.Random(derive_seed(*parts))


def _ignore_interrupts(worker_id: int) -> None:
    """Loader workers ignore SIGINT / SIGTERM: a terminal's Ctrl-C (sent to the whole process
    group) or a scheduler's SIGTERM to every process must reach the trainer only, which finishes
    its step, checkpoints and then closes the loader (workers also exit when their parent dies)."""
    import signal

    for name in ("SIGINT", "SIGTERM"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


#: Loader iterators with worker processes that may still be running (see _stop_workers_at_exit).
_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    """Shut down the workers of loaders still open when the interpreter exits.

    Workers ignore SIGTERM (:func:`_ignore_interrupts`). When an error escapes while a loader is
    open, its traceback keeps the loader alive past the exit handlers, and multiprocessing's own
    exit handler would SIGTERM the workers and then wait for them forever: the command hung
    after printing its error. This handler runs before that one (atexit is last in, first out,
    and importing torch above registered multiprocessing's) and stops them the way a finished
    loader does."""
    for it in list(_LIVE_LOADERS):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _iterate(loader: DataLoader) -> Iterator:
    """``iter(loader)``, registered for :func:`_stop_workers_at_exit` when it has workers."""
    it = iter(loader)
    if loader.num_workers:
        _LIVE_LOADERS.add(it)
    return it


class _PassThrough:
    """Declares how sources should decode for the views (draft size, arrays); changes nothing."""

    def __init__(self, views: Any):
        self.draft_size = views.draft_size
        self.accepts_array = views.accepts_array

    def __call__(self, image):
        return image


class _Collator:
    """Views + collation of one batch, seeded as the module docstring says (runs in workers)."""

    def __init__(self, views: Any, seed: int, rank: int, captions: Any = None):
        self.views = views
        self.seed, self.rank = seed, rank
        self.captions = captions  # a _TemplateCaptions, or None: the samples' own

    def caption(self, sample: Any, epoch: int, sid: Any) -> str | None:
        if self.captions is None:
            return getattr(sample, "caption", None)
        return self.captions(sample.label, _py_rng(self.seed, epoch, "caption", sid))

    def __call__(
        self, epoch: int, step: int, samples: Sequence[Any], sample_ids: Sequence[Any]
    ) -> dict:
        views = [
            self.views.sample(s.image, _py_rng(self.seed, epoch, "crop", sid))
            for s, sid in zip(samples, sample_ids)
        ]
        return self.views.collate(
            views,
            [s.label for s in samples],
            [self.caption(s, epoch, sid) for s, sid in zip(samples, sample_ids)],
            _py_rng(self.seed, epoch, step, self.rank, "masks"),
        )


class _MapBatches(Dataset):
    """Item ``(epoch, step, indices)`` -> ``(step, collated uint8 batch)``."""

    def __init__(self, dataset: FileDataset, collator: _Collator):
        self.dataset, self.collator = dataset, collator

    def __len__(self) -> int:  # not used for indexing; DataLoader asks for it with a sampler
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, list[int]]):
        epoch, step, indices = key
        batch = self.collator(epoch, step, [self.dataset[i] for i in indices], indices)
        return step, batch


class _StreamBatches(IterableDataset):
    """This worker's batches of ``stream`` for ``epoch``, from global step ``start_step`` on."""

    def __init__(
        self,
        stream: ShardStream,
        collator: _Collator,
        batch_size: int,
        epoch: int,
        start_step: int,
        num_workers: int,
    ):
        self.stream, self.collator = stream, collator
        self.batch_size, self.epoch, self.start_step = batch_size, epoch, start_step
        self.num_workers = max(1, num_workers)

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        self.stream.set_epoch(self.epoch)
        local, pending = 0, []
        for sample in self.stream.iter_worker(worker, self.num_workers):
            pending.append(sample)
            if len(pending) < self.batch_size:
                continue
            step = local * self.num_workers + worker
            local += 1
            if step >= self.start_step:
                ids = [(step, j) for j in range(len(pending))]
                batch = self.collator(self.epoch, step, pending, ids)
                yield step, batch
            pending = []


def _identity(x):
    return x


#: ``data.captions`` values: None (the samples' own: parquet ``text``, shard ``.txt``) or
#: ``templates`` (a labelled folder's class names in CLIP's prompts, one drawn per sample).
CAPTION_MODES = (None, "templates")


class _TemplateCaptions:
    """Captions made from class names: ``template.format(classes[label])`` with a template drawn
    per sample (seeded, so batches stay a function of the step). Not real captions: the run
    reports them as templates."""

    def __init__(self, classes: Sequence[str]):
        from ..evaluate.zeroshot import TEMPLATE_SETS

        self.classes = [c.replace("_", " ") for c in classes]
        self.templates = TEMPLATE_SETS["clip7"] + TEMPLATE_SETS["simple"]

    def __call__(self, label: Any, rng: random.Random) -> str | None:
        if label is None or not 0 <= int(label) < len(self.classes):
            return None
        return rng.choice(self.templates).format(self.classes[int(label)])

    def all_texts(self) -> list[str]:
        return [t.format(c) for c in self.classes for t in self.templates]


class TrainData:
    """Training batches of the views a method declares, ready on ``device``.

    ``views``: the method's :class:`~vssl.data.views.ViewSpec` (``method.views()``); None: DINOv2's
    multi-crop, with block masks on the ``patch_size`` grid when ``patch_size`` is given. The
    crop settings (``global_*``, ``local_*``, ``n_local``) size the views (a single view uses the
    global ones); ``photometric`` is the multi-crop colour recipe (default DINOv2's, None: normalize
    only). Image–text views (``captions=True``) are refused here when the data has no captions.

    ``source``: an image folder, ``.txt`` list or parquet manifest (map-style), or shards (a
    ``.tar`` path, brace pattern or folder of tars; a :class:`FileSource` or
    :class:`ShardStream` also works). ``batch_size``: per rank. ``patch_size``: the backbone's, to
    size masks on the ``global_size // patch_size`` grid.
    ``batches_per_epoch``: required for resampled shard streams without an epoch length.
    ``rank``/``world_size``: default to the process group or torchrun's environment.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        global_size: int = 224,
        local_size: int = 98,
        n_local: int = 8,
        global_scale: Sequence[float] = (0.32, 1.0),
        local_scale: Sequence[float] = (0.05, 0.32),
        patch_size: int | None = None,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        photometric: Any = _DEFAULT,
        seed: int = 0,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        rank: int | None = None,
        world_size: int | None = None,
        batches_per_epoch: int | None = None,
        epoch_len: int | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        views: ViewSpec | None = None,
        captions: str | None = None,
    ):
        if captions not in CAPTION_MODES:
            raise ValueError(
                f"captions must be one of {CAPTION_MODES} (data.captions), got {captions!r}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.device = torch.device(device)
        self.rank, self.world_size = dist_info(rank, world_size)
        if views is None:  # DINOv2's multi-crop, block masks when patch_size is given
            views = ViewSpec(
                "multicrop",
                mask="block" if patch_size is not None else None,
                mask_ratio=tuple(mask_ratio),
                mask_probability=mask_probability,
                patch_size=patch_size,
            )
        self.spec = views
        if photometric is _DEFAULT:
            photometric = True
        self.views = build_views(
            views,
            global_size=global_size,
            local_size=local_size,
            n_local=n_local,
            global_scale=global_scale,
            local_scale=local_scale,
            photometric=photometric,
        )

        self.stream: ShardStream | None = None
        self.dataset: FileDataset | None = None
        decode = _PassThrough(self.views)
        if isinstance(source, ShardStream):
            self.stream = source
        elif isinstance(source, FileSource):
            self.dataset = FileDataset(source, output="sample")
        elif is_shard_spec(source):
            self.stream = ShardStream(
                source,
                epoch_len=epoch_len,
                batch_size=self.batch_size,
                transform=decode,
                output="sample",
                seed=self.seed,
                shuffle_buffer=shuffle_buffer,
                resampled=resampled,
                rank=self.rank,
                world_size=self.world_size,
            )
        else:
            src = FileSource(
                source, draft_size=self.views.draft_size, as_array=self.views.accepts_array
            )
            self.dataset = FileDataset(src, output="sample")
        if self.stream is not None:
            if self.stream.batch_size != self.batch_size:
                raise ValueError(
                    f"the ShardStream's batch_size {self.stream.batch_size} differs "
                    f"from batch_size {self.batch_size}: build it with the same one"
                )
            known = self.stream.batches_per_rank
            if known is not None and batches_per_epoch is not None and batches_per_epoch != known:
                raise ValueError(
                    f"batches_per_epoch={batches_per_epoch} contradicts the shards' "
                    f"epoch length ({known} batches per rank); leave it out"
                )
            self._batches_per_epoch = known if known is not None else batches_per_epoch
            if self._batches_per_epoch is None:
                raise ValueError(
                    "the shard stream has no epoch length: pass batches_per_epoch= "
                    "(or epoch_len=, or write sizes.json next to the shards)"
                )
        else:
            n = len(self.dataset)
            full = n // (self.batch_size * self.world_size)
            if full == 0:
                raise ValueError(
                    f"{n} images cannot fill one batch of {self.batch_size} on each of "
                    f"{self.world_size} ranks: lower batch_size or add images"
                )
            if batches_per_epoch is not None and not 1 <= batches_per_epoch <= full:
                raise ValueError(
                    f"batches_per_epoch must be in [1, {full}] for {n} images, got "
                    f"{batches_per_epoch}"
                )
            self._batches_per_epoch = batches_per_epoch or full

        templates = None
        if captions == "templates":
            classes = self.dataset.classes if self.dataset is not None else []
            if not classes:
                raise ValueError(
                    "data.captions=templates makes captions from class names, but the training "
                    "data has none: give a folder with one subfolder per class (or drop "
                    "data.captions to use the data's own captions)"
                )
            templates = _TemplateCaptions(classes)
        self.templates = templates
        self.collator = _Collator(self.views, self.seed, self.rank, templates)
        if self.spec.captions:
            self._check_captions()

    def _check_captions(self) -> None:
        """Refuse data without captions for an image–text method, before the first step
        (map-style sources: every item, read from the listing without decoding an image)."""
        if self.dataset is not None:
            items = self.dataset.source.items
            if self.templates is not None:
                missing = [it.key for it in items if it.label is None]
            else:
                missing = [it.key for it in items if not it.caption]
            total = len(items)
        else:
            probe = []
            for sample in self.stream.iter_worker(0, 1):
                probe.append(sample)
                if len(probe) >= 8:
                    break
            missing = [s.key for s in probe if not getattr(s, "caption", None)]
            total = len(probe)
        if missing:
            what = "training samples" if self.dataset is not None else "first training samples"
            raise MissingViewError(
                f"the method needs image + caption pairs, but {len(missing)} of the {total} "
                f"{what} have no caption (e.g. {missing[0]}): give a parquet manifest with a "
                "'text' column, shards with key.txt members, or, for a folder with one "
                "subfolder per class, data.captions=templates (class names in prompt templates)"
            )

    def caption_texts(self, limit: int = 200_000) -> list[str]:
        """Up to ``limit`` training captions (to train a tokenizer): every template x class
        with ``data.captions=templates``, the listing's captions for map-style sources, the
        ``.txt`` members of the shards in stream order otherwise."""
        if self.templates is not None:
            return self.templates.all_texts()[:limit]
        if self.dataset is not None:
            return [it.caption for it in self.dataset.source.items if it.caption][:limit]
        out = []
        for sample in self.stream.iter_worker(0, 1):
            if getattr(sample, "caption", None):
                out.append(sample.caption)
            if len(out) >= limit:
                break
        return out

    # -- sizes
    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def __len__(self) -> int:
        return self._batches_per_epoch

    @property
    def skipped(self):
        """Unreadable images seen in this process (workers keep their own logs)."""
        return (self.stream or self.dataset).skipped

    # -- planning (map-style)
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of dataset indices (the same on every rank)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "order"))
        return torch.randperm(len(self.dataset), generator=g)

    def batch_indices(self, epoch: int, step: int, order: torch.Tensor | None = None) -> list[int]:
        """Dataset indices of this rank's batch ``step`` of ``epoch``."""
        order = self.epoch_order(epoch) if order is None else order
        start = (step * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size].tolist()

    # -- iteration
    def _loader(self, dataset, sampler=None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=workers,
            collate_fn=_identity,
            worker_init_fn=_ignore_interrupts,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
        )

    def _uint8_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, dict]]:
        n = self._batches_per_epoch
        if self.dataset is not None:
            order = self.epoch_order(epoch)
            keys = [(epoch, s, self.batch_indices(epoch, s, order)) for s in range(start_step, n)]
            yield from _iterate(
                self._loader(_MapBatches(self.dataset, self.collator), sampler=keys)
            )
            return
        data = _StreamBatches(
            self.stream, self.collator, self.batch_size, epoch, start_step, self.num_workers
        )
        # workers finish in their own time: hand batches on in step order
        pending: dict[int, dict] = {}
        expected = start_step
        for step, batch in _iterate(self._loader(data)):
            pending[step] = batch
            while expected in pending:
                yield expected, pending.pop(expected)
                expected += 1
            if expected >= n:
                return
        if pending:
            raise RuntimeError(
                f"shard stream epoch {epoch}: batches {sorted(pending)} arrived "
                f"without batch {expected}"
            )

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """This rank's batches ``start_step..`` of data epoch ``epoch``, ready for the method:
        float normalized ``global``/``local`` crops (photometric applied) and masks, on ``device``."""
        if not 0 <= start_step <= self._batches_per_epoch:
            raise ValueError(
                f"start_step must be in [0, {self._batches_per_epoch}], got {start_step}"
            )
        for step, batch in self._uint8_batches(epoch, start_step):
            batch = {
                k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()
            }
            g = torch.Generator().manual_seed(
                derive_seed(self.seed, epoch, step, self.rank, "photometric")
            )
            yield self.views.finish(batch, generator=g)

    def __repr__(self) -> str:
        kind = "shards" if self.stream is not None else f"{len(self.dataset)} images"
        return (
            f"TrainData({kind}, batch_size={self.batch_size}, rank={self.rank}/"
            f"{self.world_size}, batches_per_epoch={self._batches_per_epoch}, "
            f"views={self.spec.kind} {self.views!r}, workers={self.num_workers})"
        )
