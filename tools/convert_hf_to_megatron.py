#!/usr/bin/env python
"""Convert a Hugging Face model folder (Qwen2/Qwen2.5, Llama 3, Qwen3) to a megatron-core checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --output ckpt/qwen7b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Writes a megatron-core distributed checkpoint (torch_dist format) of a GPTModel (local/TE spec names).
The checkpoint is RESHARDABLE: tensors are stored whole with their global shapes and offsets (layers on
a global layer axis), so megatron loads it at ANY tensor/pipeline-parallel size. The TP/PP given here
are validated (TP must divide attention and key-value heads, PP must divide layers), fix the vocabulary
padding (to a multiple of 128 x TP; a different TP on load zero-fills extra rows) and are recorded in
megatron_rpg_conversion.json with the HF config; tokenizer files are kept under hf/ for the way back.
Converts tensor by tensor from safetensors (or weights-only torch files). Everything is checked before
anything is written; output goes to a temporary folder that is renamed into place when complete."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="folder for the megatron checkpoint (new or empty)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP the checkpoint is validated/padded for (it still loads at any TP)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="PP the checkpoint is validated for (it still loads at any PP)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_rpg.checkpoint.convert import hf_to_megatron_checkpoint
    from megatron_rpg.megatron.cpu_mode import enable_cpu_mode

    if not torch.cuda.is_available():
        enable_cpu_mode()  # megatron's writer calls torch.cuda.* even for CPU tensors
    try:
        metadata = hf_to_megatron_checkpoint(
            args.hf_dir, args.output, tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size, overwrite=args.overwrite,
            progress=not args.no_progress)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {metadata['model_type']}, {metadata['num_layers']} layers, vocab "
          f"{metadata['vocab_size']} padded to {metadata['padded_vocab_size']}, validated for "
          f"TP={metadata['tensor_model_parallel_size']} PP={metadata['pipeline_model_parallel_size']} "
          f"(reshardable on load)")
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer spawns helper processes: keep this guard
    sys.exit(main())
