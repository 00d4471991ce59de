#!/usr/bin/env python
"""Check that a converted megatron checkpoint computes the HF model's logits (CPU, float32).

    python tools/verify_conversion.py --hf-dir Qwen2.5-0.5B --megatron-dir ckpt/q05 --tensor-model-parallel-size 2

Exit status: 0 when max |delta logit| <= --tolerance and the argmax/greedy tokens agree; 1 when they
do not (a mismatch); 2 on bad input (checked before any worker starts: --hf-dir a model folder with
config and weights, --megatron-dir a converted checkpoint of the same architecture, TP/PP valid);
3 when a worker fails while verifying (its error is printed).
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="the Hugging Face model folder")
    parser.add_argument("--megatron-dir", required=True,
                        help="the converted torch_dist checkpoint, or a trainer's --save folder (its latest iter_) "
                             "or one of its iter_ folders; its checksums are verified first")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP to load at (any TP works)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP to load at")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max |delta logit| allowed (float32)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="greedy continuation length compared")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_rpg.checkpoint.verify import verify_conversion

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1", file=sys.stderr)
            return 2
    if not 0 <= args.tolerance < float("inf"):  # NaN fails this too: every comparison would pass or fail
        print(f"error: --tolerance={args.tolerance} must be a finite number >= 0 (default 1e-5)", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0:
        print(f"error: --max-new-tokens={args.max_new_tokens} must be >= 0 (0: compare the prompts' logits only)",
              file=sys.stderr)
        return 2
    try:
        report = verify_conversion(args.hf_dir, args.megatron_dir,
                                   tensor_model_parallel_size=args.tensor_model_parallel_size,
                                   pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                   max_new_tokens=args.max_new_tokens, tolerance=args.tolerance)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a worker failed: not a verdict on the checkpoint
        print(f"error: the verification could not run: {error}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(report))
    else:
        print(f"TP={report['tensor_model_parallel_size']} PP={report['pipeline_model_parallel_size']}, "
              f"{report['prompts']} prompts: max |delta logit| = {report['max_abs_logit_diff']:.3e} "
              f"(tolerance {report['tolerance']:.1e}); argmax tokens agree: {report['argmax_agree']}; "
              f"greedy {report['max_new_tokens']}-token continuations agree: {report['greedy_tokens_agree']}")
        print("OK" if report["ok"] else "MISMATCH")
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # workers are spawned and re-import this module: keep the guard
    sys.exit(main())
