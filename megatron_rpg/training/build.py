"""The model side of a run, built from its TrainConfig: the HF config of the model, the megatron
model and optimizer, and the SVRPG wrapper (training/loop.build_run puts them together with the task
of training/tasks.py and checks them against each other before any step).

    hf_config = model_hf_config(config)
    model, optimizer, hf_config = build_model_and_optimizer(config, hf_config)
    svrpg = build_svrpg(config, optimizer)                 # None without --svrpg

The weights of a converted `--load` checkpoint (or of any with `--finetune`) are loaded here; a
resumable checkpoint of ours is loaded by training/checkpointing.resume_checkpoint.
"""
from __future__ import annotations

import json
import os

import torch
from megatron.core.transformer.module import Float16Module

from megatron_rpg.checkpoint.convert import hf_config_of
from megatron_rpg.checkpoint.dist_ckpt import load_model_weights
from megatron_rpg.checkpoint.layout import latest_checkpoint
from megatron_rpg.megatron.lr_schedule import LRSchedule, build_lr_scheduler
from megatron_rpg.megatron.models import build_gpt_model, check_supported_hf_config
from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
from megatron_rpg.optim.svrpg import SVRPGOptimizer
from megatron_rpg.training.checkpointing import check_save_dir, resumes
from megatron_rpg.training.config import TrainConfig

TINY_PRESET = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=16, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                   tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02)


def model_hf_config(run: TrainConfig):
    """The HF config the model is built from (a transformers config object), checked as supported:
    the --load checkpoint's, else --hf-config's, else the preset's."""
    from transformers import AutoConfig

    model, load = run.model, run.checkpoint.load
    if load is not None:
        if not os.path.isdir(load):
            raise ValueError(f"--load {load}: no such checkpoint folder")
        config = hf_config_of(latest_checkpoint(load))
    elif model.hf_config is not None:
        path = model.hf_config
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--hf-config {model.hf_config}: no config.json there")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"--hf-config {model.hf_config}: {path} is not valid JSON ({error})") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise ValueError(f"--hf-config {model.hf_config}: config.json has no model_type")
        config = AutoConfig.for_model(**values)
    else:
        config = AutoConfig.for_model(**TINY_PRESET)
    check_supported_hf_config(config)
    return config


def build_model_and_optimizer(config: TrainConfig, hf_config=None):
    """(DDP model chunks, megatron optimizer, HF config) for this rank, with the weights of a converted
    --load checkpoint (or of any with --finetune) already loaded; hf_config defaults to
    model_hf_config(config)."""
    hf_config = hf_config if hf_config is not None else model_hf_config(config)
    kwargs = config.model.gpt_kwargs()
    if config.checkpoint.save:
        check_save_dir(config.checkpoint.save)
    gpt = build_gpt_model(hf_config, **kwargs)
    if config.checkpoint.load is not None and not resumes(config.checkpoint):
        load_model_weights(gpt, latest_checkpoint(config.checkpoint.load))
    module = gpt if kwargs["params_dtype"] == torch.float32 else Float16Module(gpt.config, gpt)
    opt = config.optimizer
    model, optimizer = setup_model_and_optimizer(
        [module], lr=opt.lr, weight_decay=opt.weight_decay, adam_betas=(opt.adam_beta1, opt.adam_beta2),
        adam_eps=opt.adam_eps, clip_grad=opt.clip_grad, min_lr=opt.schedule.min_lr if opt.schedule else 0.0,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer)
    return model, optimizer, hf_config


def build_lr_scheduler_at(config: TrainConfig, optimizer, step: int):
    """Megatron's lr scheduler for --lr and the --lr-* schedule, at RL step `step` (a resumed run's)."""
    opt = config.optimizer
    scheduler = build_lr_scheduler(optimizer, opt.schedule or LRSchedule(lr=opt.lr, weight_decay=opt.weight_decay))
    scheduler.step(step)
    return scheduler


def build_svrpg(config: TrainConfig, optimizer) -> SVRPGOptimizer | None:
    """The SVRPG wrapper around `optimizer` with --svrpg, else None (the plain optimizer steps)."""
    return SVRPGOptimizer(optimizer, config.svrpg) if config.svrpg.enabled else None
