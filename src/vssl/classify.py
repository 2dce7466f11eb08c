"""``vssl classify MODEL IMAGES...``: the top-k labels of images, with probabilities.

Two kinds of model answer it:

- a supervised classifier directory (transformers ``*ForImageClassification``, e.g. Kakao Brain's
  ``vit-large-patch16-384``): the directory's own image processor and ``id2label``; the logits are
  transformers' own (the model is run through transformers, PIL processor backend);
- a two-tower model (a transformers ``CLIPModel`` / ``AlignModel`` / ``SiglipModel`` directory, or
  a ``vssl pretrain`` run of the ``clip`` method) with ``--labels``: zero-shot classification.
  Each label is put in ``--template`` and embedded by the text tower; the logits are the model's
  own ``logits_per_image`` (cosine x its logit scale, + SigLIP's bias): softmax over the labels for
  CLIP and ALIGN, an independent sigmoid per label for SigLIP (as each was trained).

Anything else is refused naming what it is and what would work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

__all__ = ["add_classify_parser", "classify", "load_classifier", "run_classify"]

_EPILOG = """\
examples:
  vssl classify kakaobrain-vit-large-patch16-384/ photo.jpg --top-k 3
  vssl classify align-base/ photos/ --labels "a cat,a dog,a car"
  vssl classify runs/cpu_clip32 cifar/test/cat/ --labels labels.txt --json out.json
"""


class _Supervised:
    """A transformers image classifier: ``scores(images) -> (N, C)`` probabilities."""

    kind = "classifier"

    def __init__(self, path: Path, device: str):
        from transformers import AutoModelForImageClassification

        from .evaluate.two_tower import pil_image_processor

        try:
            self.model = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - a broken directory is a user error: name it
            raise ValueError(f"cannot load the image classifier in {path}: {exc}") from exc
        self.processor = pil_image_processor(path)
        self.device = torch.device(device)
        id2label = self.model.config.id2label
        self.labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]
        self.activation = "softmax"

    @torch.inference_mode()
    def logits(self, images: list) -> torch.Tensor:
        px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=px).logits.float().cpu()


class _ZeroShot:
    """A two-tower model and label prompts: ``logits(images) -> (N, C)``."""

    kind = "zero-shot"

    def __init__(self, model, labels: list[str], template: str):
        self.model, self.labels = model, labels
        prompts = [template.format(lab) for lab in labels]
        text = torch.nn.functional.normalize(model.encode_text(prompts).float(), dim=-1)
        self.text = text
        self.scale, self.bias, self.activation = _logit_params(model)

    @torch.inference_mode()
    def logits(self, images: list) -> torch.Tensor:
        img = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        return self.scale * img @ self.text.T + self.bias


@torch.no_grad()
def _logit_params(model) -> tuple[float, float, str]:
    """(scale, bias, activation) of a two-tower model's ``logits_per_image``."""
    from .methods.clip import CLIPRun

    if isinstance(model, CLIPRun):
        logit = model.method.student["logit"]
        bias = 0.0 if logit.logit_bias is None else float(logit.logit_bias)
        act = "sigmoid" if model.method.cfg.loss == "siglip" else "softmax"
        return float(logit.logit_scale.exp()), bias, act
    m = model.model
    if model.model_type == "align":  # AlignModel: cosine / temperature
        return 1.0 / float(m.temperature), 0.0, "softmax"
    if model.model_type == "siglip":
        return float(m.logit_scale.exp()), float(m.logit_bias), "sigmoid"
    return float(m.logit_scale.exp()), 0.0, "softmax"


def _read_labels(spec: str) -> list[str]:
    p = Path(spec).expanduser()
    if p.is_file():
        labels = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    else:
        labels = [s.strip() for s in spec.split(",")]
    labels = [lab for lab in labels if lab and not lab.startswith("#")]
    if len(labels) < 2:
        raise ValueError(
            f"--labels needs at least 2 labels (a comma-separated list or a file with one per "
            f"line), got {labels}"
        )
    return labels


def load_classifier(
    model: str, labels: str | None = None, template: str = "a photo of a {}.", device: str = "cpu"
):
    """A supervised classifier or a zero-shot two-tower classifier for ``model`` (module doc)."""
    from .evaluate.two_tower import SUPPORTED_TYPES, load_two_tower
    from .methods.clip import is_two_tower_run

    d = Path(model).expanduser()
    if not d.exists():
        raise FileNotFoundError(f"model not found: {d} (give a local model directory)")
    cfg_file = d / "config.json"
    two_tower = is_two_tower_run(d)
    info: dict = {}
    if not two_tower and cfg_file.is_file():
        try:
            info = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None
        two_tower = info.get("model_type") in SUPPORTED_TYPES
    if two_tower:
        if labels is None:
            raise ValueError(
                f"{d} is a two-tower (image-text) model: give the candidate labels for zero-shot "
                'classification, e.g. --labels "a cat,a dog" or --labels labels.txt'
            )
        if template.count("{}") != 1:
            raise ValueError(f"--template must contain {{}} once (the label), got {template!r}")
        return _ZeroShot(load_two_tower(d, device=device), _read_labels(labels), template)
    archs = [a for a in info.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForImageClassification") for a in archs):
        if labels is not None:
            raise ValueError(
                f"{d} is a supervised classifier ({archs[0]}) with its own "
                f"{len(info.get('id2label') or {})} labels: --labels is for two-tower models"
            )
        return _Supervised(d, device)
    if info:
        what = f"a {info.get('model_type', '?')} model ({', '.join(archs) or 'no architectures'})"
    elif (d / "config.yaml").is_file():
        what = "a `vssl pretrain` run of a language-free method (an encoder, no classes)"
    else:
        what = "neither a transformers directory nor a vssl run"
    raise ValueError(
        f"{d} is {what}: vssl classify needs an image classifier (transformers "
        "*ForImageClassification, e.g. ViTForImageClassification) or a two-tower model "
        "(CLIPModel, AlignModel, SiglipModel, or a vssl run of the clip method) with --labels. "
        "For an encoder's features use `vssl embed`; for its accuracy `vssl eval knn/linear`; "
        "for zero-shot with it, train a text tower on it (the lit_* recipes)"
    )


def classify(clf, paths: list[str], top_k: int = 5, batch_size: int = 32) -> tuple[list, list]:
    """``(results, errors)``: per readable image ``{"image", "top": [{"label", "score"}]}``."""
    from .data.decode import ImageDecodeError, open_image

    k = min(top_k, len(clf.labels))
    results, errors = [], []
    for start in range(0, len(paths), batch_size):
        images, kept = [], []
        for p in paths[start : start + batch_size]:
            try:
                images.append(open_image(p))
                kept.append(p)
            except ImageDecodeError as exc:
                errors.append({"path": str(p), "error": exc.reason})
        if not images:
            continue
        logits = clf.logits(images)
        probs = logits.sigmoid() if clf.activation == "sigmoid" else logits.softmax(-1)
        top = probs.topk(k, dim=-1)
        for p, vals, idx in zip(kept, top.values.tolist(), top.indices.tolist()):
            results.append(
                {
                    "image": str(p),
                    "top": [{"label": clf.labels[i], "score": v} for v, i in zip(vals, idx)],
                }
            )
    return results, errors


def add_classify_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "classify",
        help="top-k labels of images: a supervised classifier, or zero-shot with a two-tower model",
        description="Print the top-k labels of each image with probabilities. MODEL is a "
        "transformers image classifier directory (ViTForImageClassification, ...) or a "
        "two-tower model (CLIPModel / AlignModel / SiglipModel directory, or a vssl run of the "
        "clip method) used zero-shot with --labels.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="local model directory or vssl run folder")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    p.add_argument(
        "--labels",
        default=None,
        metavar="LIST_OR_FILE",
        help='zero-shot labels: "a cat,a dog" or a file with one per line (two-tower models)',
    )
    p.add_argument(
        "--template",
        default="a photo of a {}.",
        help="prompt each zero-shot label is put in ({} = the label; '{}' uses labels as "
        "they are; default 'a photo of a {}.')",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results here")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run_classify)
    return p


def run_classify(args: argparse.Namespace) -> int:
    from ._io import atomic_write
    from .data.listing import list_inputs

    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be >= 1")
    paths: list[str] = []
    for spec in args.images:
        try:
            paths += [str(p) for p, _ in list_inputs(spec)]
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {spec}") from None
    if not paths:
        raise ValueError(f"no image files in {' '.join(args.images)}")
    clf = load_classifier(args.model, args.labels, args.template, args.device)
    results, errors = classify(clf, paths, args.top_k, args.batch_size)
    for e in errors:
        print(f"vssl classify: skipped {e['path']}: {e['error']}", file=sys.stderr)
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['score']:.4f}  {t['label']}")
    if args.json:
        text = json.dumps(
            {"model": str(args.model), "kind": clf.kind, "results": results, "errors": errors},
            indent=1,
        )
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if not results:
        raise ValueError("no image could be read (see the messages above)")
    return 0
