"""Pretraining recipes: a YAML file with ``model``, ``data``, ``method``, ``train`` and ``eval``
sections, ``key=value`` overrides, and strict validation.

A recipe is loaded into dataclasses, so every key is known: a misspelt key is an error naming it,
the close match and the allowed keys of its section; a bad value names the key, the value and the
expected type or choices. Sections:

- ``model``: ``name`` (zoo name or checkpoint path), ``weights`` (continue from released weights:
  the method loads them, with its heads or decoder when the file has them), ``checkpoint_key``,
  and any :class:`~vssl.models.vit.ViTConfig` field as an architecture override
  (``drop_path_rate: 0.4``).
- ``data``: ``train`` (image folder, ``.txt`` list, parquet manifest, or shards such as
  ``shards/{000000..000099}.tar``) and the crop settings (:class:`DataConfig`).
- ``method``: ``name`` (a registered method: ``vssl.methods.list_methods()``) plus the fields of
  that method's ``config_class``. Keys of the method's config found under ``train`` (recipes
  written before schedules moved into the methods) are moved to ``method`` with a note.
- ``train``: :class:`~vssl.train.loop.TrainConfig` fields (epochs, lr, schedules, budgets, ...).
- ``eval``: the optional kNN monitor (:class:`EvalConfig`); on when ``train`` and ``test`` are set.

Overrides use dotted keys and YAML scalars: ``train.epochs=10``, ``data.train=shards/{0..9}.tar``,
``data.global_scale=[0.4,1.0]``, ``model.weights=null``. Numbers such as ``2e-4`` are read as
numbers where the field is a number (PyYAML alone would read them as strings).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "Recipe",
    "SECTIONS",
    "find_recipe",
    "load_recipe",
    "parse_overrides",
    "recipe_dirs",
    "recipe_to_yaml",
    "save_recipe",
    "shipped_recipes",
]

SECTIONS = ("model", "data", "method", "train", "eval")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


@dataclass
class ModelConfig:
    """The backbone. Any ViTConfig field given in this section overrides the architecture."""

    name: str = "vit-tiny-p4-32"  # zoo name (`vssl models`) or a self-describing checkpoint path
    weights: str | None = None  # continue from these weights (backbone, and heads when present)
    checkpoint_key: str | None = None  # entry of a training checkpoint holding the weights
    arch: dict = field(default_factory=dict)  # ViTConfig overrides, written flat in the YAML


@dataclass
class DataConfig:
    """Training images and the crops the method's views are made of (multi-crop: 2 global +
    ``n_local`` local crops with DINOv2's photometric recipe; a single view: the global crop)."""

    train: str | list[str] | None = None  # folder / .txt list / parquet / shards pattern
    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    photometric: bool = True  # False: normalize only (no colour jitter, blur, solarize)
    # multi-crop colour recipe (DINOv2's): ColorJitter(brightness, contrast, saturation, hue)
    # strengths with probability color_jitter_p, and RandomGrayscale(grayscale_p), in every crop
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # gaussian blur and solarization probabilities: null keeps DINOv2's per crop group (blur 1.0 /
    # 0.1 / 0.5 for global crop 1 / global crop 2 / local crops, solarize 0 / 0.2 / 0); a number
    # sets every group (SimCLR's CIFAR-10 recipe and lightly's CIFAR benchmarks use no blur: a
    # sigma of up to 2 px wipes out a 32-px image's shapes)
    blur_p: float | None = None
    solarize_p: float | None = None
    num_workers: int = 8
    batches_per_epoch: int | None = None  # shards without sizes.json need it (or epoch_len)
    epoch_len: int | None = None  # images per epoch of a shard stream
    shuffle_buffer: int = 1000
    resampled: bool = False  # shards drawn with replacement (web-scale streaming)
    captions: str | None = None  # image-text methods: null (the data's own) or templates

    def __post_init__(self):
        b, c, sat, hue = self.color_jitter
        if min(b, c, sat, hue) < 0 or hue > 0.5:
            raise ValueError(
                "data.color_jitter is [brightness, contrast, saturation, hue] strengths as in "
                f"torchvision's ColorJitter: each >= 0 and hue <= 0.5, got {list(self.color_jitter)}"
            )
        for name in ("color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"data.{name} is a probability in [0, 1], got {getattr(self, name)}"
                )


@dataclass
class EvalConfig:
    """kNN monitor during training (weighted kNN on the CLS features of ``method.encoder()``)."""

    train: str | None = None  # labelled images (class subfolders or 'path<TAB>label' lists)
    test: str | None = None
    every_n_steps: int = 1000
    k: int = 20
    temperature: float = 0.07
    max_per_split: int | None = 5000  # class-balanced subset of each split (time, memory)
    resolution: int | None = None  # None: the model's img_size
    batch_size: int = 256

    @property
    def enabled(self) -> bool:
        return self.train is not None and self.test is not None

    def __post_init__(self):
        if (self.train is None) != (self.test is None):
            raise ValueError(
                "set both eval.train and eval.test (labelled images) for the kNN "
                "monitor, or neither"
            )
        if self.every_n_steps < 1 or self.k < 1 or self.batch_size < 1:
            raise ValueError("eval.every_n_steps, eval.k and eval.batch_size must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")


@dataclass
class Recipe:
    """A resolved recipe: what ``vssl pretrain`` builds from."""

    model: ModelConfig
    data: DataConfig
    method: Any  # the method's config dataclass (its config_class)
    train: Any  # TrainConfig
    eval: EvalConfig
    method_name: str = "dinov2"
    source: str | None = None  # the YAML file it came from

    def to_dict(self) -> dict:
        """Plain data in the YAML layout (model overrides flat, the method's ``name`` first)."""
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if k != "arch"}
        model.update(self.model.arch)
        return {
            "model": _plain(model),
            "data": _plain(dataclasses.asdict(self.data)),
            "method": {"name": self.method_name, **_plain(dataclasses.asdict(self.method))},
            "train": _plain(dataclasses.asdict(self.train)),
            "eval": _plain(dataclasses.asdict(self.eval)),
        }


def _plain(d: Any) -> Any:
    """Tuples -> lists (YAML-friendly, round-trips through the loader's type coercion)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


# ------------------------------------------------------------------------------ sections / types
def _method_config(name: str) -> type:
    """The config dataclass of the registered method ``name`` (imported lazily: torch-heavy)."""
    from ..methods.base import UnknownMethodError, get_method

    try:
        return get_method(name).config_class
    except UnknownMethodError as e:
        raise ConfigError(f"method.name: {e}") from None


def _choices(method_cfg: type) -> dict[str, tuple]:
    """Allowed values of string fields whose type does not say them (checked before building):
    the trainer's, and those a method config declares in its ``choices`` class attribute."""
    from . import loop

    out = {f"method.{k}": tuple(v) for k, v in getattr(method_cfg, "choices", {}).items()}
    for name, attr in (
        ("train.precision", "PRECISIONS"),
        ("train.strategy", "STRATEGIES"),
        ("train.lr_scaling", "LR_SCALINGS"),
    ):
        if hasattr(loop, attr):
            out[name] = tuple(getattr(loop, attr))
    return out


def _aliases(method_cfg: type) -> dict[str, dict]:
    """Other spellings users bring from upstream configs (a method config's ``aliases``)."""
    return {f"method.{k}": v for k, v in getattr(method_cfg, "aliases", {}).items()}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    """A type as a user reads it: 'an integer', 'a number or null', 'a list of 2 numbers'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} " + (
            f"{_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
            if len(set(args)) == 1
            else ", ".join(_describe(a) for a in args)
        )
    if origin is list:
        return (
            f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
            if args
            else "a list"
        )
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
    }.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _same_kind(value: Any, tp: Any) -> bool:
    base = typing.get_origin(tp) or tp
    return (
        isinstance(base, type)
        and isinstance(value, base)
        and not (isinstance(value, bool) and base is not bool)
    )


def _coerce(value: Any, tp: Any, raw: str | None = None) -> Any:
    """``value`` as type ``tp`` or :class:`_Mismatch`. ``raw``: the override's text, used as is
    where a string is expected (``output_dir=2024`` stays "2024")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        # exact-type members first, so that 3 stays an int in `int | float`
        for a in sorted(args, key=lambda a: not _same_kind(value, a)):
            if a is type(None):
                continue
            try:
                return _coerce(value, a, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise _Mismatch from None
            if f.is_integer():
                return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "2e-4": PyYAML reads exponents without a dot as strings
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and not isinstance(value, (list, dict)):
            return raw
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) if args else v for v in value]
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    return value  # an annotation we do not check (the dataclass validates it)


def _unknown_key(section: str, key: str, allowed: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown key '{section}.{key}'.{hint} Allowed keys in '{section}': {', '.join(allowed)}"
    )


def _check_value(
    section: str,
    key: str,
    value: Any,
    tp: Any,
    raw: str | None,
    choices: dict[str, tuple],
    aliases: dict | None = None,
) -> Any:
    try:
        out = _coerce(value, tp, raw)
    except _Mismatch:
        shown = raw if raw is not None else value
        raise ConfigError(f"{section}.{key}={shown!r}: expected {_describe(tp)}") from None
    allowed = choices.get(f"{section}.{key}")
    out = (aliases or {}).get(f"{section}.{key}", {}).get(out, out) if isinstance(out, str) else out
    if allowed is not None and out is not None and out not in allowed:
        raise ConfigError(
            f"{section}.{key}={out!r} is not allowed; choices: {', '.join(map(str, allowed))}"
        )
    return out


def _build(
    section: str,
    cls: type,
    values: dict,
    raws: dict,
    choices: dict,
    extra: dict[str, Any] | None = None,
    aliases: dict | None = None,
) -> Any:
    """``cls(**values)`` after checking keys and types; the dataclass's own checks are
    reported with the section's name."""
    hints = _hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(section, key, names + sorted(extra or ()))
        kwargs[key] = _check_value(section, key, value, hints[key], raws.get(key), choices, aliases)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(section) else f"{section}: {msg}") from None


def _build_model(values: dict, raws: dict) -> ModelConfig:
    from ..models.vit import ViTConfig

    own = [f.name for f in fields(ModelConfig) if f.name != "arch"]
    arch_hints = _hints(ViTConfig)
    out = ModelConfig()
    arch = {}
    for key, value in values.items():
        if key in own:
            hint = _hints(ModelConfig)[key]
            setattr(out, key, _check_value("model", key, value, hint, raws.get(key), {}))
        elif key in arch_hints:
            arch[key] = _check_value(
                "model",
                key,
                value,
                arch_hints[key],
                raws.get(key),
                {"model.ffn": ("mlp", "swiglu"), "model.family": ("dinov2", "mae")},
            )
        else:
            raise _unknown_key("model", key, own + sorted(arch_hints))
    if not out.name:
        raise ConfigError("model.name is empty: give a zoo name (`vssl models`) or a checkpoint")
    out.arch = arch
    return out


# ----------------------------------------------------------------------------------- overrides
def parse_overrides(items: Sequence[str] | None) -> list[tuple[str, str, Any, str]]:
    """``["train.epochs=10", ...]`` -> ``[(section, key, value, raw_text)]``; values are YAML
    scalars (``10``, ``2e-4``, ``true``, ``null``, ``[0.4, 1.0]``), anything else a string
    (``vssl.overrides.parse_key_values``, shared with ``vssl convert --set``)."""
    from ..overrides import parse_key_values

    out = []
    for key, value, raw in parse_key_values(
        items, example="train.epochs=10, data.train=/path/to/images", error=ConfigError
    ):
        section, dot, name = key.partition(".")
        if section not in SECTIONS or not dot or not name:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f" (did you mean '{close[0]}.{name}'?)" if close and dot else ""
            raise ConfigError(
                f"override key {key!r} must be SECTION.KEY with SECTION one of "
                f"{', '.join(SECTIONS)}{hint}"
            )
        if "." in name:
            raise ConfigError(
                f"override key {key!r}: recipe sections are flat, use "
                f"{section}.{name.split('.')[-1]}=..."
            )
        out.append((section, name, value, raw))
    return out


# -------------------------------------------------------------------------------------- loading
def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ``$VSSL_CONFIGS``, ``vssl/configs`` inside the package
    (wheels), the repository's ``configs/`` (source checkouts)."""
    here = Path(__file__).resolve()
    dirs = []
    if os.environ.get("VSSL_CONFIGS"):
        dirs.append(Path(os.environ["VSSL_CONFIGS"]).expanduser())
    dirs += [here.parents[1] / "configs", here.parents[3] / "configs"]
    return dirs


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes found in :func:`recipe_dirs` (first directory wins)."""
    out: dict[str, Path] = {}
    for d in recipe_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return out


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``cpu_tiny32``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    stem = p.name.removesuffix(".yaml").removesuffix(".yml")
    if stem in shipped and (p.parent == Path(".") or not p.parent.exists()):
        return shipped[stem]
    close = difflib.get_close_matches(stem, shipped, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(
        f"recipe {str(name_or_path)!r} not found.{hint} Give a YAML file or one of the shipped "
        f"recipes: {', '.join(shipped) or '(none found in ' + ', '.join(map(str, recipe_dirs())) + ')'}"
    )


def load_recipe(
    source: str | os.PathLike | dict | None = None, overrides: Sequence[str] | None = None
) -> Recipe:
    """Read a recipe (a YAML path, a shipped recipe name, or a dict; None: all defaults), apply
    ``key=value`` overrides, validate everything and return the :class:`Recipe`."""
    import yaml

    origin = None
    if source is None:
        raw_cfg: dict = {}
    elif isinstance(source, dict):
        raw_cfg = source
    else:
        path = find_recipe(source)
        origin = str(path)
        try:
            raw_cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw_cfg, dict):
        raise ConfigError(
            f"{origin or 'the recipe'} must be a mapping of sections "
            f"({', '.join(SECTIONS)}), got {type(raw_cfg).__name__}"
        )
    where = f" in {origin}" if origin else ""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    raws: dict[str, dict] = {s: {} for s in SECTIONS}
    for section, body in raw_cfg.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown section '{section}'{where}.{hint} Allowed sections: {', '.join(SECTIONS)}"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"section '{section}'{where} must be a mapping of keys, got {type(body).__name__}"
            )
        values[section].update(body)
    for section, key, value, raw in parse_overrides(overrides):
        values[section][key] = value
        raws[section][key] = raw

    method_values = dict(values["method"])
    method_name = method_values.pop("name", "dinov2")
    method_cfg = _method_config(method_name)
    _move_method_keys(
        values["train"], raws["train"], method_values, raws["method"], method_cfg, origin
    )
    choices = _choices(method_cfg)
    from .loop import TrainConfig

    try:
        method = _build(
            "method",
            method_cfg,
            method_values,
            raws["method"],
            choices,
            extra={"name": None},
            aliases=_aliases(method_cfg),
        )
    except ConfigError as e:
        if str(e).startswith("unknown key 'method."):
            raise ConfigError(
                f"{e} (the keys of method {method_name!r}; a recipe written for "
                "another method needs its own method: section)"
            ) from None
        raise
    return Recipe(
        model=_build_model(values["model"], raws["model"]),
        data=_build("data", DataConfig, values["data"], raws["data"], choices),
        method=method,
        train=_build("train", TrainConfig, values["train"], raws["train"], choices),
        eval=_build("eval", EvalConfig, values["eval"], raws["eval"], choices),
        method_name=method_name,
        source=origin,
    )


def _move_method_keys(
    train: dict,
    train_raws: dict,
    method: dict,
    method_raws: dict,
    method_cfg: type,
    origin: str | None,
) -> None:
    """Keys of the method's config given under ``train`` (where recipes and run folders kept the
    method's own schedules before the method contract) move to ``method``, with a note."""
    from .loop import TrainConfig

    trainer_keys = {f.name for f in fields(TrainConfig)}
    method_keys = {f.name for f in fields(method_cfg) if f.init}
    moved = [k for k in list(train) if k not in trainer_keys and k in method_keys]
    for k in moved:
        value = train.pop(k)
        method.setdefault(k, value)
        if k in train_raws:
            method_raws.setdefault(k, train_raws.pop(k))
    if moved:
        import sys

        print(
            f"note: {', '.join('train.' + k for k in moved)} belong to the method now; read "
            f"as method.{', method.'.join(moved)}{' (' + origin + ')' if origin else ''}",
            file=sys.stderr,
            flush=True,
        )


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML: sections in block style, short lists inline."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    _Dumper.add_representer(
        list,
        lambda d, v: d.represent_sequence(
            "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, (list, dict)) for x in v)
        ),
    )
    head = f"# resolved by vssl from {recipe.source}\n" if recipe.source else "# resolved by vssl\n"
    return head + yaml.dump(
        recipe.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False
    )


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write the resolved recipe (atomically): ``vssl pretrain path`` reproduces the run."""
    from .._io import atomic_write

    text = recipe_to_yaml(recipe)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
