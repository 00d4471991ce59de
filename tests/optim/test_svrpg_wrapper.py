"""The SVRPG wrapper's entry points on real megatron (CPU, one process): flags → wrapper, the anchor
size check (--svrpg-anchor-batch-size), and update_ref's reference log-probs at θ̃.

reference_logprobs property: after θ_t has moved off θ̃, they equal `compute_logprobs` of the model
taken when it held θ̃ (captured at anchor time), bit for bit, and afterwards θ_t (model params and
fp32 main shards) is bit-identical to before the call.

A failed inner step (bf16 params, distributed optimizer): when the snapshot pass raises, never
weights its loss by svrpg_pass.ratio (a RuntimeError naming it), or the wrapped optimizer's step()
raises (the model then held θ̃), the bf16 model params are bit-identical to before the call, not
θ̃, and the next step runs normally. rl_grad_fn refuses the losses SVRPG is not defined or not
unbiased for.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_rpg.losses import GRPOLoss
from megatron_rpg.megatron.forward_backward import compute_logprobs
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg import SVRPGOptimizer, SVRPGPass, rl_grad_fn
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from tests.distributed.harness import run_on_ranks
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
CONFIG = SVRPGConfig(enabled=True, inner_steps=2, anchor_batch_size=8, rho_clip=(0.5, 2.0), update_ref=True)




def _error(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, ArithmeticError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _weights(ddp, svrpg):
    return ([p.detach().clone() for p in ddp[0].module.parameters()],
            [s.main.clone() for s in svrpg.slots])


def _failed_step(ddp, svrpg, grad_fn, batch) -> dict:
    """svrpg.step with a grad_fn that fails in the snapshot pass; is the model back at θ_t?"""
    before = _weights(ddp, svrpg)
    with svrpg.snapshot_loaded():
        snapshot = [p.detach().clone() for p in ddp[0].module.parameters()]
    error = _error(lambda: svrpg.step(grad_fn, batch))
    after = _weights(ddp, svrpg)
    return {"error": error,
            "snapshot_differs": any(not torch.equal(a, b) for a, b in zip(before[0], snapshot)),
            "restored": all(torch.equal(a, b) for group in zip(before, after) for a, b in zip(*group))}


def _failed_steps_body():
    config = SVRPGConfig(enabled=True, inner_steps=4, anchor_batch_size=T.ANCHOR_BATCH)
    ddp, _, svrpg = T.build(True, config, bf16=True)
    grad_fn = T.make_grad_fn(ddp)
    T.run_steps(svrpg, grad_fn, range(2))  # θ_2 ≠ θ̃, also in bf16

    def raising(batch, svrpg_pass):
        if svrpg_pass.kind == "snapshot":
            raise RuntimeError("simulated out of memory in the snapshot pass")
        return grad_fn(batch, svrpg_pass)

    def unweighted(batch, svrpg_pass):  # the snapshot loss without ρ̄ (an anchor pass's loss)
        return grad_fn(batch, SVRPGPass("anchor") if svrpg_pass.kind == "snapshot" else svrpg_pass)

    out = {"raising": _failed_step(ddp, svrpg, raising, T.global_batch(2, T.GLOBAL_BATCH)),
           "unweighted": _failed_step(ddp, svrpg, unweighted, T.global_batch(2, T.GLOBAL_BATCH))}

    def failing_optimizer_step():
        raise RuntimeError("simulated failure in the wrapped optimizer's step")

    # shadows the method on this instance only: the last stage of the (guarded) optimizer step
    svrpg.optimizer.step_with_ready_grads = failing_optimizer_step
    out["optimizer_raises"] = _failed_step(ddp, svrpg, grad_fn, T.global_batch(2, T.GLOBAL_BATCH))
    del svrpg.optimizer.step_with_ready_grads
    out["next_step_ok"] = bool(svrpg.step(grad_fn, T.global_batch(2, T.GLOBAL_BATCH))[0])
    return out


def _body(rank, world_size):
    initialize_parallel(seed=1234)
    try:
        ddp, optimizer, _ = T.build(True, SVRPGConfig(enabled=True))
        out = {}
        svrpg = SVRPGOptimizer(optimizer, CONFIG)
        grad_fn = rl_grad_fn(ddp, T.RL_LOSS)
        anchor_batch, later = T.rl_batch(ddp, 0), T.rl_batch(ddp, 5)
        out["before_anchor"] = _error(lambda: svrpg.reference_logprobs(ddp, later))
        out["too_small"] = _error(lambda: svrpg.anchor(grad_fn, [anchor_batch[:1]]))
        out["needs_anchor_after_error"] = svrpg.needs_anchor
        out["no_count"] = _error(lambda: svrpg.anchor(lambda b, p: None, [anchor_batch]))

        def nan_grad_fn(batch, svrpg_pass):  # float32: no loss scaler to back off
            info = grad_fn(batch, svrpg_pass)
            svrpg.slots[0].grad[0] = float("nan")
            return info

        out["nan_anchor"] = _error(lambda: svrpg.anchor(nan_grad_fn, [anchor_batch]))
        at_snapshot = compute_logprobs(ddp, later)  # the model holds θ̃ = θ_0 here
        out["anchor_metrics"] = svrpg.anchor(grad_fn, [anchor_batch])
        svrpg.step(grad_fn, anchor_batch)
        svrpg.step(grad_fn, T.rl_batch(ddp, 1))  # θ_2 ≠ θ̃
        before = _weights(ddp, svrpg)
        out["moved"] = max(float((a - b).abs().max()) for a, b in zip(
            compute_logprobs(ddp, later), at_snapshot))
        reference = svrpg.reference_logprobs(ddp, later)
        after = _weights(ddp, svrpg)
        out["reference_equal"] = all(torch.equal(a, b) for a, b in zip(reference, at_snapshot))
        out["restored"] = all(torch.equal(a, b) for group in zip(before, after) for a, b in zip(*group))
        off = SVRPGOptimizer(optimizer, dataclasses.replace(svrpg.config, update_ref=False))
        out["update_ref_off"] = _error(lambda: off.reference_logprobs(ddp, later))
        other_ddp, _, _ = T.build(True, SVRPGConfig(enabled=True))
        out["foreign_model"] = _error(lambda: svrpg.reference_logprobs(other_ddp, later))
        out["failed_steps"] = _failed_steps_body()
        return out
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def run():
    return run_on_ranks(_body, world_size=1)[0]


def test_a_disabled_config_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match="enabled=False"):
        SVRPGOptimizer(None, SVRPGConfig())


def test_anchor_with_another_sequence_count_than_anchor_batch_size_fails_naming_both(run):
    assert "ValueError" in run["too_small"] and "4 sequences" in run["too_small"]
    assert "--svrpg-anchor-batch-size is 8" in run["too_small"]
    assert run["needs_anchor_after_error"]  # the half-built snapshot is not used
    assert "num_sequences" in run["no_count"]


def test_non_finite_anchor_gradient_without_a_dynamic_loss_scale_is_an_error(run):
    assert run["nan_anchor"].startswith("FloatingPointError: anchor batch 0: non-finite gradient")


def test_reference_logprobs_are_the_snapshot_policy_and_current_weights_come_back_bit_exactly(run):
    assert run["anchor_metrics"]["svrpg/reference_moved"] == 1.0
    assert run["anchor_metrics"]["svrpg/anchor_sequences"] == 8.0
    assert run["moved"] > 1e-3  # θ_t's log-probs differ from θ̃'s: the swap is what makes them equal
    assert run["reference_equal"]
    assert run["restored"]


def test_reference_logprobs_refuse_without_update_ref_before_an_anchor_and_for_another_model(run):
    assert "--svrpg-update-ref" in run["update_ref_off"] and "ValueError" in run["update_ref_off"]
    assert "anchor() first" in run["before_anchor"]
    assert "not in `model`" in run["foreign_model"]


def test_a_snapshot_pass_that_raises_leaves_the_bf16_model_params_at_the_current_weights(run):
    result = run["failed_steps"]["raising"]
    assert result["snapshot_differs"]  # θ̃ ≠ θ_t in bf16, so left-over θ̃ would show
    assert result["error"] == "RuntimeError: simulated out of memory in the snapshot pass"
    assert result["restored"]
    assert run["failed_steps"]["next_step_ok"]


def test_a_snapshot_pass_not_weighted_by_the_ratio_is_an_error_and_restores_the_weights(run):
    result = run["failed_steps"]["unweighted"]
    assert result["error"].startswith("RuntimeError: grad_fn's snapshot pass never called "
                                      "svrpg_pass.ratio(...)")
    assert "weight_token_loss" in result["error"]
    assert result["snapshot_differs"] and result["restored"]


def test_a_wrapped_optimizer_step_that_raises_leaves_the_bf16_model_params_at_the_current_weights(run):
    result = run["failed_steps"]["optimizer_raises"]
    assert result["error"] == "RuntimeError: simulated failure in the wrapped optimizer's step"
    assert result["snapshot_differs"] and result["restored"]


@pytest.mark.parametrize("aggregation", ["token-mean"])
def test_rl_grad_fn_refuses_an_aggregation_under_which_svrpg_is_biased(aggregation):
    loss = dataclasses.replace(T.RL_LOSS, aggregation=aggregation)
    with pytest.raises(ValueError, match=f"aggregation '{aggregation}' is biased.*'seq-mean-token-sum'"):
        rl_grad_fn(None, loss)


def test_rl_grad_fn_refuses_a_loss_other_than_rpg():
    with pytest.raises(ValueError, match="defined for the RPG losses; got loss 'grpo'.*use loss 'rpg'"):
        rl_grad_fn(None, GRPOLoss(aggregation="seq-mean-token-sum"))


def test_rl_grad_fn_refuses_num_global_tokens_since_each_svrpg_pass_is_normalised_by_itself():
    with pytest.raises(ValueError, match=r"num_global_tokens=16\).*drop num_global_tokens"):
        rl_grad_fn(None, T.RL_LOSS, num_global_tokens=16)
