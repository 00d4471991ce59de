"""The RL training loop: `train(config)` reads as one step of the paper, phase by phase.

    sample ─► score ─► advantages ─► old (and ref) log-probs ─► update (plain or SVRPG)
           ─► loss.after_step ─► metrics (progress bar, JSONL) ─► checkpoint ─► engine.update_weights

- sample + score: the rollout engine answers each prompt --rollout-samples-per-prompt times and the
  task rewards them (training/rollouts.py; --rollout-dynamic-sampling: DAPO's redraws);
- advantages and old log-probs: per group (or over the global batch), then a Megatron forward-only
  pass of the current model (π_old; π_ref = π_old unless --svrpg-update-ref);
- update: --num-mini-batches optimizer steps on rl_forward_backward's exact global mean, or one
  SVRPG inner step, v = g(θ_t) − ρ̄·g(θ̃) + μ (training/update.py);
- checkpoint: every --save-interval steps and at the end (model + optimizer + sampling state;
  --load resumes exactly, --finetune takes the weights only);
- weight sync: the engine samples the next step from the updated weights (a no-op for the embedded
  engine, which shares them).

    history = train(parse_train_config([...]))        # launched by megatron_rpg/train.py

Runs as one process (gloo, CPU) or under torchrun (TP × PP × DP ranks; NCCL on GPUs). Every rank
runs the same code; ranks of one model replica see the same prompts, DP ranks their own.
"""
from __future__ import annotations

import dataclasses
import time

import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_rpg.losses import build_policy_loss
from megatron_rpg.megatron.parallel import default_process_group, destroy_parallel, initialize_parallel
from megatron_rpg.rollout.embedded import EmbeddedEngine
from megatron_rpg.training.build import build_model_and_optimizer, build_svrpg, model_hf_config
from megatron_rpg.training.checkpointing import prepare_checkpoints, resume_checkpoint, resumes, save_checkpoint
from megatron_rpg.training.config import TrainConfig
from megatron_rpg.training.config_checks import check_layout, check_sequence_length, warn_if_beta_has_no_effect
from megatron_rpg.training.metrics_log import append_line, drop_lines_after_step
from megatron_rpg.training.rollouts import GroupSampler, attach_old_logprobs, rollout_metrics, to_micro_batches
from megatron_rpg.training.tasks import build_task
from megatron_rpg.training.update import policy_update, step_prompts_per_rank, svrpg_update


def train(config: TrainConfig) -> list[dict]:
    """Runs RL steps up to --train-iters (from the resumed step with a resumable --load); returns the
    per-step metrics of this run (every rank gets the same)."""
    config.model.check_machine()  # TE / FP8 on this machine: fail before any process group or model
    warn_if_beta_has_no_effect(config)
    history = []
    with default_process_group():
        dp = check_layout(config, dist.get_world_size())
        config = prepare_checkpoints(config)  # --save writable, --load verified (or a first run): before the model
        device = initialize_parallel(config.parallel.tensor_model_parallel_size,
                                     config.parallel.pipeline_model_parallel_size, seed=config.training.seed)
        try:
            run = build_run(config, dp)
            progress = _progress_bar(config, run.start)
            started = time.perf_counter()
            for step in progress:
                # sample + score, advantages, old log-probs
                groups, drawn, passes = run.sampler.draw(step_prompts_per_rank(config, run.svrpg, dp))
                micro_batches = to_micro_batches(config, groups)
                mismatch = attach_old_logprobs(run.model, micro_batches, config.rollout.temperature)
                metrics = rollout_metrics(groups, drawn, passes, mismatch, device)
                # update: the optimizer steps (the reference log-probs of --svrpg-update-ref inside)
                if run.svrpg is not None:
                    metrics.update(svrpg_update(config, run.model, run.svrpg, run.loss, micro_batches))
                else:
                    metrics.update(policy_update(config, run.model, run.optimizer, run.loss, micro_batches))
                metrics.update(run.loss.after_step(metrics))  # losses with state (none of today's)
                metrics.update(step=step + 1, elapsed_s=time.perf_counter() - started)
                history.append(metrics)
                _report(config, progress, history)
                if _checkpoint_due(config, step + 1):
                    save_checkpoint(run.model, run.optimizer, run.svrpg, run.hf_config, config, step=step + 1,
                                    rank_state=run.sampler.state_dict())
                run.engine.update_weights()  # the next step samples from the updated policy
            progress.close()
        finally:
            destroy_parallel()
    return history


@dataclasses.dataclass
class Run:
    """What one training run holds: the model and its optimizer (SVRPG-wrapped or not), the loss, the
    rollout engine and sampler, and the step it starts from (a resumed checkpoint's)."""

    hf_config: object
    model: list
    optimizer: object
    svrpg: object
    loss: object
    engine: object
    sampler: GroupSampler
    start: int


def build_run(config: TrainConfig, dp: int) -> Run:
    """Everything the steps need, checked against each other before any step; a resumable --load
    restores model, optimizer, step and (in the same layout) the sampling state."""
    hf_config = model_hf_config(config)
    vocab_size = int(hf_config.vocab_size)
    task = build_task(config, vocab_size, dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp)
    check_sequence_length(config, task.max_prompt_tokens, int(hf_config.max_position_embeddings))
    model, optimizer, _ = build_model_and_optimizer(config, hf_config)
    svrpg = build_svrpg(config, optimizer)
    engine = EmbeddedEngine(model, vocab_size=vocab_size, seed=config.training.seed)
    sampler = GroupSampler(config, task, engine)
    start = 0
    if resumes(config.checkpoint):
        start, rank_state = resume_checkpoint(model, optimizer, svrpg, config.checkpoint.load, sampler.state_dict())
        if rank_state is not None:
            sampler.load_state_dict(rank_state)
        else:  # another layout: the samples cannot continue exactly
            sampler.restart_at(start)
        if config.logging.log_jsonl and dist.get_rank() == 0:  # a previous run may have logged past start
            drop_lines_after_step(config.logging.log_jsonl, start)
    return Run(hf_config=hf_config, model=model, optimizer=optimizer, svrpg=svrpg, loss=build_policy_loss(config.loss),
               engine=engine, sampler=sampler, start=start)


def _progress_bar(config: TrainConfig, start: int):
    show = dist.get_rank() == 0 and config.logging.progress
    return tqdm(range(start, config.training.train_iters), desc="RPG training", disable=not show,
                dynamic_ncols=True, initial=start, total=config.training.train_iters)


def _report(config: TrainConfig, progress, history: list[dict]) -> None:
    """The progress bar's reward (last and mean of the last 10 steps) and KL; a JSONL line on rank 0."""
    metrics = history[-1]
    recent = [entry["reward_mean"] for entry in history[-10:]]
    progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", reward_avg10=f"{sum(recent) / len(recent):.3f}",
                         kl=f"{metrics.get('kl_k3', float('nan')):.1e}")
    if config.logging.log_jsonl and dist.get_rank() == 0:
        append_line(config.logging.log_jsonl, metrics)


def _checkpoint_due(config: TrainConfig, steps_done: int) -> bool:
    interval = config.checkpoint.save_interval
    last = steps_done == config.training.train_iters
    return bool(config.checkpoint.save) and (last or bool(interval and steps_done % interval == 0))
