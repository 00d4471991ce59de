"""The trainer's model in and out.

Build: a preset, an HF config, or `--load` (a converted HF checkpoint, or a checkpoint of ours).
Save (`--save`, every `--save-interval` steps and at the end): one reshardable torch_dist
checkpoint holding the model (the keys tools/convert_megatron_to_hf.py exports), the optimizer
(Adam moments, dp_reshardable; SVRPG's θ̃ and μ shards when on), each rank's sampling state, and
`trainer_state.json` (the step, the layout). `--load` of such a checkpoint resumes: model,
optimizer, step, and — in the same layout (world size, TP, PP) — every rank's generators, so the
resumed run continues bit-exactly; in another layout the generators restart from (seed, step). `--finetune`
loads the weights only.

Saving writes into a temporary folder next to --save and renames it into place, so an existing
checkpoint is replaced only by a complete one (checkpoint/convert.py's staged_output_dir).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.transformer.module import Float16Module

from megatron_rpg.checkpoint.convert import describe_checkpoint, hf_config_of, staged_output_dir
from megatron_rpg.checkpoint.dist_ckpt import load_model_weights
from megatron_rpg.megatron.compat import init_optimizer_states_for_loading, restore_adam_steps
from megatron_rpg.megatron.model_args import build_gpt_model_kwargs
from megatron_rpg.megatron.models import build_gpt_model, check_supported_hf_config, padded_vocab_size
from megatron_rpg.megatron.optimizer_setup import bare_model, setup_model_and_optimizer
from megatron_rpg.training.tasks import find_tokenizer_dir

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}  # reshardable over DP

TINY_PRESET = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=16, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                   tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02)


def model_hf_config(args):
    """The HF config the model is built from (a transformers config object), checked as supported."""
    from transformers import AutoConfig

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
        config = AutoConfig.for_model(**TINY_PRESET)
    check_supported_hf_config(config)
    return config


def check_save_dir(directory: str) -> None:
    """--save replaces its folder with each checkpoint: refuse one that holds anything but a checkpoint
    of ours (a parent folder of runs, say), before any training."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--save {directory} exists and is not a folder")
    if os.path.isdir(directory) and os.listdir(directory) and not is_resumable(directory):
        raise ValueError(f"--save {directory} is not empty and is not a megatron_rpg checkpoint (no "
                         f"{TRAINER_STATE_FILE}); each save replaces the whole folder, so choose a new or "
                         f"empty one (e.g. {os.path.join(directory, 'run1')})")


def build_model_and_optimizer(args):
    """(DDP model chunks, megatron optimizer, HF config) for this rank; the weights of a converted
    --load checkpoint (or of any with --finetune) are loaded here, a resumable one by resume_checkpoint."""
    hf_config = model_hf_config(args)
    kwargs = build_gpt_model_kwargs(args)
    if args.save:
        check_save_dir(args.save)
    gpt = build_gpt_model(hf_config, **kwargs)
    if args.load is not None and not resumes(args):
        load_model_weights(gpt, args.load)
    module = gpt if kwargs["params_dtype"] == torch.float32 else Float16Module(gpt.config, gpt)
    model, optimizer = setup_model_and_optimizer(
        [module], lr=args.lr, weight_decay=args.weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2),
        adam_eps=args.adam_eps, clip_grad=args.clip_grad, use_distributed_optimizer=args.use_distributed_optimizer)
    return model, optimizer, hf_config


def is_resumable(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, TRAINER_STATE_FILE))


def resumes(args) -> bool:
    """Whether --load continues a run of ours (model, optimizer, step, sampling state) rather than
    taking weights only (a converted checkpoint, or --finetune)."""
    return args.load is not None and not args.finetune and is_resumable(args.load)


def _sharded_state(model, optimizer, svrpg, rank_state, *, is_loading: bool, with_rank_state: bool = True):
    model_sd = bare_model(model[0]).sharded_state_dict()
    owner = svrpg if svrpg is not None else optimizer
    state = {"model": model_sd,
             "optimizer": owner.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)}
    if with_rank_state:  # one object per rank: its generators (identical only at the same layout)
        state["rank_state"] = ShardedObject("trainer.rank_state", rank_state, (dist.get_world_size(),),
                                            (dist.get_rank(),), replica_id=0)
    return state


def save_checkpoint(model, optimizer, svrpg, hf_config, args, *, step: int, rank_state) -> None:
    """Model + optimizer (+ SVRPG) + sampling state at --save. Collective: every rank calls it;
    rank 0 owns the staging folder, which replaces --save only once complete. A failure on rank 0
    before or after the collective write reaches every rank as an error (none waits forever), and
    the previous checkpoint stays in place."""
    if dist.get_rank() != 0:
        staging = _receive_from_rank0("prepare the staging folder next to --save")
        dist_checkpointing.save(_sharded_state(model, optimizer, svrpg, rank_state, is_loading=False), staging)
        _receive_from_rank0("finish the checkpoint")
        return
    try:
        with staged_output_dir(args.save, overwrite=True) as staging:
            dist.broadcast_object_list([staging], src=0)
            dist_checkpointing.save(_sharded_state(model, optimizer, svrpg, rank_state, is_loading=False), staging)
            _describe(staging, model, svrpg, hf_config, args, step)
    except BaseException as error:
        dist.broadcast_object_list([_Failed(f"{type(error).__name__}: {error}")], src=0)
        raise
    dist.broadcast_object_list([None], src=0)  # renamed into place: others may read --save now


class _Failed(str):
    """What rank 0 broadcasts instead of a path or an all-clear when saving failed there."""


def _receive_from_rank0(what: str):
    holder = [None]
    dist.broadcast_object_list(holder, src=0)
    if isinstance(holder[0], _Failed):
        raise RuntimeError(f"rank 0 could not {what} for the checkpoint: {holder[0]}")
    return holder[0]


def _describe(staging, model, svrpg, hf_config, args, step) -> None:
    gpt = bare_model(model[0])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    describe_checkpoint(staging, hf_config, padded_vocab_size=padded_vocab_size(int(hf_config.vocab_size), tp),
                        tensor_model_parallel_size=args.tensor_model_parallel_size,
                        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                        dtypes={"params": str(next(gpt.parameters()).dtype)},
                        tokenizer_dir=find_tokenizer_dir(args))  # so --load and the HF export have it
    with open(os.path.join(staging, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({"step": step, "world_size": dist.get_world_size(), "svrpg": svrpg is not None,
                   "tensor_model_parallel_size": args.tensor_model_parallel_size,
                   "pipeline_model_parallel_size": args.pipeline_model_parallel_size}, f, indent=2)


def resume_checkpoint(model, optimizer, svrpg, directory: str, rank_state_template):
    """Loads model, optimizer (+ SVRPG) state from a checkpoint of ours; returns (step, this rank's
    sampling state, or None when the layout (world size, TP, PP) differs from the saving run's)."""
    with open(os.path.join(directory, TRAINER_STATE_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    if saved["svrpg"] != (svrpg is not None):
        raise ValueError(f"--load {directory} was saved {'with' if saved['svrpg'] else 'without'} --svrpg; "
                         f"resume with the same setting, or pass --finetune to load the weights only")
    # each rank's sampling state belongs to its place in the layout: restore it only in the same one
    same_world = (saved["world_size"] == dist.get_world_size()
                  and saved["tensor_model_parallel_size"] == parallel_state.get_tensor_model_parallel_world_size()
                  and saved["pipeline_model_parallel_size"] == parallel_state.get_pipeline_model_parallel_world_size())
    init_optimizer_states_for_loading(optimizer)  # a fresh Adam has no state to load into
    request = _sharded_state(model, optimizer, svrpg, rank_state_template, is_loading=True,
                             with_rank_state=same_world)
    loaded = dist_checkpointing.load(request, directory)
    bare_model(model[0]).load_state_dict(loaded["model"])
    if svrpg is not None:
        svrpg.load_state_dict(loaded["optimizer"])
    else:
        with torch.no_grad():  # megatron copies into fp32 main shards that view leaf params
            optimizer.load_state_dict(loaded["optimizer"])
            restore_adam_steps(optimizer, loaded["optimizer"])
    return int(saved["step"]), (loaded["rank_state"] if same_world else None)
