"""Views: what a method asks of the data, and the objects that make those batches.

A method declares a :class:`ViewSpec` (``method.views()``); :func:`build_views` turns it and the
recipe's data settings into a views object that :class:`vssl.train.data.TrainData` drives in three
stages, each seeded by the caller so that batches are a function of ``(seed, epoch, step, rank)``:

1. ``sample(image, rng)`` per image, in DataLoader workers (geometry, uint8);
2. ``collate(views, labels, captions, generator)`` per batch, in workers (stacking, masks);
3. ``finish(batch, generator)`` in the main process, on the training device (photometric
   augmentation or plain normalization, batched).

Kinds:

- ``multicrop``: DINOv2's 2 global + ``n_local`` local crops, optional iBOT block masks
  (``mask="block"``) -> ``{"global", "local", "masks", "mask_indices_list", "masks_weight", ...}``;
- ``single``: one random resized crop + flip (MAE's view) -> ``{"image"}``, with
  ``mask="random"`` MAE's per-sample random masking (``"ids_keep"``, ``"ids_restore"``,
  ``"mask"``) or ``mask="split"`` SplitMask's two disjoint halves (``"ids_a"``, ``"ids_b"``);
- ``captions=True`` (any kind) adds ``"caption"``: the samples' texts, for image–text methods.
  Data without captions is refused before the first step (:class:`MissingViewError`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .augment import MAEView, MultiCropGeometry, MultiCropPhotometric, normalize
from .collate import _crop_major, collate_multicrop
from .masking import BlockMaskGenerator, random_masking, split_halves

__all__ = ["MissingViewError", "MultiCropViews", "SingleViews", "ViewSpec", "build_views"]

KINDS = ("multicrop", "single")
MASKS = (None, "block", "random", "split")


class MissingViewError(ValueError):
    """The data cannot provide a view the method needs (captions for an image–text method)."""


@dataclass(frozen=True)
class ViewSpec:
    """The inputs a method needs (module docstring). ``mask_ratio``: a (lo, hi) range for iBOT
    block masks, a fraction for MAE's random masking; ``patch_size``: the token grid of masks."""

    kind: str = "multicrop"
    mask: str | None = None
    mask_ratio: float | tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    patch_size: int | None = None
    captions: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"view kind must be one of {KINDS}, got {self.kind!r}")
        if self.mask not in MASKS:
            raise ValueError(f"view mask must be one of {MASKS}, got {self.mask!r}")
        if self.mask == "block" and self.kind != "multicrop":
            raise ValueError("iBOT block masks ('block') go with multicrop views")
        if self.mask in ("random", "split") and self.kind != "single":
            raise ValueError(f"{self.mask!r} masks go with a single view")
        if self.mask is not None and not self.patch_size:
            raise ValueError(f"mask={self.mask!r} needs patch_size (the token grid)")


def _seeded(generator: Any) -> torch.Generator:
    """A torch generator from a ``random.Random`` (or the generator itself)."""
    if isinstance(generator, torch.Generator):
        return generator
    seed = (generator or random).getrandbits(63)
    return torch.Generator().manual_seed(seed)


class MultiCropViews:
    """DINOv2's multi-crop with optional iBOT masks (what ``TrainData`` always built)."""

    def __init__(
        self,
        geometry: MultiCropGeometry,
        photometric: MultiCropPhotometric,
        mask_generator: BlockMaskGenerator | None = None,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        captions: bool = False,
    ):
        self.geometry, self.photometric = geometry, photometric
        self.mask_generator = mask_generator
        self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)
        self.captions = captions
        self.draft_size, self.accepts_array = geometry.draft_size, geometry.accepts_array

    def sample(self, image: Any, rng: random.Random) -> dict:
        return self.geometry(image, generator=rng)

    def collate(
        self,
        views: Sequence[dict],
        labels: Sequence[Any],
        captions: Sequence[Any],
        generator: random.Random,
    ) -> dict:
        out = collate_multicrop(
            list(zip(views, labels)),
            mask_generator=self.mask_generator,
            mask_probability=self.mask_probability,
            mask_ratio=self.mask_ratio,
            generator=generator,
        )
        if self.captions:
            out["caption"] = list(captions)
        return out

    def finish(self, batch: dict, generator: torch.Generator) -> dict:
        return self.photometric(batch, generator=generator)

    @property
    def size(self) -> int:
        return self.geometry.global_size

    def __repr__(self) -> str:
        return f"{self.geometry.global_size}/{self.geometry.local_size}x{self.geometry.n_local}"


class SingleViews:
    """One random resized crop + flip per image (MAE, SplitMask), normalized with ImageNet's
    mean/std, with MAE's random mask or SplitMask's halves drawn per batch."""

    def __init__(
        self,
        view: MAEView,
        mask: str | None = None,
        mask_ratio: float = 0.75,
        patch_size: int | None = None,
        captions: bool = False,
    ):
        self.view, self.mask, self.mask_ratio = view, mask, float(mask_ratio)
        self.captions = captions
        self.num_patches = None
        if mask is not None:
            if view.size % patch_size:
                raise ValueError(
                    f"the view size {view.size} is not a multiple of patch_size "
                    f"{patch_size}: the mask grid would not match the tokens"
                )
            self.num_patches = (view.size // patch_size) ** 2
        if mask == "random" and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.draft_size, self.accepts_array = view.draft_size, view.backend == "torch"

    def sample(self, image: Any, rng: random.Random) -> torch.Tensor:
        return self.view(image, generator=rng)

    def collate(
        self,
        views: Sequence[torch.Tensor],
        labels: Sequence[Any],
        captions: Sequence[Any],
        generator: random.Random,
    ) -> dict:
        out: dict[str, Any] = {"image": _crop_major([v.unsqueeze(0) for v in views])}
        n = len(views)
        if self.mask == "random":
            ids_keep, ids_restore, mask = random_masking(
                n, self.num_patches, self.mask_ratio, generator=_seeded(generator)
            )
            out.update(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)
        elif self.mask == "split":
            ids_a, ids_b = split_halves(n, self.num_patches, generator=_seeded(generator))
            out.update(ids_a=ids_a, ids_b=ids_b)
        if all(lab is not None for lab in labels):
            out["label"] = torch.as_tensor([int(lab) for lab in labels], dtype=torch.long)
        if self.captions:
            out["caption"] = list(captions)
        return out

    def finish(self, batch: dict, generator: torch.Generator) -> dict:
        out = dict(batch)
        out["image"] = normalize(batch["image"])
        return out

    @property
    def size(self) -> int:
        return self.view.size

    def __repr__(self) -> str:
        mask = (
            f", {self.mask} mask {self.mask_ratio:g}"
            if self.mask == "random"
            else (f", {self.mask} halves" if self.mask else "")
        )
        return f"1x{self.view.size} scale={self.view.scale}{mask}"


def build_views(
    spec: ViewSpec,
    *,
    global_size: int = 224,
    local_size: int = 98,
    n_local: int = 8,
    global_scale: Sequence[float] = (0.32, 1.0),
    local_scale: Sequence[float] = (0.05, 0.32),
    photometric: Any = True,
) -> MultiCropViews | SingleViews:
    """The views object for ``spec`` with the recipe's data settings. A single view uses the
    global crop settings (``global_size``, ``global_scale``); ``photometric``: True (DINOv2's
    recipe), False/None (normalize only), or a :class:`MultiCropPhotometric`."""
    if spec.kind == "single":
        if photometric not in (False, None):
            raise ValueError(
                "a single view (MAE, SplitMask) is normalized only: set "
                "data.photometric=false (MAE's recipe: crop and flip, no colour)"
            )
        view = MAEView(size=global_size, scale=global_scale)
        return SingleViews(
            view,
            spec.mask,
            float(spec.mask_ratio) if spec.mask == "random" else 0.75,
            spec.patch_size,
            spec.captions,
        )
    geometry = MultiCropGeometry(
        global_size=global_size,
        local_size=local_size,
        n_local=n_local,
        global_scale=global_scale,
        local_scale=local_scale,
    )
    if photometric is True:
        photometric = MultiCropPhotometric()
    elif photometric in (False, None):
        photometric = MultiCropPhotometric(
            jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0
        )
    mask_generator = None
    if spec.mask == "block":
        if global_size % spec.patch_size:
            raise ValueError(
                f"global_size {global_size} is not a multiple of patch_size "
                f"{spec.patch_size}: the iBOT mask grid would not match the tokens"
            )
        grid = global_size // spec.patch_size
        mask_generator = BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    ratio = spec.mask_ratio if isinstance(spec.mask_ratio, tuple) else (0.1, 0.5)
    return MultiCropViews(
        geometry, photometric, mask_generator, spec.mask_probability, ratio, spec.captions
    )
