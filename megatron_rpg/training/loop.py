"""The RL training loop: `train(config)` reads as one step of the paper, phase by phase.

    sample ─► score ─► advantages ─► old (and ref) log-probs ─► update (plain or SVRPG)
           ─► loss.after_step ─► [eval] ─► metrics (progress bar, sinks) ─► checkpoint ─► engine.update_weights

- sample + score: the rollout engine answers each prompt --rollout-samples-per-prompt times and the
  task rewards them (training/rollouts.py; --rollout-dynamic-sampling: DAPO's redraws);
- advantages and old log-probs: per group (or over the global batch), then a Megatron forward-only
  pass of the current model (π_old; π_ref = π_old unless --svrpg-update-ref);
- rollout IS (--rollout-is-correction): the engine/trainer mismatch weight ŵ on every token's loss
  (losses/rollout_is.py; training/rollouts.attach_rollout_is_weights);
- update: --num-mini-batches optimizer steps on rl_forward_backward's exact global mean, or one
  SVRPG inner step, v = g(θ_t) − ρ̄·g(θ̃) + μ (training/update.py); R²VPO's kept batches of the last
  --r2vpo-reuse-steps steps join the step's micro-batches (training/stale_batches.py);
- loss.after_step: a stateful loss updates its state from the step's global metrics (R²VPO's λ);
- checkpoint: every --save-interval steps and at the end (model + optimizer + sampling state + loss state;
  --load resumes exactly, --finetune takes the weights only);
- weight sync: the engine samples the next step from the updated weights (a no-op for the embedded
  engine, which shares them);
- evaluation (training/evaluation.py): before the first step, every --eval-interval steps and after
  the last, on held-out prompts with its own sampling seeds (the training streams are untouched);
  metrics go to the progress bar and the sinks of training/metrics_sinks.py (JSONL, TensorBoard, W&B).

    history = train(parse_train_config([...]))        # launched by megatron_rpg/train.py

Runs as one process (gloo, CPU) or under torchrun (TP × PP × DP ranks; NCCL on GPUs). Every rank
runs the same code; ranks of one model replica see the same prompts, DP ranks their own.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings

import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_rpg.losses import build_policy_loss
from megatron_rpg.megatron.capo_loss import CAPOLoss
from megatron_rpg.megatron.fallback_warnings import warn_if_falling_back
from megatron_rpg.megatron.lean_forward import select_model_forward
from megatron_rpg.megatron.lr_schedule import current_lr
from megatron_rpg.megatron.parallel import default_process_group, destroy_parallel, initialize_parallel
from megatron_rpg.optim.reference_policy import ReferencePolicy
from megatron_rpg.rollout.embedded import EmbeddedEngine
from megatron_rpg.rollout.sglang_engine import SGLangEngine
from megatron_rpg.training.build import build_lr_scheduler_at, build_model_and_optimizer, build_svrpg, model_hf_config
from megatron_rpg.training.checkpointing import (prepare_checkpoints, resume_checkpoint, resumes, save_checkpoint,
                                                 saved_loss_state)
from megatron_rpg.training.config import TrainConfig
from megatron_rpg.training.config_checks import (check_capo_top_k, check_layout, check_sequence_length,
                                                 warn_if_beta_has_no_effect)
from megatron_rpg.training.evaluation import Evaluator, eval_prompts, evaluates
from megatron_rpg.training.metrics_sinks import open_sinks
from megatron_rpg.training.rollouts import (GroupSampler, attach_old_logprobs, attach_rollout_is_weights,
                                            attach_token_advantages, decoded_samples, rollout_metrics,
                                            to_micro_batches)
from megatron_rpg.training.skipped_steps import SkippedSteps, SkippedStepsWarning
from megatron_rpg.training.stale_batches import StaleBatches
from megatron_rpg.training.tasks import build_task
from megatron_rpg.training.update import policy_update, step_prompts_per_rank, svrpg_update


class History(list):
    """The per-step metrics of a run (every rank gets the same); `evaluations` holds each evaluation's
    eval/* metrics with its "step" (the first: before this run's first step)."""

    def __init__(self):
        super().__init__()
        self.evaluations: list[dict] = []
        self.correct_means = ""  # what the task counts as correct (task.correct_means)


def train(config: TrainConfig) -> History:
    """Runs RL steps up to --train-iters (from the resumed step with a resumable --load); returns the
    per-step metrics of this run (every rank gets the same)."""
    config.model.check_machine()  # TE / FP8 on this machine: fail before any process group or model
    warn_if_falling_back()  # megatron-core's six Apex/TE warnings are silenced: this one says it
    warn_if_beta_has_no_effect(config)
    history = History()
    with default_process_group():
        dp = check_layout(config, dist.get_world_size())
        config = prepare_checkpoints(config)  # --save writable, --load verified (or a first run): before the model
        device = initialize_parallel(config.parallel.tensor_model_parallel_size,
                                     config.parallel.pipeline_model_parallel_size, seed=config.training.seed)
        run = None
        try:
            run = build_run(config, dp, device)
            sinks = open_sinks(config.logging, start=run.start, run_config=_flat(config)) if dist.get_rank() == 0 else []
            progress = _progress_bar(config, run.start)
            skips = SkippedSteps(config.training.max_skipped_steps,  # non-finite steps (megatron/step_guard.py)
                                 masked_out_hint=getattr(run.loss, "masked_out_hint", ""))
            history.correct_means = getattr(run.sampler.task, "correct_means", "")
            if run.evaluator is not None:  # before training (a resumed run: at its first step, not logged again)
                history.evaluations.append(_evaluate(run, run.start))
                if run.start == 0:
                    for sink in sinks:
                        sink.write(0, history.evaluations[-1])
            started = time.perf_counter()
            for step in progress:
                # sample + score, advantages, old (and reference) log-probs
                groups, drawn, passes = run.sampler.draw(step_prompts_per_rank(config, run.svrpg, dp))
                micro_batches = to_micro_batches(config, groups)
                mismatch = attach_old_logprobs(run.model, micro_batches, config.rollout.temperature,
                                               rows_per_pass=config.training.logprob_micro_batch_size)
                reference_metrics = attach_reference_logprobs(run, micro_batches, config.rollout.temperature)
                if config.loss.name == "reinforce_pp":  # per-token advantages need the old log-probs
                    attach_token_advantages(config, micro_batches)
                metrics = rollout_metrics(groups, drawn, passes, mismatch, device) | reference_metrics
                # update: the optimizer steps (the reference log-probs of --svrpg-update-ref inside)
                # --rollout-is-correction: ŵ = bounded π_old/π_engine on every batch the step trains on
                if run.svrpg is not None:
                    metrics.update(attach_rollout_is_weights(config, micro_batches, device))
                    metrics.update(svrpg_update(config, run.model, run.svrpg, run.loss, micro_batches, skips))
                else:  # with R²VPO's --r2vpo-reuse-steps the kept batches train again (else unchanged)
                    step_batches = run.stale.with_fresh(micro_batches, config.training.num_mini_batches)
                    metrics.update(attach_rollout_is_weights(config, step_batches, device))
                    metrics.update(policy_update(config, run.model, run.optimizer, run.loss, step_batches, skips))
                    run.stale.push(micro_batches)
                metrics.update(run.loss.after_step(metrics))  # losses with state (R²VPO's λ)
                if run.reference is not None:  # π_ref ← π_θ when --ref-policy says so
                    metrics.update(run.reference.after_step(step + 1, metrics))
                metrics["lr"] = current_lr(run.optimizer)  # the lr this step's updates used
                run.scheduler.step(1)
                # weight sync: the next step samples from the updated policy (the SGLang engine's sync_s/_bytes)
                metrics.update(run.engine.update_weights() or {})
                metrics.update(step=step + 1, elapsed_s=time.perf_counter() - started)
                if run.evaluator is not None and config.evaluation.due(step + 1, config.training.train_iters):
                    history.evaluations.append(_evaluate(run, step + 1))
                    metrics.update(history.evaluations[-1])
                if config.logging.log_samples:  # this DP rank's first responses
                    metrics["samples"] = decoded_samples(groups, run.sampler.task, config.logging.log_samples)
                history.append(metrics)
                _report(progress, history, sinks, skips)
                if _checkpoint_due(config, step + 1) and not skips.state_is_bad:  # keep the last good one
                    save_checkpoint(run.model, run.optimizer, run.svrpg, run.hf_config, config, step=step + 1,
                                    rank_state=run.rank_state(), loss_state=run.loss.state_dict(),
                                    reference=run.reference, loss=run.loss)
            progress.close()
            for sink in sinks:
                sink.close()
            if skips.summary() and dist.get_rank() == 0:
                warnings.warn(f"this run: {skips.summary()}", SkippedStepsWarning, stacklevel=2)
        finally:
            if run is not None:
                run.engine.close()  # stops the SGLang servers we launched
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
    stale: StaleBatches
    start: int
    reference: ReferencePolicy | None = None  # --ref-policy's weights (None: π_ref = π_old)
    scheduler: object = None  # megatron's OptimizerParamScheduler (megatron/lr_schedule.py), at `start`
    evaluator: Evaluator | None = None  # held-out evaluation (None: --no-eval)
    forward_fallback: str | None = None  # why megatron's forward runs under --model-forward auto (None: lean or asked)

    def rank_state(self) -> dict:
        """This rank's part of a checkpoint: its sampling state and R²VPO's kept batches."""
        return {"sampler": self.sampler.state_dict(), "stale_batches": self.stale.state_dict()}


def build_run(config: TrainConfig, dp: int, device="cpu") -> Run:
    """Everything the steps need, checked against each other before any step; a resumable --load
    restores model, optimizer, step and (in the same layout) the sampling state."""
    hf_config = model_hf_config(config)
    vocab_size = int(hf_config.vocab_size)
    task = build_task(config, vocab_size, dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp)
    held_out = eval_prompts(config, task) if evaluates(config) else None
    longest_eval = max(len(prompt) for prompt in held_out[0]) if held_out else 0
    check_sequence_length(config, max(task.max_prompt_tokens, longest_eval), int(hf_config.max_position_embeddings))
    check_capo_top_k(config, vocab_size)
    model, optimizer, _ = build_model_and_optimizer(config, hf_config)
    forward_fallback = select_model_forward(model, config.training.model_forward)  # ValueError: lean not covered
    if forward_fallback is not None and dist.get_rank() == 0:
        print(f"model forward: megatron's GPTModel modules (--model-forward auto: the lean forward does not "
              f"cover this model: {forward_fallback})", file=sys.stderr)
    svrpg = build_svrpg(config, optimizer)
    if config.rollout.engine == "sglang":  # servers start on the first generate, from the weights then
        engine = SGLangEngine(config.sglang, model, hf_config, seed=config.training.seed)
    else:
        engine = EmbeddedEngine(model, vocab_size=vocab_size, seed=config.training.seed,
                                micro_batch_size=config.rollout.micro_batch_size)
    run = Run(hf_config=hf_config, model=model, optimizer=optimizer, svrpg=svrpg,
              forward_fallback=forward_fallback, loss=_policy_loss(config, optimizer, vocab_size),
              engine=engine, sampler=GroupSampler(config, task, engine),
              stale=StaleBatches(config.loss.r2vpo.reuse_steps), start=0,
              # the starting weights (a converted --load's included); a resume overwrites them
              reference=ReferencePolicy(optimizer, config.reference) if config.reference.keeps_weights else None)
    if resumes(config.checkpoint):
        run.start, rank_state = resume_checkpoint(model, optimizer, svrpg, config.checkpoint.load, run.rank_state(),
                                                  reference=run.reference, loss=run.loss)
        run.loss.load_state_dict(saved_loss_state(config.checkpoint.load))
        if rank_state is not None and "sampler" not in rank_state:  # saved before R²VPO: the sampler's alone
            run.sampler.load_state_dict(rank_state)
        elif rank_state is not None:
            run.sampler.load_state_dict(rank_state["sampler"])
            run.stale.load_state_dict(rank_state["stale_batches"])
        else:  # another layout: the samples cannot continue exactly, and the kept batches were another rank's
            run.sampler.restart_at(run.start)
    run.scheduler = build_lr_scheduler_at(config, optimizer, run.start)
    if held_out is not None:
        run.evaluator = Evaluator(config, task, engine, *held_out, device=device,
                                  dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp)
    return run


def _policy_loss(config: TrainConfig, optimizer, vocab_size: int):
    """--loss, with --capo's masks on its tokens (megatron/capo_loss.py) when asked for."""
    loss = build_policy_loss(config.loss)
    if not config.capo.enabled:
        return loss
    opt = config.optimizer
    return CAPOLoss(loss, config.capo, lr=lambda: current_lr(optimizer), temperature=config.rollout.temperature,
                    vocab_size=vocab_size, adam=(opt.adam_beta1, opt.adam_beta2, opt.adam_eps))


def attach_reference_logprobs(run: Run, micro_batches: list[dict], temperature: float) -> dict:
    """--ref-policy initial/every-k/kl: each micro-batch's `ref_logp` from the reference weights; the
    measured KL(π_old ‖ π_ref). Nothing for --ref-policy old (the losses then take π_ref = π_old)."""
    if run.reference is None:
        return {}
    references, metrics = run.reference.logprobs(run.model, micro_batches, temperature=temperature)
    for micro_batch, reference in zip(micro_batches, references):
        micro_batch["ref_logp"] = reference
    return metrics


def _evaluate(run: Run, step: int) -> dict:
    started = time.perf_counter()
    metrics = run.evaluator.evaluate()
    return dict(metrics, step=step, **{"eval/seconds": time.perf_counter() - started})


def _flat(config: TrainConfig) -> dict:
    """The TrainConfig as one flat dict of section/field values (W&B's run config)."""
    return {f"{section.name}/{key}": value for section in dataclasses.fields(config)
            for key, value in dataclasses.asdict(getattr(config, section.name)).items()}


def _progress_bar(config: TrainConfig, start: int):
    show = dist.get_rank() == 0 and config.logging.progress
    return tqdm(range(start, config.training.train_iters), desc="RPG training", disable=not show,
                dynamic_ncols=True, initial=start, total=config.training.train_iters)


def _report(progress, history: History, sinks: list, skips: SkippedSteps) -> None:
    """The progress bar's reward (last and mean of the last 10 steps), KL, latest eval accuracy,
    skipped optimizer steps (once there are any) and --capo's rejected share; the step's metrics to
    every sink (rank 0)."""
    metrics = history[-1]
    recent = [entry["reward_mean"] for entry in history[-10:]]
    shown = dict(reward=f"{metrics['reward_mean']:.3f}", reward_avg10=f"{sum(recent) / len(recent):.3f}",
                 kl=f"{metrics.get('kl_k3', float('nan')):.1e}")
    if history.evaluations:
        shown["eval_acc"] = f"{history.evaluations[-1]['eval/accuracy']:.3f}"
    if skips.skipped:
        shown["skipped"] = skips.skipped
    if "capo_rejected_total" in metrics:  # --capo: the share of response tokens its masks rejected
        shown["capo_rejected"] = f"{metrics['capo_rejected_total']:.3f}"
    progress.set_postfix(**shown)
    for sink in sinks:
        sink.write(metrics["step"], metrics)


def _checkpoint_due(config: TrainConfig, steps_done: int) -> bool:
    interval = config.checkpoint.save_interval
    last = steps_done == config.training.train_iters
    return bool(config.checkpoint.save) and (last or bool(interval and steps_done % interval == 0))
