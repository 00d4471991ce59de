"""The update phase of a step: optimizer steps on the rollout batch, plain or SVRPG.

    metrics = policy_update(config, model, optimizer, loss, micro_batches, skips)   # --num-mini-batches steps
    metrics = svrpg_update(config, model, svrpg, loss, micro_batches, skips)        # one inner step (--svrpg)

Each reports the loss metrics over the whole batch (training/step_metrics.py), the gradient norm
of its optimizer steps and `skipped_steps`: how many of them megatron/step_guard.py skipped (a
non-finite loss, gradient norm or optimizer state); `skips` (training/skipped_steps.py) counts them
over the run and ends it after --max-skipped-steps in a row.

A mini-batch whose loss kept no token on any rank (normaliser 0: --capo rejected every response
token) has no objective (0/0) and an exactly-zero gradient. Its optimizer step is not taken
(nothing_kept_outcome): a taken step would still move the weights, through Adam's momentum from
earlier steps and weight decay, with no policy gradient behind it, and would advance Adam's bias
correction and CAPO's moment table. Such steps are counted in `capo_all_rejected_steps`, not in
`skipped_steps` (they are CAPO's decision, not a fault), and do not count towards --max-skipped-steps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rpg.megatron.forward_backward import rl_forward_backward
from megatron_rpg.megatron.step_guard import guarded_step, nothing_kept_outcome
from megatron_rpg.optim.svrpg import rl_grad_fn
from megatron_rpg.training.step_metrics import combine_call_metrics, grad_norm_metrics, units_key


def step_prompts_per_rank(config, svrpg, dp: int) -> int:
    """Prompts each DP rank draws this step. An SVRPG anchor step draws only the anchor batch
    (|D_L| sequences from π_θ̃ = the current model) and takes its inner step on it too: with
    θ_t = θ̃ the direction is v = g(θ_t) − g(θ̃) + μ = μ on any batch, so another one is not drawn."""
    if svrpg is not None and svrpg.needs_anchor:
        return config.svrpg.anchor_batch_size // (dp * config.rollout.samples_per_prompt)
    return config.rollout.batch_size // dp


def policy_update(config, model, optimizer, loss, micro_batches: list[dict], skips) -> dict:
    """--num-mini-batches optimizer steps, each on its share of the micro-batches."""
    per_mini = len(micro_batches) // config.training.num_mini_batches
    calls, norms, skipped, empty = [], [], 0, 0
    for start in range(0, len(micro_batches), per_mini):
        share = micro_batches[start:start + per_mini]
        loss_value, metrics = rl_forward_backward(model, share, loss, temperature=config.rollout.temperature)
        calls.append(metrics)
        if metrics["normalizer"] == 0:  # global: no kept token on any rank (module docstring)
            outcome = nothing_kept_outcome()
            empty += 1
        else:
            outcome = guarded_step(optimizer, loss=float(loss_value))
            skipped += outcome.skipped is not None
        if hasattr(loss, "finish_step"):  # CAPO's Adam model: one moment update per applied step
            loss.finish_step(applied=outcome.skipped is None)
        skips.record(outcome, **_zero_gradient_context(share, outcome, loss))
        norms.append(outcome.grad_norm)
    extra = {"capo_all_rejected_steps": float(empty)} if hasattr(loss, "finish_step") else {}
    return {**combine_call_metrics(calls, units=units_key(loss)), **grad_norm_metrics(norms),
            "skipped_steps": float(skipped), **extra}


def svrpg_update(config, model, svrpg, loss, micro_batches: list[dict], skips) -> dict:
    """One SVRPG inner step, v = g(θ_t) − ρ̄·g(θ̃) + μ; at an anchor step θ̃ ← θ_t and μ are taken on
    these micro-batches first (step_prompts_per_rank drew the anchor batch)."""
    current = []  # the loss metrics at θ_t: those of the "current" pass, as in a plain step
    grad_fn = rl_grad_fn(model, loss, temperature=config.rollout.temperature,
                         on_metrics=lambda kind, metrics: current.append(metrics) if kind == "current" else None)
    metrics = {}
    if svrpg.needs_anchor:
        metrics.update(svrpg.anchor(grad_fn, [micro_batches]))
    if svrpg.config.update_ref:
        # at the sampling temperature, like the old log-probs and the loss: KL = 0 where θ_t = θ̃
        references = svrpg.reference_logprobs(model, micro_batches, temperature=config.rollout.temperature)
        for micro_batch, ref in zip(micro_batches, references):
            micro_batch["ref_logp"] = ref
    _, grad_norm, _, step_metrics = svrpg.step(grad_fn, micro_batches)
    outcome = svrpg.last_step
    skips.record(outcome, **_zero_gradient_context(micro_batches, outcome, loss))
    metrics.update(combine_call_metrics(current, units=units_key(loss)), **step_metrics)
    metrics.update(grad_norm_metrics([grad_norm]), skipped_steps=float(outcome.skipped is not None))
    return metrics


def _zero_gradient_context(micro_batches: list[dict], outcome, loss=None) -> dict:
    """For a step with an exactly-zero gradient norm (which every rank sees alike, so every rank joins
    the all-reduce): signal, some response token on some rank has a non-zero advantage;
    deterministic, every sampled response token on every rank had old log-probability exactly 0.
    With a loss that masks tokens itself (CAPO: `kept_signal`, what its last mini-batch kept on this
    rank; False off the last pipeline stage, where no loss runs), signal counts the kept tokens only,
    and masked_out says the batch had a non-zero advantage but the loss kept none of them."""
    kept_signal = loss.kept_signal() if hasattr(loss, "kept_signal") else None
    if outcome.grad_norm != 0.0:
        return {}
    masks = [mb["loss_mask"] > 0 for mb in micro_batches]
    signal = any(bool((mb["advantages"].unsqueeze(-1) if mb["advantages"].dim() == 1 else mb["advantages"])
                      .expand_as(mask)[mask].ne(0).any()) for mb, mask in zip(micro_batches, masks))
    deterministic = all(bool(mb["old_logp"][mask].eq(0).all()) for mb, mask in zip(micro_batches, masks))
    flags = torch.tensor([float(signal), float(not deterministic), float(bool(kept_signal))],
                         device=micro_batches[0]["advantages"].device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if kept_signal is None:
        return dict(signal=bool(flags[0]), deterministic=not bool(flags[1]))
    return dict(signal=bool(flags[2]), deterministic=not bool(flags[1]), masked_out=bool(flags[0]) and not bool(flags[2]))
