#!/usr/bin/env python
"""Convert a megatron-core checkpoint written by convert_hf_to_megatron.py back to a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --input ckpt/qwen7b --output Qwen2.5-7B-roundtrip
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Reads the torch_dist checkpoint without building a model (one layer in memory at a time), maps names
back with the same table the forward conversion used, strips the vocabulary padding, and writes
safetensors shards + model.safetensors.index.json + the config/tokenizer files kept under hf/ and a
generation_config.json (derived from the config when none was kept). The checkpoint's checksums and
its tokenizer's size are checked first; folders are 0755 and files 0644.
The result loads with AutoModelForCausalLM.from_pretrained. Output is written to a temporary folder
and renamed into place when complete."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="megatron checkpoint folder (with megatron_rpg_conversion.json), or a trainer's "
                             "--save folder (its latest iter_) or one of its iter_ folders")
    parser.add_argument("--output", required=True, help="folder for the HF model (new or empty)")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_rpg.checkpoint.convert import megatron_to_hf_checkpoint
    from megatron_rpg.checkpoint.layout import latest_checkpoint
    from megatron_rpg.megatron.cpu_mode import enable_cpu_mode

    if not torch.cuda.is_available():
        enable_cpu_mode()
    if not 0 < args.max_shard_size_gb < float("inf"):  # NaN fails this too
        print(f"error: --max-shard-size-gb={args.max_shard_size_gb} must be a positive number of GiB (default 5)",
              file=sys.stderr)
        return 2
    try:
        index = megatron_to_hf_checkpoint(args.input, args.output, overwrite=args.overwrite,
                                          max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                                          progress=not args.no_progress)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shards = len(set(index["weight_map"].values()))
    print(f"wrote {args.output} from {latest_checkpoint(args.input)}: {len(index['weight_map'])} tensors in {shards} safetensors shard(s), "
          f"{index['metadata']['total_size'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
