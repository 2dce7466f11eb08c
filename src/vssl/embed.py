"""`vssl embed`: images in, one feature row per image out.

Outputs in ``--output`` (row ``i`` of every array is row ``i`` of the manifest):

- ``embeddings.npy``   float32 (N, D): the normalized CLS token (``x_norm_clstoken``); float16
  with ``--feature-dtype float16`` (half the disk; curation memory-maps it);
- ``patch_tokens.npy`` float32 (N, num_patches, D), only with ``--patch-tokens`` (written
  incrementally to a memory map, so it never has to fit in RAM);
- ``layers.npy``       float32 (N, L, D), only with ``--layers L``: the normalized CLS tokens of the
  last L blocks, oldest first (DINOv2's ``get_intermediate_layers(x, L, return_class_token=True,
  norm=True)`` class tokens: the input of DINOv2's linear probes; the last one is the embedding);
- ``avgpool.npy``      float32 (N, D), only with ``--avgpool``: the mean of the last block's
  normalized patch tokens (DINOv2's linear-probe ``avgpool`` input);
- ``manifest.parquet`` columns ``row`` (int64), ``path`` (absolute, string), ``label`` (string or
  null: the first-level subfolder of an input folder);
- ``errors.jsonl``     one ``{"path": ..., "error": ...}`` line per skipped input (always written);
- under ``torchrun`` (``WORLD_SIZE`` > 1) each rank embeds its contiguous share of the inputs into
  ``OUTPUT/part-RRRRR-of-WWWWW/`` (all of the above per part; `vssl curate` reads all parts as one);
- ``embed.json``       where the features come from: the model and weights named, the seed of a
  random init, resolution, dtype, and ``weights_digest`` (a digest of the model's parameters), so
  ``vssl eval`` can warn when train and test features come from different networks.

Non-finite features (NaN/Inf: damaged weights, fp16 overflow) are refused: nothing is written and
``NonFiniteFeaturesError`` says how many rows.

Decoding and the eval transform run in DataLoader workers so they overlap the model; a bad file is
counted and skipped, never fatal (docs/architecture.md, Robustness).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_write
from .data.decode import DEFAULT_MAX_PIXELS
from .data.listing import list_inputs
from .data.transforms import EvalTransform
from .extract import (
    ImageDataset,
    autocast_context,
    check_resolution,
    eval_resolution,
    make_loader,
    model_resolution,
)

__all__ = [
    "EmbedResult",
    "NonFiniteFeaturesError",
    "add_embed_parser",
    "embed_images",
    "list_inputs",
    "run_embed",
    "weights_digest",
]

EMBEDDINGS = "embeddings.npy"
PATCH_TOKENS = "patch_tokens.npy"
LAYERS = "layers.npy"
AVGPOOL = "avgpool.npy"
MANIFEST = "manifest.parquet"
ERRORS = "errors.jsonl"
INFO = "embed.json"


class NonFiniteFeaturesError(ValueError):
    """The model produced NaN/Inf features; nothing was written."""


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's parameters: names, shapes, dtypes and a strided sample of at
    most 4096 values per tensor (cheap for a 7B model; two different networks, e.g. two random
    inits with different seeds, practically never share it)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ outputs
def _truncate_npy(path: Path, rows: int) -> None:
    """Shrink a pre-sized ``.npy`` to its first ``rows`` rows in place.

    The header is rewritten with the new shape, padded with spaces to its old length (the format
    allows it and the new shape never has more digits), and the file is truncated: no data copy.
    """
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            len_size = 2
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            len_size = 4
        data_start = f.tell()
        header_len = data_start - 6 - 2 - len_size  # magic (6) + version (2) + length field
        new_shape = (rows,) + tuple(shape[1:])
        header = (
            "{'descr': %r, 'fortran_order': %r, 'shape': %r, }"  # noqa: UP031 (numpy's own header)
            % (np.lib.format.dtype_to_descr(dtype), fortran, new_shape)
        )
        if len(header) + 1 > header_len:  # cannot happen for a smaller row count
            raise RuntimeError(f"cannot rewrite the header of {path}")
        header = header.ljust(header_len - 1) + "\n"
        f.seek(6 + 2 + len_size)
        f.write(header.encode("latin1"))
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.truncate(data_start + rows * row_bytes)


class _RowWriter:
    """A ``.npy`` memory map pre-sized to every input, filled row by row, cut to size at the end."""

    def __init__(self, path: Path, capacity: int, dtype=np.float32):
        self.path, self.capacity, self.dtype = path, capacity, np.dtype(dtype)
        self.partial = path.with_name(path.name + ".partial")
        self.array: np.memmap | None = None
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        if self.array is None:  # shape known from the first batch (patch count, width)
            self.array = np.lib.format.open_memmap(
                self.partial, mode="w+", dtype=self.dtype, shape=(self.capacity, *block.shape[1:])
            )
        self.array[self.rows : self.rows + len(block)] = block
        self.rows += len(block)

    def discard(self) -> None:
        self.array = None
        self.partial.unlink(missing_ok=True)

    def close(self, empty_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.array is None:  # nothing embedded: still write a valid, empty array
            with open(self.partial, "wb") as f:  # a file object: np.save adds no ".npy"
                np.save(f, np.zeros((0, *empty_shape), dtype=self.dtype))
            shape: tuple[int, ...] = (0, *empty_shape)
        else:
            shape = (self.rows, *self.array.shape[1:])
            self.array.flush()
            del self.array
            self.array = None
            if self.rows < self.capacity:
                _truncate_npy(self.partial, self.rows)
        os.replace(self.partial, self.path)
        return shape


def _write_manifest(path: Path, rows: list[tuple[str, str | None]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "row": pa.array(range(len(rows)), type=pa.int64()),
            "path": pa.array([p for p, _ in rows], type=pa.string()),
            "label": pa.array([lab for _, lab in rows], type=pa.string()),
        }
    )
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _write_errors(path: Path, errors: list[dict]) -> None:
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------------------------ library
@dataclass
class EmbedResult:
    """What ``embed_images`` did: counts, the skipped inputs, speed and where the files went."""

    output_dir: Path
    num_inputs: int
    num_embedded: int
    num_skipped: int
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    embeddings_shape: tuple[int, ...] = ()
    patch_tokens_shape: tuple[int, ...] | None = None
    layers_shape: tuple[int, ...] | None = None
    avgpool_shape: tuple[int, ...] | None = None

    def summary(self) -> str:
        files = [f"{EMBEDDINGS} {self.embeddings_shape}"]
        for name, shape in (
            (PATCH_TOKENS, self.patch_tokens_shape),
            (LAYERS, self.layers_shape),
            (AVGPOOL, self.avgpool_shape),
        ):
            if shape is not None:
                files.append(f"{name} {shape}")
        files += [MANIFEST, ERRORS, INFO]
        skipped = f"skipped {self.num_skipped}"
        if self.num_skipped:
            skipped += f" (see {self.output_dir / ERRORS})"
        return (
            f"embedded {self.num_embedded} images, {skipped}, {self.images_per_s:.1f} images/s "
            f"in {self.seconds:.1f} s -> {self.output_dir}: {', '.join(files)}"
        )


def _feature_fn(model: torch.nn.Module, layers: int, avgpool: bool, patch_tokens: bool):
    """``x -> {"cls", "patch", "layers", "avgpool"}`` (what was asked), all from ONE forward pass.

    With ``layers`` the pass goes through ``get_intermediate_layers(..., norm=True)``: its last
    class token is ``x_norm_clstoken`` (same blocks, same final norm) and its last patch output is
    ``x_norm_patchtokens``, so asking for more outputs never costs a second forward.
    """
    if layers:
        depth = len(getattr(model, "blocks", ()))
        if not hasattr(model, "get_intermediate_layers"):
            raise ValueError("layers= needs a model with get_intermediate_layers (a vssl ViT)")
        if depth and layers > depth:
            raise ValueError(
                f"layers={layers} but the model has only {depth} blocks: use layers <= {depth}"
            )

        def fn(x):
            pairs = model.get_intermediate_layers(x, layers, return_class_token=True, norm=True)
            last_patch, last_cls = pairs[-1]
            out = {"cls": last_cls, "layers": torch.stack([c for _, c in pairs], dim=1)}
            if patch_tokens:
                out["patch"] = last_patch
            if avgpool:
                out["avgpool"] = last_patch.float().mean(dim=1)
            return out
    else:

        def fn(x):
            f = model.forward_features(x)
            out = {"cls": f["x_norm_clstoken"]}
            if patch_tokens:
                out["patch"] = f["x_norm_patchtokens"]
            if avgpool:
                out["avgpool"] = f["x_norm_patchtokens"].float().mean(dim=1)
            return out

    return fn


def embed_images(
    model: torch.nn.Module,
    inputs: Sequence[tuple[str | os.PathLike, str | None]] | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    resolution: int | tuple[int, int] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    patch_tokens: bool = False,
    layers: int = 0,
    avgpool: bool = False,
    progress: bool = True,
    verbose: bool = False,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    compile: bool = False,
    provenance: dict | None = None,
    feature_dtype: str = "float32",
) -> EmbedResult:
    """Embed ``inputs`` (``list_inputs`` output, or plain paths) with ``model`` into ``output_dir``.

    ``resolution``: the crop (default: the model's ``img_size``), after resizing the short side to
    ``resolution * 256/224`` (DINOv2's eval protocol). ``num_workers``: decoding processes (None:
    ``min(4, cpu count)``; 0 decodes in this process). ``dtype``: ``bf16``/``fp16`` with an fp32
    model runs under ``torch.autocast``; otherwise inputs are cast to the model's own parameter
    dtype. ``draft``: let large JPEGs decode at 1/2..1/8 scale (never below the resize target;
    ``False`` is bit-exact with full decoding). ``compile``: run the forward through
    ``torch.compile`` (fuses bias/GELU/LayerNorm passes: about 1.07x on CPU for ViT-S/B, more on
    GPU; costs 20-40 s of compilation, so it pays off for large inputs only). ``layers``: also write
    ``layers.npy``, the normalized CLS tokens of the last ``layers`` blocks; ``avgpool``: also write
    ``avgpool.npy``, the mean normalized patch token (both from the same forward pass; DINOv2's
    linear-probe inputs). Bad inputs are skipped and listed in ``errors.jsonl``, never raised.
    ``verbose`` prints the summary line at the end. ``provenance``: what the model is (``model``,
    ``weights``, ``seed``, ...), written to ``embed.json`` with the weights' digest. Features with
    NaN/Inf raise ``NonFiniteFeaturesError`` and no output is written. ``feature_dtype``:
    ``float16`` halves ``embeddings.npy`` and ``avgpool.npy`` on disk (what `vssl curate` memory-maps
    at web scale; a row whose values overflow float16 is refused like a NaN row).
    """
    if feature_dtype not in ("float32", "float16"):
        raise ValueError(f"feature_dtype must be float32 or float16, got {feature_dtype!r}")
    items = [
        (Path(os.path.abspath(x[0])), x[1])
        if isinstance(x, tuple)
        else (Path(os.path.abspath(x)), None)
        for x in inputs
    ]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    features = _feature_fn(model, layers, avgpool, patch_tokens)
    resolution = model_resolution(model) if resolution is None else resolution
    check_resolution(model, resolution)
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Leftovers of an earlier run here would not match this run's manifest.
    for stale in (EMBEDDINGS, PATCH_TOKENS, LAYERS, AVGPOOL, MANIFEST, ERRORS, INFO):
        (out_dir / stale).unlink(missing_ok=True)

    device = torch.device(device)
    params = list(model.parameters())
    param_dtype = params[0].dtype if params else torch.float32
    autocast = autocast_context(device.type, dtype, param_dtype=param_dtype)
    if params and params[0].device != device:
        model.to(device)
    was_training = model.training
    model.eval()

    dataset = ImageDataset(
        [p for p, _ in items], EvalTransform(resolution), draft=draft, max_pixels=max_pixels
    )
    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )

    forward = torch.compile(features) if compile else features

    from tqdm import tqdm

    writers = {"cls": _RowWriter(out_dir / EMBEDDINGS, len(items), feature_dtype)}
    if patch_tokens:
        writers["patch"] = _RowWriter(out_dir / PATCH_TOKENS, len(items))
    if layers:
        writers["layers"] = _RowWriter(out_dir / LAYERS, len(items))
    if avgpool:
        writers["avgpool"] = _RowWriter(out_dir / AVGPOOL, len(items), feature_dtype)
    manifest: list[tuple[str, str | None]] = []
    errors: list[dict] = []
    nonfinite = 0  # rows with a NaN/Inf in any output
    start = time.perf_counter()
    bar = tqdm(
        total=len(items),
        unit="img",
        desc="embed",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        with torch.inference_mode(), autocast:
            for indices, images, batch_errors in loader:
                for i, reason in batch_errors:
                    errors.append({"path": str(items[i][0]), "error": reason})
                if images is not None:
                    x = images.to(device, dtype=param_dtype, non_blocking=True)
                    n = x.shape[0]
                    if compile and n < batch_size:  # same shape every call: no recompilation
                        x = torch.cat([x, x.new_zeros((batch_size - n,) + x.shape[1:])])
                    out = forward(x)
                    finite = np.ones(n, dtype=bool)
                    for name, writer in writers.items():
                        block = out[name][:n].float().cpu().numpy()
                        if writer.dtype != np.float32:  # overflow to inf is caught below
                            with np.errstate(over="ignore"):
                                block = block.astype(writer.dtype)
                        finite &= np.isfinite(block.reshape(n, -1)).all(axis=1)
                        writer.write(block)
                    nonfinite += int(n - finite.sum())
                    manifest.extend((str(items[i][0]), items[i][1]) for i in indices)
                    if nonfinite and nonfinite == len(manifest) and nonfinite >= batch_size:
                        break  # every row so far is NaN/Inf: the model is broken, stop here
                bar.update(len(indices) + len(batch_errors))
                if errors:
                    bar.set_postfix(skipped=len(errors), refresh=False)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        bar.close()
        if was_training:
            model.train()
    if nonfinite:
        for writer in writers.values():
            writer.discard()
        stopped = (
            f" (stopped after {len(manifest)} of {len(items)} images: every row was non-finite)"
            if len(manifest) + len(errors) < len(items)
            else ""
        )
        raise NonFiniteFeaturesError(
            f"{nonfinite} of {len(manifest)} embedded rows hold NaN/Inf values{stopped}; "
            f"nothing was written to {out_dir}. The model computes non-finite features: damaged "
            "or diverged weights, or fp16 overflow (try --dtype bf16 or fp32)"
        )

    cfg = getattr(model, "config", None)
    dim = int(getattr(cfg, "embed_dim", 0) or 0)
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    patch = int(getattr(cfg, "patch_size", 1) or 1)
    empty_shapes = {
        "cls": (dim,),
        "patch": ((h // patch) * (w // patch), dim),
        "layers": (layers, dim),
        "avgpool": (dim,),
    }
    shapes = {name: writer.close(empty_shapes[name]) for name, writer in writers.items()}
    _write_manifest(out_dir / MANIFEST, manifest)
    _write_errors(out_dir / ERRORS, errors)
    info = dict(provenance or {})
    info.update(
        resolution=list(resolution) if isinstance(resolution, tuple) else resolution,
        dtype=str(dtype) if dtype is not None else str(param_dtype).replace("torch.", ""),
        weights_digest=weights_digest(model),
        images=len(manifest),
        skipped=len(errors),
    )
    text = json.dumps(info, indent=1, default=str) + "\n"
    atomic_write(out_dir / INFO, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    seconds = time.perf_counter() - start
    result = EmbedResult(
        output_dir=out_dir,
        num_inputs=len(items),
        num_embedded=len(manifest),
        num_skipped=len(errors),
        errors=errors,
        seconds=seconds,
        images_per_s=len(manifest) / seconds if seconds > 0 else 0.0,
        embeddings_shape=shapes["cls"],
        patch_tokens_shape=shapes.get("patch"),
        layers_shape=shapes.get("layers"),
        avgpool_shape=shapes.get("avgpool"),
    )
    if verbose:
        print(result.summary(), flush=True)
    return result


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl embed webssl-dino1b-full2b-224 --weights webssl_dino1b_full2b_224.pth \\
      --input photos/ --output feats/
  vssl embed dinov2-vits14-hf/ --input list.txt --output feats/ --patch-tokens
  vssl embed dinov2-vitb14 --weights dinov2_vitb14.pth --input train/ --output feats/ \\
      --layers 4 --avgpool                                # inputs of `vssl eval linear`
  vssl embed vit-test-p14 --random-init --output /tmp/feats     # smoke test on bundled samples
  vssl embed runs/my_run/ --input photos/ --output feats/       # a pretraining run's encoder

--input is a folder (walked recursively; hidden files skipped; first-level subfolders become
labels), a .txt/.lst list of image paths (one per line, optionally TAB and a label; relative
paths are relative to the list's folder), or one image. Unreadable files are skipped and listed in
OUTPUT/errors.jsonl; rows of embeddings.npy match rows of manifest.parquet.
"""


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl embed`` on an argparse ``add_subparsers()`` object (sets ``func=run_embed``)."""
    p = subparsers.add_parser(
        "embed",
        help="extract features (CLS embeddings, optionally patch tokens, last-block CLS tokens, "
        "avgpool) from images",
        description="Embed images with a vision model: one row per image in OUTPUT/embeddings.npy\n"
        "(the normalized CLS token), the image paths and labels in OUTPUT/manifest.parquet, skipped\n"
        "files with the reason in OUTPUT/errors.jsonl, which network made them in OUTPUT/embed.json.\n"
        "Images are resized to resolution*256/224 and center-cropped (DINOv2's evaluation\n"
        "transform). --layers/--avgpool add the inputs of DINOv2's linear probes (layers.npy,\n"
        "avgpool.npy), computed in the same forward pass.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a zoo name (see `vssl models`), or a checkpoint: a .pth/.safetensors file, "
        "a transformers directory, or a `vssl pretrain` run folder (its backbone.safetensors) or "
        "one of its RUN/ckpt/step_N folders",
    )
    p.add_argument(
        "--weights",
        metavar="PATH",
        default=None,
        help="weights for a zoo-name MODEL (.pth / .safetensors)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="architecture override, as in `vssl convert`, e.g. --set layerscale=None or "
        "--set img_size=224 (repeatable)",
    )
    p.add_argument(
        "--input",
        "-i",
        metavar="PATH",
        default=None,
        help="folder, .txt/.lst list of paths, or one image (default: the bundled sample images)",
    )
    p.add_argument("--output", "-o", metavar="DIR", required=True, help="folder for the outputs")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        metavar="PX",
        help="center-crop size in pixels, a multiple of the patch size (default: the size the "
        "model's family is evaluated at: 224 for DINOv2, Web-SSL and MAE, the 7B Web-DINO models "
        "at the size in their name, else the model's img_size); images are first resized to "
        "resolution*256/224",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="images per forward pass (default 64)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="weights and compute dtype (default fp32); bf16 is fast on GPUs",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)"
    )
    p.add_argument(
        "--patch-tokens",
        action="store_true",
        help="also write patch_tokens.npy (N, num_patches, D); large",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        metavar="L",
        help="also write layers.npy (N, L, D): the normalized CLS tokens of the last L "
        "blocks, oldest first (DINOv2 linear probes use 4; default 0 = none)",
    )
    p.add_argument(
        "--avgpool",
        action="store_true",
        help="also write avgpool.npy (N, D): the mean of the last block's normalized "
        "patch tokens (DINOv2 linear probes)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="decoding processes (default: min(4, CPU count); 0 = in the main process)",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="allow a zoo model without --weights (random weights: smoke tests only)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of a random init (default 0: every call builds the same network, so the "
        "train and test features of two calls match)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (about 1.07x on CPU, more on GPU; 20-40 s to "
        "compile, worth it for thousands of images)",
    )
    p.add_argument(
        "--no-draft",
        action="store_true",
        help="decode JPEGs at full size (slower; bit-exact with full-decode pipelines)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse larger images as decompression bombs (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help="two-tower MODEL (CLIP / ALIGN / SigLIP directory, clip run): also embed these "
        "lines with the text tower (text_embeddings.npy)",
    )
    p.add_argument(
        "--feature-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of embeddings.npy / avgpool.npy on disk (default float32; float16 halves "
        "them: what `vssl curate` memory-maps at web scale)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_embed)
    return p


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _fail(msg: str) -> int:
    print(f"vssl embed: error: {msg}", file=sys.stderr, flush=True)
    return 2


def run_embed(args: argparse.Namespace) -> int:
    """The ``vssl embed`` command: 0 when at least one image was embedded, 2 otherwise."""
    if args.input is None:
        from .assets import sample_images_dir

        input_path: Path = sample_images_dir()
        print(
            f"vssl embed: no --input given, using the bundled sample images in {input_path}",
            file=sys.stderr,
            flush=True,
        )
    else:
        input_path = Path(args.input)
    try:
        inputs = list_inputs(input_path)
    except FileNotFoundError:
        return _fail(f"input not found: {input_path}")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"cannot read input {input_path}: {exc}")
    if not inputs:
        what = "folder" if input_path.is_dir() else "list"
        return _fail(f"no input files in {what} {input_path}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.layers < 0:
        return _fail(f"--layers must be >= 0, got {args.layers}")
    if args.num_workers is not None and args.num_workers < 0:
        return _fail(f"--num-workers must be >= 0, got {args.num_workers}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        return _fail(f"--output {out} exists and is not a folder")
    from .embed_two_tower import embed_two_tower, is_two_tower

    if is_two_tower(args.model):  # image-text models: their own module (vssl.embed_two_tower)
        embed_two_tower(
            args.model,
            inputs,
            out,
            text_file=args.text,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
        return 0
    if args.text is not None:
        return _fail("--text needs a two-tower MODEL (a CLIP / ALIGN / SigLIP directory)")
    device = args.device
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:  # torchrun: this rank's contiguous share of the inputs, into its own part
        n_all = len(inputs)
        inputs = inputs[round(n_all / world * rank) : round(n_all / world * (rank + 1))]
        out = out / f"part-{rank:05d}-of-{world:05d}"
        if device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        print(
            f"vssl embed: rank {rank} of {world}: {len(inputs)} of {n_all} inputs -> {out}",
            file=sys.stderr,
            flush=True,
        )

    from .cli import parse_overrides
    from .models import create_model, list_models
    from .models.checkpoints import describe_source

    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        return _fail(str(exc))
    random = args.weights is None and args.model in list_models()
    note = describe_source(args.model) if args.model not in list_models() else None
    if note:
        print(f"vssl embed: {note}", file=sys.stderr, flush=True)
    try:
        model = create_model(
            args.model,
            args.weights,
            dtype=args.dtype,
            device=device,
            random_init=args.random_init,
            seed=args.seed if random else None,
            **overrides,
        )
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure: say what it was, no traceback
        return _fail(f"cannot load model {args.model!r}: {exc}")
    if random:
        print(
            f"WARNING: {args.model} has RANDOM weights (no --weights given; --seed {args.seed}); "
            "these embeddings are meaningless except as a smoke test",
            file=sys.stderr,
            flush=True,
        )
    resolution = args.resolution
    if resolution is None:
        try:
            resolution, why = eval_resolution(model, args.model)
        except ValueError as exc:
            return _fail(str(exc))
        print(
            f"vssl embed: resolution {resolution} ({why}; --resolution to change)",
            file=sys.stderr,
            flush=True,
        )
    provenance = {
        "model": args.model if random or args.model in list_models() else _abs(args.model),
        "weights": None if args.weights is None else _abs(args.weights),
        "seed": args.seed if random else None,
        "overrides": overrides or None,
    }

    try:
        result = embed_images(
            model,
            inputs,
            out,
            resolution=resolution,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            dtype=args.dtype,
            patch_tokens=args.patch_tokens,
            layers=args.layers,
            avgpool=args.avgpool,
            progress=not args.no_progress,
            verbose=True,
            draft=not args.no_draft,
            max_pixels=args.max_pixels,
            compile=args.compile,
            provenance=provenance,
            feature_dtype=args.feature_dtype,
        )
    except (ValueError, NotADirectoryError) as exc:
        return _fail(str(exc))
    except torch.cuda.OutOfMemoryError:
        return _fail(f"out of GPU memory at --batch-size {args.batch_size}: try a smaller one")
    if result.num_embedded == 0 and result.num_inputs:
        return _fail(
            f"no image could be embedded from {input_path} ({result.num_inputs} inputs, all "
            f"skipped; reasons in {out / ERRORS})"
        )
    return 0
