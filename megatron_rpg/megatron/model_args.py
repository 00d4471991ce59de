"""Command-line flags of the model layer (Megatron-LM's names) and their mapping to `build_gpt_model`.

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parse_model_args(parser)              # usage errors exit like any argparse error
    check_model_machine(args)                    # start-up: RuntimeError if TE/FP8 cannot run here
    model = build_gpt_model(hf_config, **build_gpt_model_kwargs(args))

Flags:
    --transformer-impl {local,transformer_engine}   local PyTorch layers (CPU, tests) or TE layers
    --fp8-format {e4m3,hybrid}                      FP8 GEMMs (needs transformer_engine, a GPU)
    --fp8-recipe {delayed,tensorwise,blockwise,mxfp8}  scaling recipe (default delayed; needs --fp8-format)
    --bf16 | --fp16                                 parameter dtype (default float32)
The choices are models.py's FP8_FORMATS / FP8_RECIPES, so flags and builder accept the same values.
"""
from __future__ import annotations

import argparse

import torch

from megatron_rpg.megatron.models import FP8_FORMATS, FP8_RECIPES, check_transformer_engine_ready

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model-layer flag group to `parser` (returned for chaining)."""
    group = parser.add_argument_group("model layer (megatron-core)")
    group.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local",
                       help="layer implementation: local PyTorch layers, or Transformer Engine (GPU)")
    group.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                       help="FP8 GEMMs in this format; needs --transformer-impl transformer_engine")
    group.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                       help="FP8 scaling recipe (default: delayed); needs --fp8-format")
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 parameters")
    precision.add_argument("--fp16", action="store_true", help="float16 parameters")
    return parser


def validate_model_args(args: argparse.Namespace) -> None:
    """ValueError naming the flags when a combination cannot work on any machine."""
    if args.fp8_recipe is not None and args.fp8_format is None:
        raise ValueError(f"--fp8-recipe {args.fp8_recipe} was given without --fp8-format; add "
                         f"--fp8-format (one of {', '.join(FP8_FORMATS)}) or drop --fp8-recipe")
    if args.fp8_format is not None and args.transformer_impl != "transformer_engine":
        raise ValueError(f"--fp8-format {args.fp8_format} needs --transformer-impl transformer_engine "
                         f"(got {args.transformer_impl}): FP8 runs only through Transformer Engine layers")


def parse_model_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parser.parse_args(argv)` plus `validate_model_args`, whose errors exit as usage errors."""
    args = parser.parse_args(argv)
    try:
        validate_model_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_model_machine(args: argparse.Namespace) -> None:
    """At start-up, before any model is built: RuntimeError (models.check_transformer_engine_ready)
    when the requested Transformer Engine / FP8 recipe cannot run on this machine."""
    kwargs = build_gpt_model_kwargs(args)
    check_transformer_engine_ready(use_te=kwargs["use_te"], fp8=kwargs["fp8"],
                                   fp8_recipe=kwargs["fp8_recipe"])


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.bf16 and args.fp16:  # argparse's exclusive group prevents it; a hand-made Namespace may not
        raise ValueError("--bf16 and --fp16 are both set; choose one")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def build_gpt_model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of `models.build_gpt_model` from the parsed flags (validated again, so a
    Namespace built by hand gets the same errors)."""
    validate_model_args(args)
    return dict(use_te=args.transformer_impl == "transformer_engine", fp8=args.fp8_format,
                fp8_recipe=args.fp8_recipe, params_dtype=params_dtype(args))


__all__ = ["TRANSFORMER_IMPLS", "add_model_args", "build_gpt_model_kwargs", "check_model_machine",
           "parse_model_args", "validate_model_args"]
