"""guarded_step skips an optimizer step whose loss, gradient norm or optimizer state is not finite,
leaving every parameter and Adam moment bit-identical (torch.equal), where megatron's own step()
changes them (weight decay and moment decay on a zeroed gradient, or inf moments with --clip-grad 0);
on a finite step it is megatron's step bit for bit. Plain and distributed optimizer, clip on and off.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed
LOSS = dict(divergence="urkl", style="differentiable", beta=0.1)
FAULTS = ("inf-grad", "nan-grad", "huge-grad", "nan-loss", "inf-moment", "nan-param")


def _build(distributed_optimizer: bool, clip_grad: float):
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer

    gpt = build_gpt_model(fx.hf_config())
    fx.load_full_weights(gpt, fx.full_megatron_weights(gpt.vocab_size))
    return setup_model_and_optimizer([gpt], lr=1e-2, weight_decay=0.1, clip_grad=clip_grad,
                                     use_distributed_optimizer=distributed_optimizer)


def _state(model, optimizer) -> list[torch.Tensor]:
    """Every model parameter, main parameter and Adam state tensor, as raw bits (NaN equals itself)."""
    from megatron_rpg.megatron.step_guard import state_tensors

    tensors = list(model[0].parameters()) + state_tensors(optimizer)
    return [t.detach().clone().view(torch.int32) for t in tensors]


def _inject(fault: str, model, optimizer):
    """Puts the fault in; returns the loss to hand to the step."""
    from megatron_rpg.megatron.step_guard import state_tensors

    torch.set_grad_enabled(False)  # writes into leaf parameters
    first = next(model[0].parameters())
    if fault in ("inf-grad", "nan-grad", "huge-grad"):
        first.main_grad.view(-1)[3] = {"inf-grad": float("inf"), "nan-grad": float("nan"), "huge-grad": 1e20}[fault]
    elif fault == "inf-moment":
        moments = [t for t in state_tensors(optimizer) if t.dim() > 0 and t.numel() > 1]
        moments[-1].view(-1)[0] = float("inf")  # an exp_avg_sq, as --clip-grad 0 left them on main
    elif fault == "nan-param":
        state_tensors(optimizer)[0].view(-1)[0] = float("nan")
    torch.set_grad_enabled(True)
    return float("nan") if fault == "nan-loss" else 0.5


def body(rank, world_size):
    from megatron_rpg.losses import RPGLoss
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.megatron.step_guard import guarded_step

    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=1)
    batches = fx.global_micro_batches(fx.hf_config().vocab_size)[:1]
    out = {}
    for distributed_optimizer in (False, True):
        for clip in (1.0, 0.0):
            # a finite step: guarded_step is megatron's step (same parameters after)
            runs = []
            for guarded in (False, True):
                model, optimizer = _build(distributed_optimizer, clip)
                rl_forward_backward(model, batches, RPGLoss(**LOSS))
                result = guarded_step(optimizer) if guarded else optimizer.step()
                runs.append((_state(model, optimizer), result))
            out[(distributed_optimizer, clip, "finite")] = runs
            for fault in FAULTS:
                model, optimizer = _build(distributed_optimizer, clip)
                rl_forward_backward(model, batches, RPGLoss(**LOSS))
                optimizer.step()  # Adam has moments now
                rl_forward_backward(model, batches, RPGLoss(**LOSS))
                loss = _inject(fault, model, optimizer)
                before = _state(model, optimizer)
                outcome = guarded_step(optimizer, loss=loss)
                after = _state(model, optimizer)
                # megatron's own step() on the same faulty gradient (the guard's absence)
                model, optimizer = _build(distributed_optimizer, clip)
                rl_forward_backward(model, batches, RPGLoss(**LOSS))
                optimizer.step()
                rl_forward_backward(model, batches, RPGLoss(**LOSS))
                _inject(fault, model, optimizer)
                optimizer.step()
                out[(distributed_optimizer, clip, fault)] = (before, after, outcome, _state(model, optimizer))
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(body, world_size=1)[0]


CASES = [(d, c) for d in (False, True) for c in (1.0, 0.0)]
IDS = [f"{'distributed' if d else 'plain'}-clip{c:g}" for d, c in CASES]


@pytest.mark.parametrize("distributed_optimizer, clip", CASES, ids=IDS)
def test_a_finite_step_is_megatrons_step_bit_for_bit(results, distributed_optimizer, clip):
    (plain, plain_result), (guarded, outcome) = results[(distributed_optimizer, clip, "finite")]
    assert outcome.updated and outcome.skipped is None and plain_result[0]
    assert len(plain) == len(guarded) and all(torch.equal(a, b) for a, b in zip(plain, guarded))
    if clip:
        assert outcome.grad_norm == plain_result[1]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("distributed_optimizer, clip", CASES, ids=IDS)
def test_a_non_finite_step_is_skipped_leaving_parameters_and_adam_moments_bit_identical(
        results, distributed_optimizer, clip, fault):
    before, after, outcome, unguarded = results[(distributed_optimizer, clip, fault)]
    assert not outcome.updated and outcome.skipped is not None
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    # without the guard megatron's step changed the state (or made it non-finite)
    assert not all(torch.equal(a, b) for a, b in zip(before, unguarded))


def test_the_skip_reason_names_what_was_not_finite(results):
    outcomes = {fault: results[(False, 0.0, fault)][2] for fault in FAULTS}
    causes = {fault: outcome.cause for fault, outcome in outcomes.items()}
    assert causes == {"inf-grad": "grad_norm", "nan-grad": "grad_norm", "huge-grad": "grad_norm", "nan-loss": "loss",
                      "inf-moment": "state", "nan-param": "state"}
    reasons = {fault: outcome.skipped for fault, outcome in outcomes.items()}
    assert "non-finite gradient norm inf" in reasons["inf-grad"]
    assert "non-finite gradient norm nan" in reasons["nan-grad"]
    assert "non-finite gradient norm inf" in reasons["huge-grad"]  # 1e20: the float32 sum of squares overflows
    assert "non-finite loss nan" in reasons["nan-loss"]
    assert "1 non-finite parameter / Adam state tensor" in reasons["inf-moment"]
    assert "1 non-finite parameter / Adam state tensor" in reasons["nan-param"]
