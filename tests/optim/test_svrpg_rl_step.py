"""SVRPG through the trainer's RL forward-backward (`rl_forward_backward(..., svrpg_pass=...)`).

Property: the snapshot pass's gradient is ρ̄(τ)·g(τ; θ̃) per sequence, ρ̄ = π_θ̃(τ)/π_θt(τ) from the
sampler θ_t's old log-probs. With β = 0 and sequence-level REINFORCE the per-sequence loss is linear
in the advantage, so the reference is the ordinary on-policy loss at θ̃ with advantages ρ·A, and
the two gradients must agree to float32 rounding. Real megatron GPTModel, CPU, one process.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg import SVRPGPass
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
LOSS = dict(divergence="rkl", style="reinforce", beta=0.0, is_level="sequence",
            aggregation="seq-mean-token-sum")


def _micro_batches(ddp, step):
    g = torch.Generator().manual_seed(500 + step)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, T.VOCAB, (4, T.SEQ), generator=g)
        mask = torch.ones(4, T.SEQ)
        mask[:, :3] = 0  # prompt
        batches.append({"tokens": tokens, "loss_mask": mask,
                        "advantages": torch.randn(4, generator=g)})
    for batch, logp in zip(batches, compute_logprobs(ddp, batches)):
        batch["old_logp"] = logp  # the sampler is the model's current policy
    return batches


def _grads(svrpg):
    return torch.cat([s.grad.float().clone() for s in svrpg.slots])


def _body(rank, world_size):
    initialize_parallel(seed=1234)
    try:
        ddp, _, svrpg = T.build(True, SVRPGConfig(enabled=True, inner_steps=4))

        def grad_fn(micro_batches, svrpg_pass):
            rl_forward_backward(ddp, micro_batches, loss_config=LOSS, svrpg_pass=svrpg_pass)

        svrpg.anchor(grad_fn, [_micro_batches(ddp, 0)])
        for step in (1, 2):  # θ_t moves away from θ̃
            svrpg.step(grad_fn, _micro_batches(ddp, step))
        batch = _micro_batches(ddp, 3)
        snapshot_pass = SVRPGPass("snapshot")
        with svrpg.snapshot_loaded():
            rl_forward_backward(ddp, batch, loss_config=LOSS, svrpg_pass=snapshot_pass)
            snapshot_grad = _grads(svrpg)
            reference = []
            for mb, snap_logp in zip(batch, compute_logprobs(ddp, batch)):
                log_rho = ((snap_logp - mb["old_logp"]) * mb["loss_mask"]).sum(-1)
                reference.append({**mb, "old_logp": snap_logp,
                                  "advantages": mb["advantages"] * log_rho.exp()})
            rl_forward_backward(ddp, reference, loss_config=LOSS)
            reference_grad = _grads(svrpg)
        log_rho_spread = max(abs(s["log_rho_min"]) + abs(s["log_rho_max"])
                             for _, s in snapshot_pass.ratio_stats)
        error = float((snapshot_grad - reference_grad).norm() / reference_grad.norm())
        return error, log_rho_spread
    finally:
        destroy_parallel()


def test_snapshot_pass_gradient_is_rho_weighted_on_policy_gradient_at_the_snapshot():
    error, log_rho_spread = run_on_ranks(_body, world_size=1)[0]
    assert log_rho_spread > 0.05  # ρ really differs from 1, so the weighting is exercised
    assert error <= 1e-6
