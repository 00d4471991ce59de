"""SVRPG through the trainer's RL forward-backward (`rl_forward_backward(model, batch, SnapshotLoss(loss, pass))`).

Property: the snapshot pass's gradient is ρ̄(τ)·g(τ; θ̃) per sequence, ρ̄ = π_θ̃(τ)/π_θt(τ) from the
sampler θ_t's old log-probs. With β = 0 and sequence-level REINFORCE the per-sequence loss is linear
in the advantage, so the reference is the ordinary on-policy loss at θ̃ with advantages ρ·A, and
the two gradients must agree to float32 rounding. Real megatron GPTModel, CPU, one process.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.losses.svrpg import SnapshotLoss
from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg import SVRPGPass, rl_grad_fn
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
LOSS = T.RL_LOSS


def _micro_batches(ddp, step):
    return T.rl_batch(ddp, 500 + step)


def _grads(svrpg):
    return torch.cat([s.grad.float().clone() for s in svrpg.slots])


def _body(rank, world_size):
    initialize_parallel(seed=1234)
    try:
        ddp, _, svrpg = T.build(True, SVRPGConfig(enabled=True, inner_steps=4, anchor_batch_size=8))
        grad_fn = rl_grad_fn(ddp, LOSS)

        svrpg.anchor(grad_fn, [_micro_batches(ddp, 0)])
        for step in (1, 2):  # θ_t moves away from θ̃
            svrpg.step(grad_fn, _micro_batches(ddp, step))
        batch = _micro_batches(ddp, 3)
        snapshot_pass = SVRPGPass("snapshot")
        with svrpg.snapshot_loaded():
            rl_forward_backward(ddp, batch, SnapshotLoss(LOSS, snapshot_pass))
            snapshot_grad = _grads(svrpg)
            reference = []
            for mb, snap_logp in zip(batch, compute_logprobs(ddp, batch)):
                log_rho = ((snap_logp - mb["old_logp"]) * mb["loss_mask"]).sum(-1)
                reference.append({**mb, "old_logp": snap_logp,
                                  "advantages": mb["advantages"] * log_rho.exp()})
            rl_forward_backward(ddp, reference, LOSS)
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
