"""``vssl eval retrieval``: image<->text retrieval recall@k with a two-tower model.

The COCO / Flickr30k protocol: every image and every caption is embedded and L2-normalized;
image->text recall@k is the fraction of images with *any* of their captions among the k captions
most similar to the image, text->image recall@k the fraction of captions whose own image is among
the k most similar images. An image may have several captions (COCO has 5).

Ties count against the model (the true item is ranked behind everything scoring the same), so a
collapsed model whose embeddings are all equal gets 0, not 100%.

The pairs come from :func:`read_pairs` (a parquet / JSONL / TSV / CSV table, or an image folder
with ``.txt`` caption sidecars); ``vssl eval align`` reads its captions the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch

__all__ = ["Pairs", "add_parser", "read_pairs", "retrieval_recall", "run"]

DEFAULT_KS = (1, 5, 10)
IMAGE_COLUMNS = ("path", "image", "file", "url")
TEXT_COLUMNS = ("text", "caption", "captions")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Pairs:
    """Images and their captions: caption ``j`` describes ``images[caption_image[j]]``."""

    images: list[str]  # absolute image paths, each once, in order of first appearance
    captions: list[str]
    caption_image: np.ndarray  # (T,) int64 index into `images`
    source: str = ""
    skipped: list[dict] = field(default_factory=list)  # rows not used: {"row", "error"}

    def __post_init__(self):
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if self.caption_image.shape != (len(self.captions),):
            raise ValueError(
                f"{len(self.captions)} captions but caption_image has shape "
                f"{self.caption_image.shape}"
            )
        if len(self.captions) and (
            self.caption_image.min() < 0 or self.caption_image.max() >= len(self.images)
        ):
            raise ValueError("caption_image indexes outside the image list")
        if len(np.unique(self.caption_image)) != len(self.images):
            raise ValueError("every image needs at least one caption")

    def subset(self, keep_images: Sequence[int]) -> Pairs:
        """The pairs of the images ``keep_images`` (e.g. those that could be decoded)."""
        new = {int(old): i for i, old in enumerate(keep_images)}
        rows = [j for j, i in enumerate(self.caption_image) if int(i) in new]
        return Pairs(
            images=[self.images[i] for i in keep_images],
            captions=[self.captions[j] for j in rows],
            caption_image=np.array([new[int(self.caption_image[j])] for j in rows], dtype=np.int64),
            source=self.source,
            skipped=list(self.skipped),
        )


# ------------------------------------------------------------------------------------ reading
def _location(value, base: Path) -> tuple[str | None, str | None]:
    """A table cell -> (absolute local path, None) or (None, reason)."""
    if value is None or str(value).strip() == "":
        return None, "empty image path"
    s = str(value).strip()
    if s.startswith("file://"):
        return os.path.abspath(unquote(urlparse(s).path)), None
    if "://" in s:
        return None, (
            f"remote URL {s} (vssl does not download images: fetch them first, e.g. "
            "with img2dataset, and give local paths in a 'path' column)"
        )
    p = Path(s).expanduser()
    return os.path.abspath(p if p.is_absolute() else base / p), None


def _table_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{n}: not a JSON line ({exc.msg}); the pairs file "
                        "must hold one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object per line")
                rows.append(row)
        return rows
    if suffix == ".tsv":  # plain TAB-separated: a caption may start with a quote character
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(
        f"{path}: unknown pairs format {suffix!r}; use .parquet, .jsonl, .tsv, .csv "
        "or an image folder with .txt caption files"
    )


def _from_table(path: Path) -> tuple[list[tuple[str | None, object]], list[dict]]:
    rows = _table_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    cols = list(rows[0].keys())
    img = next((c for c in IMAGE_COLUMNS if c in cols), None)
    txt = next((c for c in TEXT_COLUMNS if c in cols), None)
    if img is None or txt is None:
        raise ValueError(
            f"{path} needs an image column ({' | '.join(IMAGE_COLUMNS)}) and a "
            f"caption column ({' | '.join(TEXT_COLUMNS)}); it has {cols}"
        )
    out, skipped = [], []
    for n, row in enumerate(rows):
        where, reason = _location(row.get(img), path.parent)
        if where is None:
            skipped.append({"row": n, "error": reason})
            continue
        out.append((where, row.get(txt)))
    return out, skipped


def _from_folder(root: Path) -> tuple[list[tuple[str, object]], list[dict]]:
    """Images with a same-named ``.txt`` sidecar; each non-empty line of it is one caption."""
    from ..data.listing import list_inputs

    out = []
    for p, _ in list_inputs(root):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        side = p.with_suffix(".txt")
        if side.is_file():
            lines = side.read_text(encoding="utf-8", errors="replace").splitlines()
            out.append((str(p), [ln for ln in lines if ln.strip()]))
    if not out:
        raise ValueError(
            f"{root}: no image with a .txt caption file next to it (photo.jpg + photo.txt)"
        )
    return out, []


def read_pairs(path: str | os.PathLike) -> Pairs:
    """Image-caption pairs from a table or a folder.

    - ``.parquet`` / ``.jsonl`` / ``.tsv`` / ``.csv`` with an image column (``path``, ``image``,
      ``file``, or COYO's ``url`` when it is a local path or ``file://``) and a caption column
      (``text``, ``caption``, or ``captions`` holding a list). Relative paths are relative to the
      table's folder; several rows with the same image give it several captions.
    - a folder: every image with a ``.txt`` file of the same name; each non-empty line is a caption.

    Rows without a usable image location or caption are left out and listed in ``skipped``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"pairs not found: {path}")
    raw, skipped = _from_folder(p) if p.is_dir() else _from_table(p)
    index: dict[str, int] = {}
    images, captions, owner = [], [], []
    for n, (where, text) in enumerate(raw):
        texts = list(text) if isinstance(text, (list, tuple)) else [text]
        texts = [str(t).strip() for t in texts if t is not None and str(t).strip()]
        if not texts:
            skipped.append({"row": n, "error": f"no caption for {where}"})
            continue
        if where not in index:
            index[where] = len(images)
            images.append(where)
        captions.extend(texts)
        owner.extend([index[where]] * len(texts))
    if not images:
        raise ValueError(
            f"{path}: no usable image-caption pair"
            + (f" ({skipped[0]['error']})" if skipped else "")
        )
    return Pairs(
        images=images,
        captions=captions,
        caption_image=np.array(owner, dtype=np.int64),
        source=str(p),
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------ metric
def _normalize(x) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    norms = x.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("an embedding is all zeros: it has no direction to compare by cosine")
    return x / norms


def retrieval_recall(
    image_emb, text_emb, caption_image, ks: Sequence[int] = DEFAULT_KS, *, chunk: int = 1024
) -> dict[str, dict[int, float]]:
    """Recall@k both ways, as fractions: ``{"i2t": {k: r}, "t2i": {k: r}}``.

    ``caption_image[j]`` is the image row of caption ``j``. Similarities are computed ``chunk``
    rows at a time, so memory stays at ``chunk x max(N, T)`` whatever the dataset size.
    """
    img = _normalize(image_emb)
    txt = _normalize(text_emb)
    owner = torch.as_tensor(np.asarray(caption_image), dtype=torch.long)
    n, t = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image embeddings have width {img.shape[1]}, text {txt.shape[1]}")
    if owner.shape != (t,):
        raise ValueError(
            f"caption_image must have one entry per caption ({t}), got {tuple(owner.shape)}"
        )
    if t == 0 or n == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if owner.min() < 0 or owner.max() >= n:
        raise ValueError(f"caption_image must index the {n} images")
    if len(torch.unique(owner)) != n:
        raise ValueError("every image needs at least one caption")

    # text -> image: rank of the caption's image = other images scoring >= it.
    t2i_rank = torch.empty(t, dtype=torch.long)
    for s in range(0, t, chunk):
        sim = txt[s : s + chunk] @ img.T
        true = sim.gather(1, owner[s : s + chunk, None])
        t2i_rank[s : s + chunk] = (sim >= true).sum(dim=1) - 1
    # image -> text: rank of the image's best caption = captions of other images scoring >= it.
    i2t_rank = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        sim = img[s : s + chunk] @ txt.T
        own = owner[None, :] == torch.arange(s, min(s + chunk, n))[:, None]
        best = sim.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        i2t_rank[s : s + chunk] = ((sim >= best) & ~own).sum(dim=1)
    return {
        "i2t": {k: float((i2t_rank < k).float().mean()) for k in ks},
        "t2i": {k: float((t2i_rank < k).float().mean()) for k in ks},
    }


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl eval retrieval --model clip-vit-b32/ --data coco_val_pairs.parquet
  vssl eval retrieval --model siglip-base/ --data flickr30k/ --device cuda

--data is a .parquet/.jsonl/.tsv/.csv table with an image column (path | image | file | url,
local paths only) and a caption column (text | caption | captions); rows sharing an image give it
several captions. Or a folder of images with same-named .txt files, one caption per line.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl eval retrieval``."""
    from .results import add_result_args
    from .zeroshot import _add_model_args

    p = subparsers.add_parser(
        "retrieval",
        help="image<->text retrieval recall@1/5/10 with a two-tower model",
        description="Image<->text retrieval with a two-tower model: image->text recall@k counts an "
        "image as found when any of its captions is among the k nearest captions; "
        "text->image recall@k counts a caption when its image is among the k nearest "
        "images (cosine similarity). Reported as fractions in [0, 1].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    _add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="PAIRS",
        help="image-caption pairs: a .parquet/.jsonl/.tsv/.csv table or an image folder "
        "with .txt caption files",
    )
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=list(DEFAULT_KS),
        metavar="K",
        help="recall cut-offs (default 1 5 10)",
    )
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .results import format_table, record
    from .two_tower import encode_image_files, load_two_tower
    from .zeroshot import _error, _report_skipped

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if any(k < 1 for k in args.ks):
            raise ValueError(f"--ks must be positive, got {args.ks}")
        pairs = read_pairs(args.data)
        if pairs.skipped:
            first = pairs.skipped[0]
            print(
                f"vssl eval retrieval: left out {len(pairs.skipped)} row(s) of --data (row "
                f"{first['row']}: {first['error']})",
                file=sys.stderr,
            )
        model = load_two_tower(
            args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
        )
        img, kept, errors = encode_image_files(
            model, pairs.images, batch_size=args.batch_size, progress=sys.stderr.isatty()
        )
        _report_skipped("retrieval", errors)
        if not kept:
            raise ValueError(f"no image of --data {args.data} could be read")
        pairs = pairs.subset(kept)
        txt = torch.cat(
            [
                model.encode_text(pairs.captions[i : i + args.batch_size]).float().cpu()
                for i in range(0, len(pairs.captions), args.batch_size)
            ]
        )
        recall = retrieval_recall(img, txt, pairs.caption_image, args.ks)
    except (ValueError, FileNotFoundError) as exc:
        return _error("retrieval", str(exc))

    names = {"i2t": "image->text", "t2i": "text->image"}
    print(
        format_table(
            [
                {"direction": names[d], **{f"R@{k}": r[k] for k in args.ks}}
                for d, r in recall.items()
            ]
        )
    )
    print(f"{len(pairs.images)} images, {len(pairs.captions)} captions")
    metrics = {f"{d}_recall@{k}": r[k] for d, r in recall.items() for k in args.ks}
    record(
        args.results,
        protocol="retrieval",
        metrics=metrics,
        model=args.run_name or Path(args.model).name,
        checkpoint=str(args.model),
        dataset=args.dataset or _dataset_name(args.data),
        extra={
            "num_images": len(pairs.images),
            "num_captions": len(pairs.captions),
            "num_skipped_images": len(errors),
            "num_skipped_rows": len(pairs.skipped),
        },
    )
    return 0


def _dataset_name(path) -> str:
    p = Path(str(path)).resolve()
    return p.name if p.is_dir() else p.stem
