"""``vssl embed`` with a two-tower model (a transformers ``CLIPModel`` / ``AlignModel`` /
``SiglipModel`` directory, or a ``vssl pretrain`` run of the ``clip`` method): the image tower's
embeddings in the shared image–text space, so COYO-style retrieval and curation can use them, and
with ``--text FILE`` the text tower's embeddings of its lines.

Outputs follow ``vssl embed``'s layout: ``embeddings.npy`` (N, D) float32, L2-normalized (the
space both towers share; the evaluators use cosines), ``manifest.parquet``, ``errors.jsonl``,
``embed.json``; with ``--text``: ``text_embeddings.npy`` (T, D) and ``texts.jsonl`` (row, text).
Kept out of :mod:`vssl.embed` (which serves vision encoders) so each stays one concept.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["TEXT_EMBEDDINGS", "TEXTS", "embed_two_tower", "is_two_tower"]

TEXT_EMBEDDINGS = "text_embeddings.npy"
TEXTS = "texts.jsonl"


def is_two_tower(model: str) -> bool:
    """A local transformers CLIP / ALIGN / SigLIP directory or a clip run folder."""
    from .evaluate.two_tower import SUPPORTED_TYPES
    from .methods.clip import is_two_tower_run

    d = Path(model).expanduser()
    if not d.is_dir():
        return False
    if is_two_tower_run(d):
        return True
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in SUPPORTED_TYPES


def _save_npy(path: Path, array: np.ndarray) -> None:
    from ._io import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save adds no ".npy"
            np.save(f, array.astype(np.float32))

    atomic_write(path, write)


def embed_two_tower(
    model_path: str,
    inputs: list[tuple[str, str | None]],
    output_dir: str | os.PathLike,
    *,
    text_file: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """Embed ``inputs`` (``list_inputs`` rows) and the lines of ``text_file``; returns counts."""
    from ._io import atomic_write
    from .embed import EMBEDDINGS, ERRORS, INFO, MANIFEST, _write_errors, _write_manifest
    from .evaluate.two_tower import encode_image_files, load_two_tower

    texts = None
    if text_file is not None:
        p = Path(text_file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--text {p} does not exist (a file with one text per line)")
        texts = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not texts:
            raise ValueError(f"--text {p} holds no text (one text per line)")
    model = load_two_tower(model_path, device=device, dtype=dtype, batch_size=batch_size)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p, _ in inputs]
    emb, kept, errors = encode_image_files(model, paths, batch_size=batch_size, progress=progress)
    emb = torch.nn.functional.normalize(emb.float(), dim=-1) if len(kept) else emb
    if not torch.isfinite(emb).all():
        raise ValueError(f"{model_path} produced non-finite image embeddings: nothing written")
    _save_npy(out / EMBEDDINGS, emb.numpy())
    _write_manifest(out / MANIFEST, [(os.path.abspath(paths[i]), inputs[i][1]) for i in kept])
    _write_errors(out / ERRORS, errors)
    info = {
        "model": os.path.abspath(model_path),
        "kind": "two-tower image embeddings (L2-normalized, the shared image-text space)",
        "model_class": repr(model),
        "num_images": len(kept),
        "num_skipped": len(errors),
        "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
    }
    if texts is not None:
        temb = torch.nn.functional.normalize(model.encode_text(texts).float(), dim=-1)
        if not torch.isfinite(temb).all():
            raise ValueError(f"{model_path} produced non-finite text embeddings: nothing written")
        _save_npy(out / TEXT_EMBEDDINGS, temb.numpy())
        lines = "".join(
            json.dumps({"row": i, "text": t}, ensure_ascii=False) + "\n"
            for i, t in enumerate(texts)
        )
        atomic_write(out / TEXTS, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
        info.update(num_texts=len(texts), text_file=os.path.abspath(text_file))
    text = json.dumps(info, indent=1)
    atomic_write(out / INFO, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(
        f"vssl embed: {len(kept)} images -> {out / EMBEDDINGS} {tuple(emb.shape)}"
        + (f", {len(texts)} texts -> {out / TEXT_EMBEDDINGS}" if texts is not None else "")
        + (f"; {len(errors)} skipped ({out / ERRORS})" if errors else ""),
        file=sys.stderr,
        flush=True,
    )
    return info
