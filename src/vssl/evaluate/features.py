"""Frozen features for the evaluation protocols: read a `vssl embed` folder, or embed and cache.

Every protocol gets its inputs the same way: ``--train``/``--test`` name ``vssl embed`` output
folders, or, with ``--model``, image folders / list files that are embedded on the fly into a cache
folder (``--cache``, default ``$VSSL_CACHE/features`` or ``~/.cache/vssl/features``) and re-used by
the next run with the same model, weights, resolution, dtype and input files.

A cache folder is keyed by what decides the feature *values* (model and weights files with their
sizes and mtimes, resolution, dtype, every input path with its label, size and mtime), not by which
outputs were asked for: a folder holds the union of what runs needed (``layers.npy`` with the most
blocks asked for so far, ``avgpool.npy``, ``patch_tokens.npy``), so ``vssl eval knn`` then
``vssl eval linear`` embed the images twice only because linear needs more, and a later knn run
re-uses linear's folder. A folder is always written whole: embedded into a temporary folder, then
renamed into place.

A folder's ``embed.json`` (written by ``vssl embed`` and the cache) says which network made the
features (model, weights, seed, a digest of the parameters); when the splits of one command come
from different networks, ``features_from_args`` warns.

Every user-facing problem is raised as a ``ValueError`` whose message says what to change, so a
protocol's ``run`` can turn it into ``vssl eval NAME: error: ...`` with one ``except``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Features",
    "add_feature_args",
    "default_cache_dir",
    "features_cache_key",
    "features_from_args",
    "load_features",
]

EMBEDDINGS = "embeddings.npy"
LAYERS = "layers.npy"
AVGPOOL = "avgpool.npy"
PATCH_TOKENS = "patch_tokens.npy"
MANIFEST = "manifest.parquet"
CACHE_INFO = "cache.json"
EMBED_INFO = "embed.json"
# Part of every cache key: bump it when a change to the embedding pipeline changes feature values,
# so old cache folders are no longer matched. 2: no --resolution means the family's evaluation
# resolution (DINOv2: 224), no longer the model's img_size; random inits are seeded.
CACHE_FORMAT = 2


@dataclass
class Features:
    """One split's features, row ``i`` of every array = image ``paths[i]``."""

    cls: np.ndarray  # (N, D) float32: x_norm_clstoken
    paths: list[str]  # absolute image paths, row order
    labels: np.ndarray | None = None  # (N,) int64 indices into `classes`; None when unlabeled
    classes: list[str] | None = None  # sorted class names (first-level subfolder names)
    # (N, L, D) normed CLS tokens of the last L blocks, oldest first (read-only memmap from disk)
    layers: np.ndarray | None = None
    avgpool: np.ndarray | None = None  # (N, D) mean of the last block's normed patch tokens
    patch_tokens: np.ndarray | None = None  # (N, P, D) read-only memmap from disk
    source: str = ""  # what the user named (features folder or image folder), for results
    features_dir: str | None = None  # the folder the arrays came from (`source` or a cache folder)
    provenance: dict | None = None  # embed.json: model, weights, seed, weights_digest, resolution

    def __post_init__(self):
        if self.cls.ndim != 2:
            raise ValueError(f"cls features must be (N, D), got shape {self.cls.shape}")
        n, d = self.cls.shape
        if len(self.paths) != n:
            raise ValueError(f"{len(self.paths)} paths for {n} feature rows")
        if self.labels is not None:
            if self.labels.shape != (n,):
                raise ValueError(f"labels must be ({n},), got shape {self.labels.shape}")
            if self.classes is None:
                raise ValueError("labels given without classes")
        for name, ndim in (("layers", 3), ("avgpool", 2), ("patch_tokens", 3)):
            a = getattr(self, name)
            if a is not None and (a.ndim != ndim or a.shape[0] != n or a.shape[-1] != d):
                raise ValueError(
                    f"{name} has shape {a.shape}, expected {ndim} dims with {n} rows and width {d} "
                    f"like the CLS features{_where(self)}"
                )

    def __len__(self) -> int:
        return self.cls.shape[0]

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def require(
        self,
        *,
        labels: bool = False,
        layers: int = 0,
        avgpool: bool = False,
        patch_tokens: bool = False,
    ) -> Features:
        """Check that what a protocol needs is here (else a ValueError saying how to make it);
        returns these features with ``layers`` cut to the last ``layers`` blocks."""
        hint = " (or pass --model to embed the images on the fly)"
        if labels and self.labels is None:
            raise ValueError(
                f"{self.source or 'the features'} have no labels: classification needs the images "
                "in class subfolders (DIR/<class>/<image>), which `vssl embed` records as labels"
            )
        out = self
        if layers:
            if self.layers is None:
                raise ValueError(
                    f"{self.source} has no {LAYERS}: re-run `vssl embed` with "
                    f"--layers {layers}{hint}"
                )
            have = self.layers.shape[1]
            if have < layers:
                raise ValueError(
                    f"{self.source}/{LAYERS} holds the last {have} blocks, {layers} "
                    f"are needed: re-run `vssl embed` with --layers {layers}{hint}"
                )
            if have > layers:
                out = dataclasses.replace(out, layers=self.layers[:, have - layers :])
        if avgpool and self.avgpool is None:
            raise ValueError(
                f"{self.source} has no {AVGPOOL}: re-run `vssl embed` with --avgpool{hint}"
            )
        if patch_tokens and self.patch_tokens is None:
            raise ValueError(
                f"{self.source} has no {PATCH_TOKENS}: re-run `vssl embed` with "
                f"--patch-tokens{hint}"
            )
        return out


def _where(f: Features) -> str:
    return f" in {f.features_dir or f.source}" if (f.features_dir or f.source) else ""


# ------------------------------------------------------------------------------------ reading
def _label_indices(raw: list[str | None], classes: list[str] | None, where: str):
    """Manifest labels -> (int64 indices, classes); (None, None) for an unlabeled split."""
    missing = [i for i, lab in enumerate(raw) if lab is None]
    if len(missing) == len(raw):
        return None, None
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(raw)} images in {where} have no label (files directly in the "
            f"input folder, e.g. row {missing[0]}): put every image in a class subfolder, or none"
        )
    if classes is None:
        classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(
            f"{where}: label(s) {shown} not among the {len(classes)} training classes: the splits "
            "must use the same class subfolder names"
        )
    return np.fromiter((index[lab] for lab in raw), dtype=np.int64, count=len(raw)), list(classes)


def _load_rows(path: Path, n: int, what: str, mmap: bool) -> np.ndarray:
    a = np.load(path, mmap_mode="r" if mmap else None)
    if a.shape[0] != n:
        raise ValueError(
            f"{path} has {a.shape[0]} rows but {EMBEDDINGS} has {n}: the folder "
            f"mixes two runs; re-run `vssl embed` (with {what}) into a clean folder"
        )
    return a


def load_features(
    path: str | os.PathLike, *, classes: list[str] | None = None, source: str | None = None
) -> Features:
    """Read a ``vssl embed`` output folder.

    ``classes`` (e.g. the train split's) fixes the label indices, so a test split maps to the same
    classes; a label outside them is a ValueError naming it. ``layers.npy`` and
    ``patch_tokens.npy`` are read-only memory maps (they can be far larger than RAM); the CLS
    features and ``avgpool.npy`` are read into memory.
    """
    import pyarrow.parquet as pq

    d = Path(path)
    if not d.exists():
        raise ValueError(f"features folder not found: {d}")
    if not d.is_dir() or not (d / EMBEDDINGS).is_file():
        raise ValueError(
            f"{d} is not a `vssl embed` output folder (no {EMBEDDINGS}): run `vssl embed MODEL "
            f"--input IMAGES --output DIR` and pass DIR, or pass --model to embed on the fly"
        )
    if not (d / MANIFEST).is_file():
        raise ValueError(
            f"{d} has {EMBEDDINGS} but no {MANIFEST}: the embed run did not finish; "
            "re-run `vssl embed`"
        )
    cls = np.load(d / EMBEDDINGS)
    if cls.ndim != 2:
        raise ValueError(f"{d / EMBEDDINGS} has shape {cls.shape}, expected (N, D)")
    cls = cls.astype(np.float32, copy=False)
    n = cls.shape[0]
    table = pq.read_table(d / MANIFEST).to_pydict()
    for col in ("row", "path", "label"):
        if col not in table:
            raise ValueError(f"{d / MANIFEST} has no {col!r} column: not written by `vssl embed`")
    if len(table["path"]) != n:
        raise ValueError(
            f"{d / EMBEDDINGS} has {n} rows but {MANIFEST} lists "
            f"{len(table['path'])} images: the folder mixes two runs; re-run "
            "`vssl embed` into a clean folder"
        )
    if table["row"] != list(range(n)):
        raise ValueError(f"{d / MANIFEST}: the row column is not 0..{n - 1} in order")
    labels, classes = _label_indices(table["label"], classes, str(d))

    def optional(name: str, option: str, mmap: bool) -> np.ndarray | None:
        return _load_rows(d / name, n, option, mmap) if (d / name).is_file() else None

    layers = optional(LAYERS, "--layers", mmap=True)
    avgpool = optional(AVGPOOL, "--avgpool", mmap=False)
    tokens = optional(PATCH_TOKENS, "--patch-tokens", mmap=True)
    provenance = None
    if (d / EMBED_INFO).is_file():  # folders from before embed.json have none: nothing to compare
        try:
            provenance = json.loads((d / EMBED_INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            provenance = None
    return Features(
        cls=cls,
        paths=list(table["path"]),
        labels=labels,
        classes=classes,
        layers=layers,
        avgpool=avgpool,
        patch_tokens=tokens,
        source=str(d) if source is None else source,
        features_dir=str(d),
        provenance=provenance if isinstance(provenance, dict) else None,
    )


def _describe(p: dict) -> str:
    parts = [f"model {p.get('model')}"]
    if p.get("weights"):
        parts.append(f"weights {p['weights']}")
    if p.get("seed") is not None:
        parts.append(f"random init, seed {p['seed']}")
    if p.get("overrides"):
        parts.append(f"overrides {p['overrides']}")
    if p.get("weights_digest"):
        parts.append(f"weights digest {p['weights_digest']}")
    return ", ".join(parts)


def provenance_mismatch(a: Features, b: Features) -> str | None:
    """Why the features ``a`` and ``b`` come from different networks (or resolutions), or None
    when they match or a folder does not say (written before ``embed.json`` existed)."""
    pa, pb = a.provenance, b.provenance
    if not pa or not pb:
        return None
    if pa.get("weights_digest") and pb.get("weights_digest"):
        same_net = pa["weights_digest"] == pb["weights_digest"]
    else:
        keys = ("model", "weights", "seed", "overrides")
        same_net = all(pa.get(k) == pb.get(k) for k in keys)
    if not same_net:
        return (
            f"the features come from different models/weights: {a.source}: {_describe(pa)}; "
            f"{b.source}: {_describe(pb)}. Scores across them measure nothing: embed both with "
            "the same model and weights (and the same --seed for --random-init)"
        )
    if pa.get("resolution") != pb.get("resolution"):
        return (
            f"the features were embedded at different resolutions: {a.source} at "
            f"{pa.get('resolution')}, {b.source} at {pb.get('resolution')}"
        )
    return None


# ------------------------------------------------------------------------------------ arguments
def default_cache_dir() -> Path:
    """``$VSSL_CACHE/features``, else ``$XDG_CACHE_HOME/vssl/features``, else
    ``~/.cache/vssl/features``."""
    if os.environ.get("VSSL_CACHE"):
        return Path(os.environ["VSSL_CACHE"]).expanduser() / "features"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vssl" / "features"


def add_feature_args(parser: argparse.ArgumentParser, splits=("train", "test")) -> None:
    """``--train/--test`` (one option per split) and the options that embed them on the fly.

    An option the protocol already defined (e.g. its own ``--device`` or ``--batch-size``) is kept
    and shared with embedding rather than added twice (argparse would refuse the duplicate).
    """
    g = parser.add_argument_group(
        "features",
        "the splits are `vssl embed` output folders; with --model they are image\n"
        "folders or list files, embedded on the fly and cached in --cache",
    )
    have = parser._option_string_actions  # argparse keeps no public list of defined options

    def add(flag, **kw):
        if flag not in have:
            g.add_argument(flag, **kw)

    for split in splits:
        add(
            f"--{split}",
            required=True,
            metavar="DIR",
            help=f"{split} split: a `vssl embed` output folder, or with --model an image folder "
            "(class subfolders = labels) or .txt list",
        )
    add(
        "--model",
        default=None,
        metavar="MODEL",
        help="embed the splits with this model: a zoo name (`vssl models`) or a checkpoint "
        "(default: the splits are already `vssl embed` folders)",
    )
    add("--weights", default=None, metavar="PATH", help="weights for a zoo-name --model")
    add(
        "--random-init",
        action="store_true",
        help="allow a zoo --model without --weights (random weights, seeded with 0 like "
        "`vssl embed --random-init`: smoke tests only)",
    )
    add(
        "--resolution",
        type=int,
        default=None,
        metavar="PX",
        help="center-crop size for embedding (default: the size the model's family is "
        "evaluated at: 224 for DINOv2, Web-SSL and MAE; else the model's img_size)",
    )
    add(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="images per forward pass when embedding (default 64)",
    )
    add("--device", default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
    add(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="compute dtype for embedding (default fp32)",
    )
    add(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="decoding processes when embedding (default: min(4, CPU count))",
    )
    add(
        "--cache",
        default=str(default_cache_dir()),
        metavar="DIR",
        help="folder for embedded features, re-used across runs (default %(default)s; "
        "$VSSL_CACHE moves it)",
    )


# ------------------------------------------------------------------------------------ cache
def _fingerprint(path: Path) -> list:
    """Identity of a file or folder by paths, sizes and mtimes (cheap; contents are not hashed)."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return [str(path)] + [
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(path.rglob("*"))
            if p.is_file()
        ]
    if not path.exists():  # loading will fail with a better message; no cache folder can match
        return [str(path)]
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def features_cache_key(
    model: str,
    weights: str | None,
    resolution: int | None,
    dtype: str | None,
    inputs,
    seed: int | None = None,
) -> str:
    """Hex digest of what decides the feature values: model and weights files (path, size, mtime),
    resolution, dtype, the seed of a random init, and every input (path, label, size, mtime) in
    row order."""
    from ..models import list_models

    h = hashlib.sha256()
    is_zoo_name = model in list_models() and not Path(model).exists()
    model_id = model if is_zoo_name else _fingerprint(Path(model))
    head = {
        "format": CACHE_FORMAT,
        "model": model_id,
        "weights": None if weights is None else _fingerprint(Path(weights)),
        "resolution": resolution,
        "dtype": dtype or "fp32",
        "seed": seed,
        "transform": "EvalTransform resize 256/224 bicubic, center crop, JPEG draft",
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for p, label in inputs:
        try:
            st = os.stat(p)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None  # embed skips it (errors.jsonl); should it appear, the key changes
        h.update(json.dumps([str(p), label, stamp]).encode())
    return h.hexdigest()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in text)
    return keep.strip("-.")[:40] or "x"


def _cached_has(d: Path, layers: int, avgpool: bool, patch_tokens: bool) -> bool:
    if not ((d / EMBEDDINGS).is_file() and (d / MANIFEST).is_file() and (d / CACHE_INFO).is_file()):
        return False
    if layers:
        if not (d / LAYERS).is_file() or np.load(d / LAYERS, mmap_mode="r").shape[1] < layers:
            return False
    return (not avgpool or (d / AVGPOOL).is_file()) and (
        not patch_tokens or (d / PATCH_TOKENS).is_file()
    )


def _random_seed(args) -> int | None:
    """The seed of a random-init --model (a zoo name without --weights), else None: always 0,
    the default of `vssl embed --seed`, so on-the-fly features match `vssl embed --random-init`
    ones (a protocol's own --seed is about the protocol, not the network)."""
    from ..models.zoo import is_zoo_name

    if args.weights is None and is_zoo_name(str(args.model)) and not Path(args.model).exists():
        return 0
    return None


def _model_for(args):
    """The model for on-the-fly embedding, loaded once per command (train and test share it)."""
    model = getattr(args, "_features_model", None)
    if model is None:
        from ..models import create_model, list_models

        try:
            model = create_model(
                args.model,
                args.weights,
                dtype=args.dtype,
                device=args.device,
                random_init=getattr(args, "random_init", False),
                seed=_random_seed(args),
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is a user error: say what it was
            raise ValueError(f"cannot load model {args.model!r}: {exc}") from exc
        if args.weights is None and args.model in list_models():
            print(
                f"WARNING: {args.model} has RANDOM weights (no --weights given); these features "
                "are meaningless except as a smoke test",
                file=sys.stderr,
                flush=True,
            )
        args._features_model = model
    return model


def _embed_cached(
    args, split: str, path: str, layers: int, avgpool: bool, patch_tokens: bool, classes
) -> Features:
    from ..data.listing import list_inputs
    from ..embed import ERRORS, embed_images

    src = Path(path)
    if (src / EMBEDDINGS).is_file():
        raise ValueError(
            f"--{split} {src} is a `vssl embed` output folder; with --model it must "
            "be images: drop --model to use these features"
        )
    try:
        inputs = list_inputs(src)
    except FileNotFoundError:
        raise ValueError(f"--{split} not found: {src}") from None
    if not inputs:
        raise ValueError(f"--{split} {src}: no input files")
    seed = _random_seed(args)
    key = features_cache_key(args.model, args.weights, args.resolution, args.dtype, inputs, seed)
    cache = Path(args.cache).expanduser()
    name = f"{_slug(Path(args.model).name)}_{_slug(src.name)}_{key[:20]}"
    final = cache / name
    if _cached_has(final, layers, avgpool, patch_tokens):
        print(
            f"vssl eval: re-using cached {split} features in {final}", file=sys.stderr, flush=True
        )
        return load_features(final, classes=classes, source=str(src))

    # Embed everything this folder should hold: what is asked now plus what earlier runs put there.
    if final.is_dir():
        if (final / LAYERS).is_file():
            layers = max(layers, np.load(final / LAYERS, mmap_mode="r").shape[1])
        avgpool = avgpool or (final / AVGPOOL).is_file()
        patch_tokens = patch_tokens or (final / PATCH_TOKENS).is_file()
    from ..models.zoo import is_zoo_name

    is_zoo = is_zoo_name(str(args.model)) and not Path(args.model).exists()
    model = _model_for(args)
    resolution = args.resolution
    if resolution is None:
        from ..extract import eval_resolution

        resolution, why = eval_resolution(model, args.model)
        print(
            f"vssl eval: resolution {resolution} ({why}; --resolution to change)",
            file=sys.stderr,
            flush=True,
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    print(
        f"vssl eval: embedding {len(inputs)} {split} images from {src} with {args.model} into "
        f"{final}",
        file=sys.stderr,
        flush=True,
    )
    try:
        result = embed_images(
            model,
            inputs,
            tmp,
            resolution=resolution,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            dtype=args.dtype,
            patch_tokens=patch_tokens,
            layers=layers,
            avgpool=avgpool,
            progress=sys.stderr.isatty(),
            provenance={
                "model": args.model if is_zoo else os.path.abspath(args.model),
                "weights": None if args.weights is None else os.path.abspath(args.weights),
                "seed": seed,
                "overrides": None,
            },
        )
        if result.num_embedded == 0:
            first = "; ".join(f"{e['path']}: {e['error']}" for e in result.errors[:3])
            raise ValueError(f"no image of --{split} {src} could be embedded ({first})")
        info = {
            "model": args.model,
            "weights": args.weights,
            "resolution": resolution,
            "seed": seed,
            "dtype": args.dtype,
            "input": str(src),
            "images": result.num_embedded,
            "skipped": result.num_skipped,
            "key": key,
        }
        (tmp / CACHE_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result.num_skipped:
        print(
            f"vssl eval: skipped {result.num_skipped} unreadable {split} files (see "
            f"{final / ERRORS})",
            file=sys.stderr,
            flush=True,
        )
    return load_features(final, classes=classes, source=str(src))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished folder over ``final``; readers never see a half-written cache folder."""
    old = None
    if final.exists():  # a folder with fewer outputs: set it aside first (rename cannot replace it)
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, old)
        except FileNotFoundError:  # a concurrent run moved it meanwhile
            old = None
    try:
        os.rename(tmp, final)
    except OSError:
        # A concurrent run finished the same key first: its folder is as good as ours.
        if not (final / CACHE_INFO).is_file():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def features_from_args(
    args,
    split: str,
    *,
    layers: int = 0,
    avgpool: bool = False,
    patch_tokens: bool = False,
    classes: list[str] | None = None,
) -> Features:
    """The features of ``args.<split>``: read from a ``vssl embed`` folder, or (with ``--model``)
    embedded into the cache, re-used when a cached folder already has everything requested.

    ``layers``/``avgpool``/``patch_tokens`` are what the protocol needs (an embed folder without
    them is a ValueError saying how to make them); ``layers`` comes back cut to the last ``layers``
    blocks. ``classes`` (the train split's) fixes the label indices of a test split.
    """
    path = getattr(args, split, None)
    if path is None:
        raise ValueError(f"--{split} is required")
    if getattr(args, "model", None) is None:
        given = [
            flag
            for flag, dest in (
                ("--weights", "weights"),
                ("--resolution", "resolution"),
                ("--random-init", "random_init"),
            )
            if getattr(args, dest, None)
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply with --model (embedding on the fly); "
                f"--{split} {path} is read as a `vssl embed` output folder"
            )
        feats = load_features(path, classes=classes)
    else:
        feats = _embed_cached(args, split, path, layers, avgpool, patch_tokens, classes)
    _warn_if_other_network(args, split, feats)
    return feats.require(layers=layers, avgpool=avgpool, patch_tokens=patch_tokens)


def _warn_if_other_network(args, split: str, feats: Features) -> None:
    """Warn once per pair when this split's features come from another network than a split read
    before in the same command (``vssl eval knn --train A --test B`` with A and B embedded by two
    different models, or two unseeded random inits)."""
    seen = getattr(args, "_feature_splits", None)
    if seen is None:
        seen = []
        try:
            args._feature_splits = seen
        except AttributeError:  # a frozen namespace: nothing to compare against
            return
    for other_split, other in seen:
        why = provenance_mismatch(other, feats)
        if why:
            print(
                f"vssl eval: WARNING: --{other_split} and --{split}: {why}",
                file=sys.stderr,
                flush=True,
            )
    seen.append((split, feats))
