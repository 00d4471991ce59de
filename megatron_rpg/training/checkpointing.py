"""The trainer's model in and out: build it (a preset, an HF config, or a converted checkpoint loaded
at this run's TP/PP), and save it as a torch_dist checkpoint that tools/convert_megatron_to_hf.py
exports and --load reads back.

Saving writes into a temporary folder next to --save and renames it into place, so an existing
checkpoint is replaced only by a complete one (checkpoint/convert.py's staged_output_dir).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.module import Float16Module

from megatron_rpg.checkpoint.convert import check_output_dir, describe_checkpoint, hf_config_of, staged_output_dir
from megatron_rpg.megatron.model_args import build_gpt_model_kwargs
from megatron_rpg.megatron.models import build_gpt_model, check_supported_hf_config, padded_vocab_size
from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer

TINY_PRESET = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=16, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                   tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02)


def model_hf_config(args):
    """The HF config the model is built from (a transformers config object), checked as supported."""
    from transformers import AutoConfig, Qwen2Config

    if args.load is not None:
        if not os.path.isdir(args.load):
            raise ValueError(f"--load {args.load}: no such checkpoint folder")
        config = hf_config_of(args.load)
    elif args.hf_config is not None:
        path = args.hf_config
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--hf-config {args.hf_config}: no config.json there")
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        if "model_type" not in values:
            raise ValueError(f"--hf-config {args.hf_config}: config.json has no model_type")
        config = AutoConfig.for_model(**values)
    else:
        config = Qwen2Config(**{k: v for k, v in TINY_PRESET.items() if k != "model_type"})
    check_supported_hf_config(config)
    return config


def build_model_and_optimizer(args):
    """(DDP model chunks, megatron optimizer, HF config) for this rank; weights from --load if given."""
    hf_config = model_hf_config(args)
    kwargs = build_gpt_model_kwargs(args)
    if args.save:
        check_output_dir(args.save, overwrite=True)  # names a --save that is a file, before training
    gpt = build_gpt_model(hf_config, **kwargs)
    if args.load is not None:
        gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), args.load))
    module = gpt if kwargs["params_dtype"] == torch.float32 else Float16Module(gpt.config, gpt)
    model, optimizer = setup_model_and_optimizer(
        [module], lr=args.lr, weight_decay=args.weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2),
        adam_eps=args.adam_eps, clip_grad=args.clip_grad, use_distributed_optimizer=args.use_distributed_optimizer)
    return model, optimizer, hf_config


def _bare_model(model):
    module = model[0]
    while hasattr(module, "module"):  # DDP / Float16Module
        module = module.module
    return module


def save_model(model, hf_config, args) -> None:
    """The model's weights as a reshardable torch_dist checkpoint at --save, with the metadata the
    HF exporter and --load need. Collective: every rank calls it; rank 0 owns the staging folder."""
    if dist.get_rank() == 0:
        with staged_output_dir(args.save, overwrite=True) as staging:
            _save_into(staging, model, hf_config, args)
    else:
        _save_into(None, model, hf_config, args)
    dist.barrier()  # the rename is done before anyone reads --save


def _save_into(staging, model, hf_config, args) -> None:
    holder = [staging]
    dist.broadcast_object_list(holder, src=0)
    gpt = _bare_model(model)
    dist_checkpointing.save(gpt.sharded_state_dict(), holder[0])
    if dist.get_rank() == 0:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        describe_checkpoint(holder[0], hf_config, padded_vocab_size=padded_vocab_size(int(hf_config.vocab_size), tp),
                            tensor_model_parallel_size=args.tensor_model_parallel_size,
                            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                            dtypes={"params": str(next(gpt.parameters()).dtype)})
