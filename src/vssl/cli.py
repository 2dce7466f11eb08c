"""The ``vssl`` command: one subcommand per job, each with its own ``--help``."""

from __future__ import annotations

import argparse
import logging
import sys

from .overrides import parse_key_values


def parse_overrides(items: list[str] | None) -> dict:
    """``["depth=2", "ffn=swiglu", "layerscale=None"]`` -> ``{"depth": 2, ...}`` (``--set``).

    YAML scalar values, as recipe overrides; Python spellings (``None``, ``1e-5``) work too.
    """
    return {
        key: value
        for key, value, _ in parse_key_values(
            items, example="depth=2, img_size=518", python_literals=True
        )
    }


# -- vssl models --------------------------------------------------------------------------------
def _cmd_models(args) -> int:
    from .models.zoo import count_params, get_entry, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 2
    header = f"{'name':<28} {'params':>15} {'patch':>5} {'res':>4} {'width':>5} {'depth':>5} {'heads':>5} {'ffn':<6} {'reg':>3}"
    print(header)
    print("-" * len(header))
    for n in names:
        c = get_entry(n).config
        print(
            f"{n:<28} {count_params(c):>15,} {c.patch_size:>5} {c.img_size:>4} {c.embed_dim:>5} "
            f"{c.depth:>5} {c.num_heads:>5} {c.ffn:<6} {c.num_register_tokens:>3}"
        )
    return 0


def _add_models(sub):
    p = sub.add_parser(
        "models",
        help="list the model zoo",
        description="List zoo models with exact parameter counts (computed on the "
        "meta device: nothing is allocated).",
    )
    p.add_argument("pattern", nargs="?", help="substring or glob, e.g. 'webssl-dino*' or 'mae'")
    p.set_defaults(func=_cmd_models)


# -- vssl convert -------------------------------------------------------------------------------
def _cmd_convert(args) -> int:
    from .models import checkpoints as ck
    from .models.zoo import create_model

    overrides = parse_overrides(args.set)
    note = ck.describe_source(args.input)
    if note:
        print(f"vssl convert: {note}", file=sys.stderr, flush=True)
    if args.model:
        model = create_model(
            args.model,
            weights=args.input,
            dtype=args.dtype,
            checkpoint_key=args.checkpoint_key,
            **overrides,
        )
    else:
        model = create_model(
            args.input, dtype=args.dtype, checkpoint_key=args.checkpoint_key, **overrides
        )
    if args.to == "hf":
        out = ck.export_hf(model, args.output)
    elif args.to == "native":
        out = ck.export_native(model, args.output, block_chunks=args.block_chunks)
    else:
        out = ck.save_vssl(model, args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({args.to}, {n:,} parameters, {next(model.parameters()).dtype})")
    return 0


def _add_convert(sub):
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between native .pth, transformers and vssl formats",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a checkpoint strictly (format detected) and write it in another format.",
        epilog="examples:\n"
        "  vssl convert webssl_dino1b_full2b_224.pth out_hf/ --model webssl-dino1b-full2b-224 --to hf\n"
        "  vssl convert hf_dir/ dinov2_vitb14.pth --to native\n"
        "  vssl convert teacher_checkpoint.pth model.safetensors --model dinov2-vits14 --to vssl\n"
        "  vssl convert runs/my_run/ my_run_hf/ --to hf        # a run folder's trained encoder\n"
        "\n"
        "transformers' Dinov2 always has LayerScale: a model without it is written with gammas of\n"
        "ones, and read back (by vssl) as a model without LayerScale.",
    )
    p.add_argument(
        "input",
        help="checkpoint: .pth/.bin, .safetensors, a transformers directory, or a `vssl "
        "pretrain` run folder (its backbone.safetensors)",
    )
    p.add_argument("output", help="output file (.pth / .safetensors) or directory (--to hf)")
    p.add_argument(
        "--to",
        choices=("hf", "native", "vssl"),
        required=True,
        help="hf: transformers directory (Dinov2Model / ViTModel); native: DINOv2 .pth; "
        "vssl: .safetensors with the config inside",
    )
    p.add_argument(
        "--model",
        help="zoo name describing the input's architecture (needed for a "
        ".pth whose shapes fit several zoo entries)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="architecture override, e.g. --set img_size=518 (repeatable)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="store weights in this dtype (default: fp32)",
    )
    p.add_argument(
        "--block-chunks",
        type=int,
        default=0,
        help="native only: write Web-SSL's chunked layout blocks.<chunk>.<i> (Web-SSL uses 4)",
    )
    p.add_argument(
        "--checkpoint-key",
        help="entry of a training checkpoint that holds the weights "
        "(default: teacher, then model, state_dict)",
    )
    p.set_defaults(func=_cmd_convert)


# -- vssl info ----------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    from .models import checkpoints as ck

    note = ck.describe_source(args.checkpoint)
    if note:
        print(f"found:       {note}")
    c = ck.read_checkpoint(args.checkpoint, checkpoint_key=args.checkpoint_key, check_weights=False)
    n = sum(t.numel() for t in c.state_dict.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in c.state_dict.values()})
    print(
        f"path:        {c.source}\nformat:      {c.format}\ntensors:     {len(c.state_dict)} "
        f"({n:,} parameters, {', '.join(dtypes)})"
    )
    arch = ck.infer_architecture(c.state_dict)
    print("shapes say:  " + ", ".join(f"{k}={v}" for k, v in arch.items()))
    if c.config is not None:
        print(
            f"config:      {c.config.embed_dim}-d, depth {c.config.depth}, heads {c.config.num_heads}, "
            f"family {c.config.family}"
        )
    names = ck.matching_zoo_names(arch)
    print("zoo match:   " + (", ".join(names) if names else "none"))
    if c.heads:
        groups = sorted({k.split(".")[0] for k in c.heads})
        print(f"also holds:  {len(c.heads)} head tensors ({', '.join(groups)})")
    bad = ck.nonfinite_tensors(c.state_dict | c.heads)
    if bad:
        names = sorted(bad, key=ck._natural)
        shown = ", ".join(f"{k} ({bad[k][0]:,} of {bad[k][1]:,})" for k in names[:8])
        more = f" ... and {len(names) - 8} more" if len(names) > 8 else ""
        print(f"DAMAGED:     {len(names)} tensor(s) hold NaN/Inf values: {shown}{more}")
        print(
            f"vssl info: error: {c.source} holds non-finite weights: it cannot be loaded "
            "(re-download or re-export it)",
            file=sys.stderr,
        )
        return 1
    print("values:      all finite")
    return 0


def _add_info(sub):
    p = sub.add_parser(
        "info",
        help="describe a checkpoint without building a model",
        description="Detect a checkpoint's format, infer its architecture from the "
        "shapes, and list the zoo entries it fits.",
    )
    p.add_argument(
        "checkpoint",
        help="a .pth/.bin/.safetensors file, a transformers directory, or a `vssl pretrain` "
        "run folder",
    )
    p.add_argument("--checkpoint-key")
    p.set_defaults(func=_cmd_info)


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vssl",
        description="Language-free visual representation learning: Web-SSL, DINOv2 "
        "and MAE models, checkpoints, features, data, evaluation and "
        "pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"vssl {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what is loaded and skipped"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(sub)
    from .embed import add_embed_parser

    add_embed_parser(sub)
    _add_convert(sub)
    _add_info(sub)
    from .data.pack import add_data_parser

    add_data_parser(sub)
    from .evaluate.cli import add_eval_parser

    add_eval_parser(sub)
    from .curate.cli import add_curate_parser

    add_curate_parser(sub)
    from .pretrain import add_pretrain_parser
    from .quickstart import add_quickstart_parser

    add_pretrain_parser(sub)
    add_quickstart_parser(sub)
    from .finetune import add_finetune_parser

    add_finetune_parser(sub)
    from .classify import add_classify_parser
    from .compare import add_compare_parser

    add_classify_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``vssl`` entry point. A closed pipe (``vssl models | head``) ends it quietly."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the exit flush cannot fail again
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None = None) -> int:
    from .models.checkpoints import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="vssl: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"vssl {args.command}: error: {e}", file=sys.stderr)
        return 2
