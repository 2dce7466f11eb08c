"""``KEY=VALUE`` overrides from the command line, parsed the same way for every command.

Two callers: ``vssl convert --set KEY=VALUE`` (architecture overrides, ``vssl.cli.parse_overrides``)
and recipe overrides ``SECTION.KEY=VALUE`` (``vssl pretrain``, ``vssl.train.config.parse_overrides``,
which then checks the section and key). Values are YAML scalars: ``10``, ``2.5``, ``true``,
``null``, ``[0.4, 1.0]``; text that is not YAML (``shards/{000..009}.tar``) stays text.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_key_values", "parse_value"]


def parse_value(raw: str, *, python_literals: bool = False) -> Any:
    """The YAML scalar ``raw`` spells (None when blank); text YAML cannot read is kept as text.

    ``python_literals``: when YAML reads plain text, also try it as a Python literal, so ``None``,
    ``1e-5`` (a string in YAML 1.1) and ``(1, 2)`` keep working where they always did (``vssl
    convert --set``).
    """
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # e.g. {000..009}.tar: not YAML, a plain string
    if python_literals and isinstance(value, str):
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            pass  # a bare word such as ffn=swiglu
    return value


def parse_key_values(
    items: Sequence[str] | None,
    *,
    example: str,
    python_literals: bool = False,
    error: type[Exception] = ValueError,
) -> list[tuple[str, Any, str]]:
    """``["depth=2", "ffn=swiglu"]`` -> ``[(key, value, raw_text)]`` in the given order.

    Keys are stripped; values are :func:`parse_value` of the text after the first ``=`` (the raw
    text is returned too, for fields that want it verbatim). An item without ``=`` raises
    ``error`` naming it, with ``example`` (e.g. ``"depth=2, img_size=518"``) as the hint.
    """
    out = []
    for item in items or []:
        if "=" not in item:
            raise error(f"override {item!r} is not KEY=VALUE (e.g. {example})")
        key, raw = item.split("=", 1)
        out.append((key.strip(), parse_value(raw, python_literals=python_literals), raw))
    return out
