"""``vssl eval zeroshot``: zero-shot classification with a two-tower (image-text) model.

CLIP's protocol: every class name is put into every prompt template; the prompt embeddings are
L2-normalized, averaged per class and re-normalized, giving one classifier row per class. An image
is assigned the class whose row has the highest cosine with its normalized embedding. Reported:
top-1 and top-5 accuracy (top-5 only with more than 5 classes, where it can fail).

Ties count against the model (a class is ranked behind every class scoring the same), so a
collapsed model whose embeddings are all equal scores 0, not 100%.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "TEMPLATE_SETS",
    "add_parser",
    "read_classnames",
    "read_templates",
    "run",
    "topk_accuracy",
    "zeroshot_classifier",
    "zeroshot_logits",
]

# The 7 templates the CLIP authors selected from their 80 ImageNet prompts as the best ensemble
# (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb); "simple" is the single prompt
# of CLIP's paper baseline.
TEMPLATE_SETS = {
    "clip7": [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ],
    "simple": ["a photo of a {}."],
}
DEFAULT_TEMPLATES = "clip7"


def read_templates(spec: str | Sequence[str] | None = None) -> list[str]:
    """Templates from a set name (``TEMPLATE_SETS``), a file (one template per line, ``#`` comments)
    or a list; each must contain ``{}`` exactly once, where the class name goes."""
    if spec is None:
        spec = DEFAULT_TEMPLATES
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            templates = list(TEMPLATE_SETS[spec])
        else:
            p = Path(spec).expanduser()
            if not p.is_file():
                raise ValueError(
                    f"--templates {spec!r} is neither a template set "
                    f"({', '.join(TEMPLATE_SETS)}) nor a file"
                )
            templates = [
                ln.strip()
                for ln in p.read_text(encoding="utf-8").splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")
            ]
            if not templates:
                raise ValueError(f"template file {p} holds no templates")
    else:
        templates = list(spec)
    if not templates:
        raise ValueError("no prompt templates given")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(
                f"template {t!r} must contain '{{}}' exactly once (where the class "
                "name goes), e.g. 'a photo of a {}.'"
            )
    return templates


def read_classnames(path: str | None, folders: list[str]) -> list[str]:
    """Readable class names for the sorted class ``folders``.

    Without ``path``: the folder names with ``_`` as spaces. With a file: either one name per line
    in the sorted folder order (as many lines as classes), or ``folder<TAB>name`` lines covering
    every folder (for folders named by IDs, e.g. WordNet ``n01440764``).
    """
    if path is None:
        return [f.replace("_", " ").strip() for f in folders]
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"class-name file not found: {path}")
    lines = [ln.rstrip("\r\n") for ln in p.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and all("\t" in ln for ln in lines):
        mapping = {}
        for ln in lines:
            folder, _, name = ln.partition("\t")
            mapping[folder.strip()] = name.strip()
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ValueError(
                f"{p} names no class for folder(s) {missing[:5]}: add "
                "'folder<TAB>name' lines for every class folder"
            )
        return [mapping[f] for f in folders]
    if len(lines) != len(folders):
        raise ValueError(
            f"{p} has {len(lines)} class names but the test set has {len(folders)} "
            "class folders: give one name per folder, in sorted folder order, or "
            "'folder<TAB>name' lines"
        )
    return [ln.strip() for ln in lines]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    norms = x.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("an embedding is all zeros: it has no direction to compare by cosine")
    return x / norms


def zeroshot_classifier(
    model, classnames: Sequence[str], templates: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """(C, D) classifier: per class, the normalized mean of its normalized prompt embeddings."""
    if not classnames:
        raise ValueError("no class names")
    templates = read_templates(list(templates))
    prompts = [t.replace("{}", c) for c in classnames for t in templates]
    chunks = [
        model.encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)
    ]
    emb = _normalize(torch.cat([c.detach().float().cpu() for c in chunks]))
    if emb.shape[0] != len(prompts):
        raise ValueError(f"encode_text returned {emb.shape[0]} rows for {len(prompts)} prompts")
    per_class = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return _normalize(per_class)


def zeroshot_logits(image_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine similarities between images and class rows."""
    image_emb = torch.as_tensor(image_emb)
    if image_emb.shape[-1] != classifier.shape[-1]:
        raise ValueError(
            f"image embeddings have width {image_emb.shape[-1]} but the text "
            f"classifier {classifier.shape[-1]}: the towers do not match"
        )
    return _normalize(image_emb) @ classifier.float().T


def topk_accuracy(logits: torch.Tensor, labels, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose true class is among the k best, for each k (ties count against).

    The true class's rank is the number of *other* classes scoring at least as high, so a hit at
    k means fewer than k other classes score >= the true one.
    """
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be (N, C) and labels (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("no rows to score")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be in [0, {logits.shape[1]})")
    true = logits.gather(1, labels[:, None])
    rank = (logits >= true).sum(dim=1) - 1  # minus the true class itself
    return {k: float((rank < k).float().mean()) for k in ks}


# ------------------------------------------------------------------------------------ CLI
_EPILOG = """\
examples:
  vssl eval zeroshot --model clip-vit-b32/ --test cifar10/test
  vssl eval zeroshot --model siglip-base/ --test imagenet/val --classnames names.tsv \\
      --templates my_templates.txt --device cuda

--test is an image folder with one subfolder per class. Class names default to the folder names
with '_' as spaces; --classnames gives one name per line (sorted folder order) or
'folder<TAB>name' lines. --templates is a set name (clip7: CLIP's 7 selected ImageNet prompts;
simple: 'a photo of a {}.') or a file with one template per line, '{}' marking the class name.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vssl eval zeroshot``."""
    from .results import add_result_args

    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classification with a two-tower (image-text) model",
        description="Zero-shot classification, CLIP's protocol: class names x prompt templates are "
        "embedded by the text tower (normalized per prompt, averaged per class, "
        "re-normalized); each image gets the class of highest cosine similarity. "
        "Reports top-1 and top-5 accuracy as fractions in [0, 1], like every vssl protocol.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    _add_model_args(p)
    p.add_argument(
        "--test",
        required=True,
        metavar="IMAGES",
        help="image folder with one subfolder per class (or a .txt list with TAB labels)",
    )
    p.add_argument(
        "--templates",
        default=DEFAULT_TEMPLATES,
        metavar="SET_OR_FILE",
        help=f"prompt templates: {' | '.join(TEMPLATE_SETS)} or a file "
        f"(default {DEFAULT_TEMPLATES})",
    )
    p.add_argument(
        "--classnames",
        default=None,
        metavar="FILE",
        help="class names: one per line in sorted folder order, or folder<TAB>name "
        "lines (default: folder names with '_' as spaces)",
    )
    add_result_args(p)
    p.set_defaults(func=run)
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The two-tower model options shared by zeroshot and retrieval."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="local transformers directory with a CLIP, ALIGN or SigLIP model, or a "
        "finished `vssl pretrain` run of the clip method",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="images or texts per forward pass (default 64)",
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
    g.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="weights and compute dtype (default fp32)",
    )


def _error(name: str, msg: str) -> int:
    print(f"vssl eval {name}: error: {msg}", file=sys.stderr)
    return 2


def _report_skipped(name: str, errors: list[dict]) -> None:
    if errors:
        shown = "; ".join(f"{e['path']}: {e['error']}" for e in errors[:3])
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        print(
            f"vssl eval {name}: skipped {len(errors)} unreadable image(s): {shown}{more}",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from ..data.listing import list_inputs
    from .results import format_table, record
    from .two_tower import encode_image_files, load_two_tower

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        try:
            inputs = list_inputs(args.test)
        except FileNotFoundError:
            raise ValueError(f"--test not found: {args.test}") from None
        if not inputs:
            raise ValueError(f"--test {args.test} holds no files")
        unlabeled = [p for p, lab in inputs if lab is None]
        if unlabeled:
            raise ValueError(
                f"{len(unlabeled)} file(s) in --test have no class (e.g. "
                f"{unlabeled[0]}): put every image in a class subfolder"
            )
        folders = sorted({lab for _, lab in inputs})
        index = {c: i for i, c in enumerate(folders)}
        classnames = read_classnames(args.classnames, folders)
        templates = read_templates(args.templates)
        model = load_two_tower(
            args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
        )
        classifier = zeroshot_classifier(model, classnames, templates, batch_size=args.batch_size)
        emb, kept, errors = encode_image_files(
            model, [p for p, _ in inputs], batch_size=args.batch_size, progress=sys.stderr.isatty()
        )
        _report_skipped("zeroshot", errors)
        if not kept:
            raise ValueError(f"no image in --test {args.test} could be read")
        labels = torch.tensor([index[inputs[i][1]] for i in kept])
        ks = (1, 5) if len(folders) > 5 else (1,)
        acc = topk_accuracy(zeroshot_logits(emb, classifier), labels, ks)
    except (ValueError, FileNotFoundError) as exc:
        return _error("zeroshot", str(exc))

    metrics = {f"zeroshot_top{k}": v for k, v in acc.items()}  # fractions, as every protocol
    print(format_table([{"metric": k, "value": v} for k, v in metrics.items()]))
    print(f"{len(kept)} images, {len(folders)} classes, {len(templates)} templates")
    record(
        args.results,
        protocol="zeroshot",
        metrics=metrics,
        model=args.run_name or Path(args.model).name,
        checkpoint=str(args.model),
        dataset=args.dataset or Path(str(args.test)).resolve().name,
        extra={
            "num_images": len(kept),
            "num_skipped": len(errors),
            "num_classes": len(folders),
            "num_templates": len(templates),
            "templates": args.templates,
        },
    )
    return 0
