"""SVRPG through the trainer's RL forward-backward (`rl_forward_backward(model, batch, SnapshotLoss(loss, pass))`).

Property: the snapshot pass's gradient is ρ̄(τ)·g(τ; θ̃) per sequence, ρ̄ = π_θ̃(τ)/π_θt(τ) from the
sampler θ_t's old log-probs. With β = 0 and sequence-level REINFORCE the per-sequence loss is linear
in the advantage, so the reference is the ordinary on-policy loss at θ̃ with advantages ρ·A, and
the two float32 gradients agree within tests/float_bounds.py's bound: 4× the reference's float32
rounding, measured against the same reference in float64 (a float64 model loaded with θ̃, ρ from its
float64 log-probs). Real megatron GPTModel, CPU, one process.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.losses.svrpg import SnapshotLoss
from megatron_rpg.megatron.forward_backward import rl_forward_backward
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg import SVRPGPass, rl_grad_fn
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
LOSS = T.RL_LOSS
CONFIG = SVRPGConfig(enabled=True, inner_steps=4, anchor_batch_size=8)


def _micro_batches(ddp, step):
    return T.rl_batch(ddp, 500 + step)


def _grads(ddp):
    """DP=1: every parameter's whole reduced gradient, in its own dtype."""
    return torch.cat([p.main_grad.detach().flatten().clone() for p in ddp[0].module.parameters()])


def _body(rank, world_size):
    initialize_parallel(seed=1234)
    try:
        ddp, _, svrpg = T.build(True, CONFIG)
        model64, _, _ = T.build(True, CONFIG, float64=True)
        grad_fn = rl_grad_fn(ddp, LOSS)

        svrpg.anchor(grad_fn, [_micro_batches(ddp, 0)])
        for step in (1, 2):  # θ_t moves away from θ̃
            svrpg.step(grad_fn, _micro_batches(ddp, step))
        batch = _micro_batches(ddp, 3)
        snapshot_pass = SVRPGPass("snapshot")
        with svrpg.snapshot_loaded():
            rl_forward_backward(ddp, batch, SnapshotLoss(LOSS, snapshot_pass))
            snapshot_grad = _grads(ddp)
            rl_forward_backward(ddp, T.rho_weighted(ddp, batch), LOSS)
            reference_grad = _grads(ddp)
            T.load_weights(model64, ddp)  # θ̃
        rl_forward_backward(model64, T.rho_weighted(model64, batch, float64=True), LOSS)
        log_rho_spread = max(abs(s["log_rho_min"]) + abs(s["log_rho_max"])
                             for _, s in snapshot_pass.ratio_stats)
        return dict(snapshot=snapshot_grad, reference=reference_grad, reference64=_grads(model64),
                    log_rho_spread=log_rho_spread)
    finally:
        destroy_parallel()


def test_snapshot_pass_gradient_is_rho_weighted_on_policy_gradient_at_the_snapshot():
    result = run_on_ranks(_body, world_size=1)[0]
    assert result["log_rho_spread"] > 0.05  # ρ really differs from 1, so the weighting is exercised
    bound = float32_bound(result["reference"], result["reference64"])
    print(f"bound {bound:.3g}, difference {float((result['snapshot'] - result['reference']).norm()):.3g}, "
          f"gradient norm {float(result['reference64'].norm()):.3g}")
    assert_float32_equal(result["snapshot"], result["reference"], bound, "snapshot gradient")
