"""Read and write the checkpoint formats people hold, strictly.

Formats read (detected, not declared):
  * native DINOv2 / Web-SSL ``.pth``: plain keys, chunked ``blocks.<chunk>.<i>`` keys, DDP
    ``module.`` / ``backbone.`` / ``teacher.`` / ``student.`` prefixes, training checkpoints that
    wrap the weights in ``{"teacher": ...}`` or ``{"model": ...}`` and carry DINO / iBOT heads;
  * timm-style MAE encoder ``.pth`` (same names, no LayerScale or mask token; an MAE pretraining
    checkpoint's ``decoder_*`` part is set aside like a head);
  * transformers directories of Dinov2Model, Dinov2WithRegistersModel and ViTModel (safetensors,
    sharded safetensors, or ``pytorch_model.bin``); their ``config.json`` describes the model;
  * vssl's own ``.safetensors`` (native key names + the config in the file's metadata).

Loading is strict: any missing, unexpected or misshapen key raises ``CheckpointError`` naming the
keys and the zoo entries / overrides that would fit. Tensors are read memory-mapped and assigned
into a model built on the meta device, so the weights exist once in memory (converted one tensor at
a time to the requested dtype and device). transformers is not imported: its on-disk key names and
config fields are written by hand here, and the tests check them against transformers itself.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_write
from ..errors import CheckpointError
from .registry import ZOO, get_config
from .vit import VisionTransformer, ViTConfig

log = logging.getLogger("vssl")

HEAD_PREFIXES = (
    "dino_head.",
    "ibot_head.",
    "head.",
    "decoder",
    "pooler.",
    "classifier.",
    "fc_norm.",
)
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None


@dataclass
class Checkpoint:
    """Backbone weights in native key names, plus what else the file carried."""

    state_dict: dict[str, torch.Tensor]
    format: str  # "native" | "hf" | "vssl"
    source: str
    config: ViTConfig | None = None  # when the file describes its architecture (hf, vssl)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # dino_head.*, ibot_head.*, ...
    origin_interpolation: dict | None = None  # interpolation settings implied by the origin


# ---------------------------------------------------------------------------------------------
# reading raw tensors
# ---------------------------------------------------------------------------------------------
# What a file that is not a checkpoint starts with: named in the error instead of torch's
# unpickler message (``invalid load key``, ``101``, ``Unsupported operand 255``).
_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"PAR1", "a Parquet file"),
    (b"\x89HDF", "an HDF5 file"),
    (b"GGUF", "a GGUF model file"),
    (b"\x7fELF", "an executable (ELF)"),
)


def sniff_file(path: str | Path) -> tuple[str | None, str]:
    """What ``path`` holds by its first bytes: ``(kind, description)``.

    ``kind``: ``"zip"`` (torch's zip format), ``"pickle"`` (legacy torch format), ``"safetensors"``,
    or None for anything else (``description`` then says what it looks like: "a JPEG image",
    "a text file", ...).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        return "zip", "a zip archive"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", "a pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors", "a safetensors file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return None, what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None, "a WebP image"
    if len(head) > 262 and head[257:262] == b"ustar":
        return None, "a tar archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            return None, "a text file (JSON)"
        if stripped.startswith("<"):
            return None, "a text file (HTML/XML: a web page saved instead of the file?)"
        return None, "a text file"
    return None, f"an unknown binary format (first bytes {head[:8].hex(' ')})"


_READS = (
    "vssl reads torch .pth/.pt/.bin files, .safetensors, transformers model folders and "
    "`vssl pretrain` run folders"
)


def _not_a_checkpoint(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a checkpoint: it is {what}. {_READS}")


def _explain_torch_error(path: Path, e: Exception) -> CheckpointError:
    """torch.load's failure in words a user can act on; never torch's weights_only=False advice."""
    text = str(e)
    if "weights_only" in text or "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" (e.g. {found.group(1)})" if found else ""
        return CheckpointError(
            f"refusing to unpickle {path}: the file holds Python objects other than tensors{what}, "
            "and vssl loads checkpoints with weights_only=True so that no code inside a file can "
            "run. If you trust the file's source, extract its tensors in your own Python session "
            "and save them as a plain state dict (torch.save(state_dict, ...)) or as .safetensors"
        )
    if "central directory" in text or "PytorchStreamReader" in text or "zip" in text.lower():
        return CheckpointError(
            f"cannot read {path}: it is a zip archive but not a complete torch checkpoint "
            f"(truncated download or another kind of zip?): {text.splitlines()[0] if text else e}"
        )
    first = text.splitlines()[0] if text else type(e).__name__
    return CheckpointError(
        f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {first}); the file is "
        "damaged or not a torch file. " + _READS
    )


def _torch_load(path: Path):
    kind, what = sniff_file(path)
    if kind not in ("zip", "pickle"):
        if what.startswith("an unknown"):
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint: it is damaged or not a torch file "
                f"({what}). {_READS}"
            )
        raise _not_a_checkpoint(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as e:  # pickle errors, truncated zips, unsupported globals
        raise _explain_torch_error(path, e) from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        kind, what = sniff_file(path)
        if kind != "safetensors" and not what.startswith("an unknown"):
            raise _not_a_checkpoint(path, what) from None
        raise CheckpointError(
            f"cannot read {path} as safetensors (damaged or truncated?): {e}"
        ) from None


def _unwrap(obj, path: Path, checkpoint_key: str | None) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a training checkpoint's nesting."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            raise CheckpointError(
                f"{path} has no key {checkpoint_key!r}; top-level keys: {sorted(obj)[:20]}"
            )
        obj = obj[checkpoint_key]
    else:
        for key in ("teacher", "model", "state_dict", "module"):
            if (
                key in obj
                and isinstance(obj[key], dict)
                and not isinstance(obj.get(key), torch.Tensor)
            ):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} contains no tensors at the top level (keys: {sorted(obj)[:20]}); pass "
            "checkpoint_key= (--checkpoint-key) to pick the entry that holds the weights"
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# key normalization
# ---------------------------------------------------------------------------------------------
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _strip(sd: dict, prefix: str) -> dict:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}


def normalize_native_keys(sd: dict[str, torch.Tensor], branch: str | None = None):
    """Native DINOv2 / Web-SSL / timm names -> vssl names; returns (backbone, heads)."""
    for p in ("module.", "_orig_mod."):
        sd = _strip(sd, p)
    sd = {
        k.replace("_checkpoint_wrapped_module.", "").replace("._orig_mod", ""): v
        for k, v in sd.items()
    }
    has_teacher = any(k.startswith("teacher.") for k in sd)
    has_student = any(k.startswith("student.") for k in sd)
    if has_teacher or has_student:
        want = branch or ("teacher" if has_teacher else "student")
        if want not in ("teacher", "student"):
            raise CheckpointError(f"branch must be 'teacher' or 'student', got {want!r}")
        sd = {k[len(want) + 1 :]: v for k, v in sd.items() if k.startswith(want + ".")}
        if not sd:
            raise CheckpointError(f"the checkpoint has no {want}.* weights")
    sd = _strip(sd, "backbone.")
    backbone, heads = {}, {}
    for k, v in sd.items():
        if k.startswith(HEAD_PREFIXES) or k.startswith("decoder_"):
            heads[k] = v
            continue
        backbone[_CHUNKED.sub(r"blocks.\1.", k)] = v
    # An MAE pretraining checkpoint's mask_token (1, 1, D_decoder) belongs to the decoder.
    if (
        any(k.startswith("decoder_") for k in heads)
        and "mask_token" in backbone
        and backbone["mask_token"].ndim == 3
    ):
        heads["mask_token"] = backbone.pop("mask_token")
    return backbone, heads


_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_NAMES = {
    "norm1": "norm1",
    "layernorm_before": "norm1",
    "norm2": "norm2",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_naming(sd: dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


def hf_to_native(sd: dict[str, torch.Tensor]):
    """transformers Dinov2 / Dinov2WithRegisters / ViT names -> vssl; returns (backbone, heads).

    Reads the on-disk names, and also the in-memory names of transformers 5.x (q_proj, gate_proj,
    ...) for state dicts saved with ``torch.save(model.state_dict())``.
    """
    for p in ("dinov2.", "vit.", "model."):  # *ForImageClassification / *ForPreTraining wrappers
        if any(k.startswith(p + "embeddings.") for k in sd):
            sd = _strip(sd, p)
    out, heads, parts = {}, {}, {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_BLOCK.match(k)
        if not m:
            (heads if k.startswith(HEAD_PREFIXES) else out)[k] = v
            continue
        i, rest = m.group(1), m.group(2)
        name, _, leaf = rest.rpartition(".")
        qkv = {
            "attention.attention.query": "q",
            "attention.attention.key": "k",
            "attention.attention.value": "v",
            "attention.q_proj": "q",
            "attention.k_proj": "k",
            "attention.v_proj": "v",
            "mlp.gate_proj": "gate",
            "mlp.up_proj": "up",
        }.get(name)
        if qkv:
            parts.setdefault((i, "attn.qkv" if qkv in "qkv" else "mlp.w12", leaf), {})[qkv] = v
        elif name in _HF_BLOCK_NAMES:
            leaf = "gamma" if leaf == "lambda1" else leaf
            out[f"blocks.{i}.{_HF_BLOCK_NAMES[name]}.{leaf}"] = v
        else:
            out[k] = v  # left as is: reported as unexpected by the strict check
    for (i, target, leaf), d in parts.items():
        order = ("q", "k", "v") if target == "attn.qkv" else ("gate", "up")
        if set(d) != set(order):
            for n, t in d.items():
                out[f"encoder.layer.{i}.{target}.{n}.{leaf}"] = t  # incomplete: unexpected
            continue
        out[f"blocks.{i}.{target}.{leaf}"] = torch.cat([d[n] for n in order], dim=0)
    return out, heads


# ---------------------------------------------------------------------------------------------
# transformers config <-> ViTConfig
# ---------------------------------------------------------------------------------------------
HF_SUPPORTED = ("dinov2", "dinov2_with_registers", "vit")


def config_from_hf(cfg: dict, has_mask_token: bool = False) -> ViTConfig:
    mt = cfg.get("model_type")
    if mt not in HF_SUPPORTED:
        raise CheckpointError(
            f"transformers model_type {mt!r} is not supported; vssl reads {', '.join(HF_SUPPORTED)}"
        )
    act = cfg.get("hidden_act", "gelu")
    d = int(cfg["hidden_size"])
    common = dict(
        embed_dim=d,
        depth=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        patch_size=int(cfg.get("patch_size", 16)),
        img_size=int(cfg.get("image_size", 224)),
        in_chans=int(cfg.get("num_channels", 3)),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        interpolate_offset=0.0,
    )
    if mt == "vit":
        if act != "gelu":
            raise CheckpointError(f"ViT with hidden_act={act!r} is not supported (gelu only)")
        return ViTConfig(
            **common,
            mlp_ratio=int(cfg.get("intermediate_size", 4 * d)) / d,
            ffn="mlp",
            layerscale=None,
            norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            mask_token=has_mask_token,
            interpolate_antialias=False,
            family="mae",
        )
    swiglu = bool(cfg.get("use_swiglu_ffn", False))
    if not swiglu and act != "gelu":
        raise CheckpointError(f"Dinov2 with hidden_act={act!r} is not supported (gelu or SwiGLU)")
    return ViTConfig(
        **common,
        mlp_ratio=float(cfg.get("mlp_ratio", 4)),
        ffn="swiglu" if swiglu else "mlp",
        layerscale=float(cfg.get("layerscale_value", 1.0)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
        num_register_tokens=int(cfg.get("num_register_tokens", 0))
        if mt == "dinov2_with_registers"
        else 0,
        mask_token=True,
        interpolate_antialias=(mt == "dinov2_with_registers"),
        family="dinov2",
    )


def _hf_interpolation(model_type: str) -> dict:
    return {
        "interpolate_offset": 0.0,
        "interpolate_antialias": model_type == "dinov2_with_registers",
    }


def read_hf_dir(path: Path) -> tuple[dict, dict]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} is a directory without config.json: not a transformers model directory"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if cfg.get("model_type") not in HF_SUPPORTED:  # fail before reading gigabytes of weights
        raise CheckpointError(
            f"{path}: transformers model_type {cfg.get('model_type')!r} is not supported; vssl "
            f"reads {', '.join(HF_SUPPORTED)}"
        )
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        sd, _ = _load_safetensors(path / "model.safetensors")
    elif index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(_load_safetensors(path / f)[0])
    elif (path / "pytorch_model.bin").is_file():
        sd = _unwrap(_torch_load(path / "pytorch_model.bin"), path, None)
    else:
        raise CheckpointError(
            f"{path} has a config.json but no weights (model.safetensors, a sharded "
            "model.safetensors.index.json, or pytorch_model.bin)"
        )
    return sd, cfg


#: The encoder a `vssl pretrain` run folder exports; runs before the method contract (DINOv2 only)
#: wrote the second name.
RUN_BACKBONE_FILES = ("backbone.safetensors", "teacher_backbone.safetensors")


def run_backbone(run_dir: str | Path) -> Path | None:
    """The exported encoder of a run folder (``backbone.safetensors``, or an older run's
    ``teacher_backbone.safetensors``); None when there is none."""
    for name in RUN_BACKBONE_FILES:
        p = Path(run_dir) / name
        if p.is_file():
            return p
    return None


def is_step_folder(path: str | Path) -> bool:
    """A training checkpoint folder (``RUN/ckpt/step_N/``: torch.distributed.checkpoint)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def describe_source(path: str | Path) -> str | None:
    """One line saying what a folder given as a checkpoint is and what is read from it (a run
    folder: its exported encoder); None for a plain file or a transformers folder."""
    path = Path(path)
    if not path.is_dir() or (path / "config.json").exists():
        return None
    exported = run_backbone(path)
    if exported is not None:
        return f"run folder {path}: using its encoder {exported.name}"
    if is_step_folder(path):
        cfg = _run_config(path.parent.parent)
        method = str((cfg.get("method") or {}).get("name") or "")
        branch = {"dinov2": "the teacher's", "mae": "the student's"}.get(method, "its")
        return (
            f"training checkpoint {path}: using {branch} backbone (the encoder at this step; "
            "optimizer state and heads are not read)"
        )
    return None


def _run_config(run: Path) -> dict:
    """The ``model`` and ``method`` sections of a run's ``config.yaml`` ({} when unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _read_step_folder(path: Path) -> Checkpoint | None:
    """The encoder of a training checkpoint ``RUN/ckpt/step_N/`` (torch.distributed.checkpoint):
    ``model.teacher.backbone.*`` (DINOv2: the teacher is the encoder it evaluates and exports) or
    ``model.student.backbone.*`` (MAE), with the architecture from the run's ``config.yaml``.

    ``.metadata`` is read only through the trainer's restricted unpickler; None when this vssl has
    none (the caller then points to the run's exported encoder).
    """
    try:
        from ..train import checkpoint as tc

        reader_cls, planner_cls = tc._SafeReader, tc._SafeLoadPlanner
        read_metadata, quiet = tc.read_dcp_metadata, tc._quiet_single_process
    except (ImportError, AttributeError):
        return None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    why = tc.verify_checkpoint(path) if hasattr(tc, "verify_checkpoint") else None
    if why is not None:
        raise CheckpointError(f"{path} is not a complete training checkpoint: {why}")
    md = read_metadata(path)
    run = path.parent.parent if path.parent.name == "ckpt" else path.parent
    cfg = _run_config(run)
    method = str((cfg.get("method") or {}).get("name") or "")
    keys = set(md.state_dict_metadata)
    has = {
        b: any(k.startswith(f"model.{b}.backbone.") for k in keys) for b in ("teacher", "student")
    }
    branch = {"dinov2": "teacher", "mae": "student"}.get(method)
    if branch is None or not has[branch]:
        branch = "teacher" if has["teacher"] else "student"
    prefix = f"model.{branch}.backbone."
    sd = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in md.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not sd:
        raise CheckpointError(
            f"{path} holds no encoder weights (no model.teacher.backbone.* or "
            "model.student.backbone.* entries): not a `vssl pretrain` checkpoint"
        )
    try:
        with quiet():
            dcp.load(
                sd,
                checkpoint_id=str(path),
                storage_reader=reader_cls(str(path)),
                planner=planner_cls(allow_partial_load=True),
            )
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        inner = [x for x in (e, e.__cause__, e.__context__) if isinstance(x, CheckpointError)]
        why = str(inner[0]) if inner else (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} cannot be read: {why}") from None
    backbone = {k[len(prefix) :]: v for k, v in sd.items()}
    model_cfg = cfg.get("model") or {}
    config = None
    name = model_cfg.get("name")
    if isinstance(name, str) and name in ZOO:
        arch = {
            k: v for k, v in model_cfg.items() if k not in ("name", "weights", "checkpoint_key")
        }
        arch = arch.pop("arch", None) or arch  # written flat; an `arch:` mapping works too
        try:
            config = get_config(name, **arch)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{run / 'config.yaml'}: model section: {e}") from None
    source = f"{path} ({branch} backbone)"
    return Checkpoint(backbone, "vssl-step", source, config, {})


def _step_folder_hint(path: Path) -> str:
    """Where the encoder of the run a step folder belongs to is (or will be)."""
    run = path.parent.parent if path.parent.name == "ckpt" else None
    exported = run_backbone(run) if run is not None else None
    if exported is not None:
        return (
            f"Use the run's exported encoder: {exported} (or the run folder {run}), the weights "
            "of the run's last step"
        )
    if run is not None:
        return (
            f"The run folder {run} has no exported encoder (backbone.safetensors) yet: it is "
            "written when the run ends; resume the run (`vssl pretrain` on the same output folder) "
            "and use RUN/backbone.safetensors"
        )
    return "Pass the run folder's backbone.safetensors instead (written when a run ends)"


def _step_folder_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a training checkpoint (a torch.distributed.checkpoint step folder with "
        f"optimizer state), not a model checkpoint. {_step_folder_hint(path)}"
    )


_LAYERSCALE_KEY = re.compile(r"^blocks\.\d+\.ls[12]\.gamma$")


def _drop_identity_layerscale(
    sd: dict[str, torch.Tensor], config: ViTConfig | None, hf_cfg: dict | None
) -> tuple[dict[str, torch.Tensor], ViTConfig | None]:
    """transformers' Dinov2 always has LayerScale; a model without it is exported with gammas of
    ones (``_native_to_hf``). Read those back as no LayerScale, so a round trip keeps the
    architecture: when every gamma is exactly 1.0 (or the export marked ``vssl_layerscale: null``
    in config.json and the gammas are still ones)."""
    keys = [k for k in sd if _LAYERSCALE_KEY.match(k)]
    if not keys or (config is not None and config.family != "dinov2"):
        return sd, config
    marker = (hf_cfg or {}).get("vssl_layerscale", "absent")
    if marker not in (None, "absent"):  # exported from a model with LayerScale: keep it
        return sd, config
    if not all(bool((sd[k] == 1).all()) for k in keys):
        return sd, config
    log.info("LayerScale gammas are all exactly 1.0: read as a model without LayerScale")
    sd = {k: v for k, v in sd.items() if k not in set(keys)}
    return sd, (config.replace(layerscale=None) if config is not None else None)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (non-finite values, values)}`` for every floating tensor holding NaN or Inf.

    One reduction per tensor (a sum is non-finite when any value is), the exact count only for
    the tensors that fail it.
    """
    bad = {}
    for k, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(t.sum(dtype=acc))):  # sums of finite values stay finite in fp32
            continue
        n = int((~torch.isfinite(t)).sum())
        if n:
            bad[k] = (n, t.numel())
    return bad


def check_finite(tensors: dict[str, torch.Tensor], source: str, what: str = "") -> None:
    """CheckpointError naming the tensors of ``source`` that hold NaN or Inf values."""
    bad = nonfinite_tensors(tensors)
    if not bad:
        return
    names = sorted(bad, key=_natural)
    shown = "; ".join(f"{k} ({bad[k][0]:,} of {bad[k][1]:,} values)" for k in names[:8])
    more = f"; ... and {len(names) - 8} more" if len(names) > 8 else ""
    raise CheckpointError(
        f"{source}: {len(names)} tensor(s){what} hold NaN/Inf values: {shown}{more}. The file is "
        "damaged (re-download or re-export it) or was saved from a run that diverged"
    )


def read_checkpoint(
    path: str | Path,
    checkpoint_key: str | None = None,
    branch: str | None = None,
    *,
    check_weights: bool = True,
) -> Checkpoint:
    """Read any supported checkpoint into native key names (no model is built).

    ``check_weights``: raise ``CheckpointError`` naming any tensor with NaN or Inf values (a
    damaged file); ``vssl info`` passes False and reports them instead.
    """
    ck = _read_checkpoint(Path(path), checkpoint_key, branch)
    if check_weights:
        check_finite(ck.state_dict, ck.source)
        check_finite(ck.heads, ck.source, " of its heads")
    return ck


def _read_checkpoint(path: Path, checkpoint_key: str | None, branch: str | None) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        exported = run_backbone(path)
        if exported is not None:  # a `vssl pretrain` run folder: its exported encoder
            log.info("%s is a run folder: reading its encoder %s", path, exported.name)
            return _read_checkpoint(exported, checkpoint_key, branch)
        if is_step_folder(path):
            try:
                ck = _read_step_folder(path)
            except CheckpointError as e:
                raise CheckpointError(f"{e}. {_step_folder_hint(path)}") from None
            if ck is None:
                raise _step_folder_error(path)
            return ck
        if (path / "config.yaml").is_file() or (path / "ckpt").is_dir():
            raise CheckpointError(
                f"{path} is a `vssl pretrain` run folder without an exported encoder "
                "(backbone.safetensors, written when the run ends): resume the run to finish it"
            )
    if path.is_dir():
        raw, hf_cfg = read_hf_dir(path)
        sd, heads = hf_to_native(raw)
        config = config_from_hf(hf_cfg, "mask_token" in sd)
        sd, config = _drop_identity_layerscale(sd, config, hf_cfg)
        return Checkpoint(
            sd,
            "hf",
            str(path),
            config,
            heads,
            _hf_interpolation(hf_cfg.get("model_type", "")),
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    kind = "safetensors" if path.suffix == ".safetensors" else sniff_file(path)[0]
    if kind == "safetensors":
        raw, meta = _load_safetensors(path)
        if meta.get("format") == "vssl" and "vssl_config" in meta:
            try:
                cfg = ViTConfig.from_dict(json.loads(meta["vssl_config"]))
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: invalid vssl_config metadata: {e}") from None
            sd, heads = normalize_native_keys(raw)
            return Checkpoint(sd, "vssl", str(path), cfg, heads)
    else:
        raw = _unwrap(_torch_load(path), path, checkpoint_key)
    if is_hf_naming(raw):
        sd, heads = hf_to_native(raw)
        sd, _ = _drop_identity_layerscale(sd, None, None)
        # no config.json beside it: registers mean Dinov2WithRegisters (antialiased resize)
        interp = _hf_interpolation("dinov2_with_registers" if "register_tokens" in sd else "dinov2")
        return Checkpoint(sd, "hf", str(path), None, heads, interp)
    sd, heads = normalize_native_keys(raw, branch)
    return Checkpoint(sd, "native", str(path), None, heads)


# ---------------------------------------------------------------------------------------------
# architecture inference and suggestions
# ---------------------------------------------------------------------------------------------
def infer_architecture(sd: dict[str, torch.Tensor]) -> dict:
    """What the tensors' shapes say about the architecture (not num_heads: shapes can't tell)."""
    arch: dict = {}
    if "cls_token" in sd:
        arch["embed_dim"] = sd["cls_token"].shape[-1]
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        arch["embed_dim"], arch["in_chans"], arch["patch_size"] = w.shape[0], w.shape[1], w.shape[2]
    stem = sorted(
        (k for k in sd if re.match(r"^patch_embed\.stem\.\d+\.weight$", k)),
        key=lambda k: int(k.split(".")[2]),
    )
    if stem:  # ConvStem: stride-2 3x3 convs, then the 1x1 conv to the width
        convs = [sd[k] for k in stem if sd[k].ndim == 4]
        arch["stem"] = "conv"
        arch["in_chans"], arch["embed_dim"] = convs[0].shape[1], convs[-1].shape[0]
        arch["patch_size"] = 2 ** sum(1 for c in convs if c.shape[-1] == 3)
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))]
    if idx:
        arch["depth"] = max(idx) + 1
    pos = sd.get("pos_embed")
    if pos is not None and "patch_size" in arch:
        g = int(round((pos.shape[1] - 1) ** 0.5))
        if g * g == pos.shape[1] - 1:
            arch["img_size"] = g * arch["patch_size"]
    arch["num_register_tokens"] = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    arch["mask_token"] = "mask_token" in sd
    arch["layerscale"] = "blocks.0.ls1.gamma" in sd
    d = arch.get("embed_dim")
    if "blocks.0.mlp.w12.weight" in sd and d:
        arch["ffn"] = "swiglu"
        arch["ffn_hidden_dim"] = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
    elif "blocks.0.mlp.fc1.weight" in sd and d:
        arch["ffn"] = "mlp"
        arch["ffn_hidden_dim"] = sd["blocks.0.mlp.fc1.weight"].shape[0]
    arch["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    arch["proj_bias"] = "blocks.0.attn.proj.bias" in sd
    if "ffn" in arch:
        arch["ffn_bias"] = (
            "blocks.0.mlp.w12.bias" if arch["ffn"] == "swiglu" else "blocks.0.mlp.fc1.bias"
        ) in sd
    return arch


def _config_arch(cfg: ViTConfig) -> dict:
    return {
        "embed_dim": cfg.embed_dim,
        "in_chans": cfg.in_chans,
        "patch_size": cfg.patch_size,
        "depth": cfg.depth,
        "img_size": cfg.img_size,
        "num_register_tokens": cfg.num_register_tokens,
        "mask_token": cfg.mask_token,
        "layerscale": cfg.layerscale is not None,
        "ffn": cfg.ffn,
        "ffn_hidden_dim": cfg.ffn_hidden_dim,
        "qkv_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "ffn_bias": cfg.ffn_bias,
        "stem": cfg.stem,
    }


def matching_zoo_names(arch: dict) -> list[str]:
    return [
        n
        for n, e in sorted(ZOO.items())
        if all(_config_arch(e.config).get(k) == v for k, v in arch.items())
    ]


def suggest(config: ViTConfig, sd: dict) -> str:
    """Overrides and zoo entries that would make ``sd`` fit."""
    arch = infer_architecture(sd)
    have = _config_arch(config)
    overrides = []
    for k, v in arch.items():
        if have.get(k) == v or k == "ffn_hidden_dim":
            continue
        if k == "layerscale":
            overrides.append(f"layerscale={1e-5 if v else None}")
        elif k == "ffn":
            overrides.append(f"ffn={v!r}")
        else:
            overrides.append(f"{k}={v}")
    if (
        arch.get("ffn_hidden_dim")
        and arch.get("ffn") == config.ffn
        and arch.get("embed_dim") == config.embed_dim
        and arch["ffn_hidden_dim"] != config.ffn_hidden_dim
    ):
        overrides.append(
            f"mlp_ratio={arch['ffn_hidden_dim'] / config.embed_dim:g} (ffn hidden "
            f"{arch['ffn_hidden_dim']} vs {config.ffn_hidden_dim})"
        )
    names = matching_zoo_names(arch)
    lines = []
    if names:
        lines.append("zoo entries with this architecture: " + ", ".join(names))
    if overrides:
        lines.append("overrides that would fit: " + " ".join(overrides))
    if not lines:
        lines.append(
            "no zoo entry matches these shapes (inferred: "
            + ", ".join(f"{k}={v}" for k, v in arch.items())
            + ")"
        )
    return "\n".join(lines)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _fmt_keys(keys, limit=8) -> str:
    keys = sorted(keys, key=_natural)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and misshapen key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    shapes = {k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]}
    if not (missing or unexpected or shapes):
        return
    msg = [
        f"{source} does not fit the model "
        f"({model.config.embed_dim}-d, depth {model.config.depth}, patch {model.config.patch_size}, "
        f"img_size {model.config.img_size}, ffn {model.config.ffn}):"
    ]
    if missing:
        msg.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        msg.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if shapes:
        msg.append(
            f"  shape mismatches ({len(shapes)}): "
            + "; ".join(
                f"{k} checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                for k in sorted(shapes)[:8]
            )
        )
    msg.append(suggest(model.config, sd))
    raise CheckpointError("\n".join(msg))


# ---------------------------------------------------------------------------------------------
# building models
# ---------------------------------------------------------------------------------------------
def build_loaded(
    config: ViTConfig, sd: dict[str, torch.Tensor], source: str, *, dtype=None, device="cpu"
) -> VisionTransformer:
    """Meta-device model + strict check + assign: the weights are never held twice."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    check_state_dict(model, sd, source)
    dtype = parse_dtype(dtype)
    target_dtype = dtype or torch.float32
    for k in list(sd):  # convert one tensor at a time, dropping the source reference as we go
        t = sd[k]
        if t.dtype != target_dtype or t.device != torch.device(device):
            sd[k] = t.to(device=device, dtype=target_dtype)
    if target_dtype == torch.float16:  # values beyond fp16's range (65504) become Inf
        check_finite(sd, source, " after conversion to fp16 (use bf16 or fp32)")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def load_model(
    path,
    *,
    config: ViTConfig | None = None,
    dtype=None,
    device="cpu",
    checkpoint_key=None,
    branch=None,
    explicit_overrides: dict | None = None,
    zoo_name: str | None = None,
    **overrides,
) -> VisionTransformer:
    """Load ``path`` into ``config`` (a zoo config) or into the architecture the file describes."""
    ck = read_checkpoint(path, checkpoint_key=checkpoint_key, branch=branch)
    if ck.heads:
        groups = sorted({k.split(".")[0] for k in ck.heads})
        log.info(
            "%s: set aside %d non-backbone tensors (%s)", path, len(ck.heads), ", ".join(groups)
        )
    explicit = dict(explicit_overrides or {}) | overrides
    if config is None:
        config = ck.config
        if config is None:
            names = matching_zoo_names(infer_architecture(ck.state_dict))
            if not names:
                raise CheckpointError(
                    f"{path} does not say which architecture it is and its shapes match no zoo "
                    "entry; pass a zoo name and overrides, e.g. create_model('dinov2-vits14', "
                    f"weights='{path}', depth=6).\n" + suggest(ViTConfig(), ck.state_dict)
                )
            config = get_config(names[0])
            if len({get_config(n).num_heads for n in names}) > 1:
                raise CheckpointError(
                    f"{path} matches zoo entries with different head counts ({', '.join(names)}); "
                    "pass the zoo name explicitly"
                )
            log.info("%s: architecture of %s", path, names[0])
        if overrides:
            config = config.replace(**overrides)
    elif ck.config is not None:
        # a zoo name with a self-describing checkpoint: shapes are checked strictly below; what
        # shapes cannot show (heads, LayerNorm eps) must agree or come from the file
        if ck.config.num_heads != config.num_heads and "num_heads" not in explicit:
            raise CheckpointError(
                f"{path} was saved with num_heads={ck.config.num_heads} but the model asks for "
                f"{config.num_heads}; drop the zoo name or pass num_heads={ck.config.num_heads}"
            )
        if "norm_eps" not in explicit:
            config = config.replace(norm_eps=ck.config.norm_eps)
    if ck.origin_interpolation:
        # interpolate the position embedding the way the weights' origin does, unless asked not to
        keep = {k: v for k, v in ck.origin_interpolation.items() if k not in explicit}
        config = config.replace(**keep)
    return build_loaded(config, ck.state_dict, str(path), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _plain_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_vssl(model: VisionTransformer, path: str | Path) -> Path:
    """vssl's own format: one safetensors file with native names and the config as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": "vssl", "vssl_config": json.dumps(model.config.to_dict())}
    atomic_write(path, lambda tmp: save_file(_plain_state_dict(model), tmp, metadata=meta))
    return path


def export_native(model: VisionTransformer, path: str | Path, block_chunks: int = 0) -> Path:
    """A ``.pth`` state dict with DINOv2 names; ``block_chunks=4`` writes Web-SSL's chunked layout."""
    sd = _plain_state_dict(model)
    if block_chunks > 0:
        size = model.config.depth // block_chunks
        if size * block_chunks != model.config.depth:
            raise ValueError(
                f"depth {model.config.depth} does not split into {block_chunks} chunks"
            )

        def chunk(k):
            m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
            return f"blocks.{int(m.group(1)) // size}.{m.group(1)}.{m.group(2)}" if m else k

        sd = {chunk(k): v for k, v in sd.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return path


def _native_to_hf(model: VisionTransformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = _plain_state_dict(model)
    inv_top = {v: k for k, v in _HF_TOP.items()}
    out = {}
    vit = cfg.family == "mae"
    for k, v in sd.items():
        if vit and k == "mask_token":
            continue  # ViTModel only has one when built with use_mask_token=True; not needed
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", k)
        if not m:
            raise ValueError(f"cannot map {k} to transformers names")
        i, name, leaf = m.groups()
        pre = f"encoder.layer.{i}."
        if name == "attn.qkv":
            for n, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{pre}attention.attention.{n}.{leaf}"] = t.clone().contiguous()
            continue
        table = {
            "norm1": "layernorm_before" if vit else "norm1",
            "norm2": "layernorm_after" if vit else "norm2",
            "attn.proj": "attention.output.dense",
            "ls1": "layer_scale1",
            "ls2": "layer_scale2",
            "mlp.fc1": "intermediate.dense" if vit else "mlp.fc1",
            "mlp.fc2": "output.dense" if vit else "mlp.fc2",
            "mlp.w12": "mlp.weights_in",
            "mlp.w3": "mlp.weights_out",
        }
        leaf = "lambda1" if leaf == "gamma" else leaf
        out[f"{pre}{table[name]}.{leaf}"] = v
    if not vit:
        if cfg.layerscale is None:  # Dinov2Model always has LayerScale: identity = ones
            for i in range(cfg.depth):
                for j in (1, 2):
                    out[f"encoder.layer.{i}.layer_scale{j}.lambda1"] = torch.ones(
                        cfg.embed_dim, dtype=sd["norm.weight"].dtype
                    )
        if "embeddings.mask_token" not in out:
            out["embeddings.mask_token"] = torch.zeros(
                1, cfg.embed_dim, dtype=sd["norm.weight"].dtype
            )
    return out


def hf_config_for(model: VisionTransformer) -> dict:
    cfg = model.config
    if cfg.stem != "patch":
        raise CheckpointError(
            f"a ViT with stem={cfg.stem!r} has no transformers equivalent (Dinov2Model and "
            "ViTModel patchify with one strided conv): keep it in vssl's format (--to vssl) or "
            "as a native .pth"
        )
    base = {
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "image_size": cfg.img_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if not (cfg.qkv_bias == cfg.proj_bias == cfg.ffn_bias):
        raise ValueError("transformers has one bias flag (qkv_bias); this model mixes biases")
    if cfg.family == "mae":
        if cfg.ffn != "mlp" or cfg.layerscale is not None or cfg.num_register_tokens:
            raise ValueError("a ViTModel export needs a GELU MLP, no LayerScale and no registers")
        return base | {
            "model_type": "vit",
            "architectures": ["ViTModel"],
            "intermediate_size": cfg.ffn_hidden_dim,
            "encoder_stride": cfg.patch_size,
        }
    reg = cfg.num_register_tokens > 0
    if float(cfg.mlp_ratio) != int(cfg.mlp_ratio):
        raise ValueError(
            f"transformers' Dinov2 needs an integer mlp_ratio, this model has {cfg.mlp_ratio}"
        )
    return base | {
        "model_type": "dinov2_with_registers" if reg else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if reg else "Dinov2Model"],
        "mlp_ratio": int(cfg.mlp_ratio),
        "use_swiglu_ffn": cfg.ffn == "swiglu",
        "layerscale_value": cfg.layerscale if cfg.layerscale is not None else 1.0,
        # transformers' Dinov2 always has LayerScale: a model without it is written with gammas of
        # ones, and this marker (ignored by transformers) lets vssl read it back without LayerScale
        "vssl_layerscale": cfg.layerscale,
        "drop_path_rate": 0.0,
        "use_mask_token": True,
        **({"num_register_tokens": cfg.num_register_tokens} if reg else {}),
    }


def export_hf(model: VisionTransformer, out_dir: str | Path) -> Path:
    """Write a transformers directory (config.json + model.safetensors + preprocessor config).

    DINOv2-family models become Dinov2Model (Dinov2WithRegistersModel with registers); MAE
    encoders become ViTModel. transformers then interpolates position embeddings its own way
    (identical at the native resolution).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config_for(model)
    sd = _native_to_hf(model)
    atomic_write(
        out / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"})
    )
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    res = model.config.img_size if model.config.family == "mae" else 224
    pre = {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "resample": 3,
        "size": {"shortest_edge": int(res * 256 / 224)},
        "do_center_crop": True,
        "crop_size": {"height": res, "width": res},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out
