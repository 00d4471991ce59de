"""The gradient of rl_forward_backward does not depend on what ran before it.

Regression: megatron's fp32 optimizer step leaves `param.grad` aliasing `param.main_grad`; without
dropping it, the first backward after every optimizer step was accumulated twice (autograd into
main_grad, then DDP's hook again), so every training step after the first had a wrong gradient.
Proved for the plain and the distributed optimizer, with one and with two micro-batches: the
gradient right after a step equals the same call repeated, and equals a fresh model's gradient
with the same weights.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed
LOSS = dict(divergence="urkl", style="differentiable", beta=0.1)


def _build(distributed_optimizer: bool, weights=None):
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer

    gpt = build_gpt_model(fx.hf_config())
    fx.load_full_weights(gpt, weights if weights is not None else fx.full_megatron_weights(gpt.vocab_size))
    return setup_model_and_optimizer([gpt], lr=1e-2, clip_grad=0.0, use_distributed_optimizer=distributed_optimizer)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().flatten().clone() for p in model[0].module.parameters()])


def body(rank, world_size):
    from megatron_rpg.losses import RPGLoss
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=1)
    batches = fx.global_micro_batches(fx.hf_config().vocab_size)
    out = {}
    for distributed_optimizer in (False, True):
        for count in (1, 2):
            model, optimizer = _build(distributed_optimizer)
            rl_forward_backward(model, batches[:count], RPGLoss(**LOSS))
            optimizer.step()
            rl_forward_backward(model, batches[:count], RPGLoss(**LOSS))
            after_step = _grads(model)
            rl_forward_backward(model, batches[:count], RPGLoss(**LOSS))
            repeated = _grads(model)
            fresh, _ = _build(distributed_optimizer, fx.gather_full_weights(model[0].module))
            rl_forward_backward(fresh, batches[:count], RPGLoss(**LOSS))
            out[(distributed_optimizer, count)] = (after_step, repeated, _grads(fresh))
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(body, world_size=1)[0]


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("count", [1, 2], ids=["one-micro-batch", "two-micro-batches"])
def test_gradient_after_an_optimizer_step_is_not_counted_twice(results, distributed_optimizer, count):
    after_step, repeated, fresh = results[(distributed_optimizer, count)]
    assert float(after_step.norm()) > 0
    assert torch.equal(after_step, repeated)
    assert torch.equal(after_step, fresh)
