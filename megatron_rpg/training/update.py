"""The update phase of a step: optimizer steps on the rollout batch, plain or SVRPG.

    metrics = policy_update(config, model, optimizer, loss, micro_batches)   # --num-mini-batches steps
    metrics = svrpg_update(config, model, svrpg, loss, micro_batches)        # one inner step (--svrpg)

Each reports the loss metrics over the whole batch (training/step_metrics.py) and the gradient norm
of its optimizer steps.
"""
from __future__ import annotations

from megatron_rpg.megatron.forward_backward import rl_forward_backward
from megatron_rpg.optim.svrpg import rl_grad_fn
from megatron_rpg.training.step_metrics import combine_call_metrics, grad_norm_metrics, units_key


def step_prompts_per_rank(config, svrpg, dp: int) -> int:
    """Prompts each DP rank draws this step. An SVRPG anchor step draws only the anchor batch
    (|D_L| sequences from π_θ̃ = the current model) and takes its inner step on it too: with
    θ_t = θ̃ the direction is v = g(θ_t) − g(θ̃) + μ = μ on any batch, so another one is not drawn."""
    if svrpg is not None and svrpg.needs_anchor:
        return config.svrpg.anchor_batch_size // (dp * config.rollout.samples_per_prompt)
    return config.rollout.batch_size // dp


def policy_update(config, model, optimizer, loss, micro_batches: list[dict]) -> dict:
    """--num-mini-batches optimizer steps, each on its share of the micro-batches."""
    per_mini = len(micro_batches) // config.training.num_mini_batches
    calls, norms = [], []
    for start in range(0, len(micro_batches), per_mini):
        _, metrics = rl_forward_backward(model, micro_batches[start:start + per_mini], loss,
                                         temperature=config.rollout.temperature)
        calls.append(metrics)
        norms.append(optimizer.step()[1])
    return {**combine_call_metrics(calls, units=units_key(loss)), **grad_norm_metrics(norms)}


def svrpg_update(config, model, svrpg, loss, micro_batches: list[dict]) -> dict:
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
    metrics.update(combine_call_metrics(current, units=units_key(loss)), **step_metrics)
    metrics.update(grad_norm_metrics([grad_norm]))
    return metrics
