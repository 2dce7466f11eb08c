"""Data: sources -> decode -> views / masks -> collate, one way (docs/architecture.md, Data flow).

- sources: image folders, path lists, COYO-style parquet manifests, WebDataset tar shards
- stream:  rank/worker-split shard streaming with equal batches per rank; map-style files
- pack:    write and inspect tar shards (``vssl data pack|inspect``)
- decode:  robust decoding (never crashes a run); transforms: the evaluation transform
- augment: DINOv2 multi-crop geometry (CPU, uint8) + batched photometric ops (tensors), MAE and
           SplitMask views; collate: multi-crop batches; masking: iBOT block, MAE, SplitMask masks
"""

from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from .listing import list_inputs
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

# The rest is imported on first use: kornia and webdataset are not needed to embed a folder,
# and every `vssl` command imports this package (PEP 562 lazy attributes).
_LAZY = {
    "MAEView": "augment",
    "MultiCropGeometry": "augment",
    "MultiCropPhotometric": "augment",
    "SplitMaskView": "augment",
    "normalize": "augment",
    "collate_multicrop": "collate",
    "multicrop_collate_fn": "collate",
    "BlockMaskGenerator": "masking",
    "random_masking": "masking",
    "sample_ibot_masks": "masking",
    "split_halves": "masking",
    "inspect_shards": "pack",
    "pack": "pack",
    "FileSource": "sources",
    "Sample": "sources",
    "ShardSource": "sources",
    "open_source": "sources",
    "FileDataset": "stream",
    "ShardStream": "stream",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockMaskGenerator",
    "DEFAULT_MAX_PIXELS",
    "EvalTransform",
    "FileDataset",
    "FileSource",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDecodeError",
    "MAEView",
    "MultiCropGeometry",
    "MultiCropPhotometric",
    "Sample",
    "ShardSource",
    "ShardStream",
    "SplitMaskView",
    "collate_multicrop",
    "inspect_shards",
    "list_inputs",
    "multicrop_collate_fn",
    "normalize",
    "open_image",
    "open_source",
    "pack",
    "random_masking",
    "sample_ibot_masks",
    "split_halves",
]
