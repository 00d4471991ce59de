"""SVRPG's direction v against ground truth computed without the wrapper (real megatron, CPU).

Model A carries the wrapper; model B is built identically (same seed) and never steps, so it holds
θ̃ (the anchor is taken before A's first step). Loss: the trainer's RL step (`rl_forward_backward`,
β = 0 sequence-level REINFORCE), whose per-sequence loss is linear in the advantage, so ρ·g(τ; θ̃) is
B's on-policy gradient with advantages ρ·A (ρ = π_θ̃/π_θt from B's and A's log-probs). v is read in
the grad buffer when the wrapped optimizer's step() is entered. Properties:
- μ equals B's plain gradient on the anchor batch;
- inner step 0 (θ_t = θ̃, the anchor batch again): v equals μ exactly;
- inner steps 1, 2 (θ_t ≠ θ̃, fresh batches): v = g_A(θ_t) − g_B(ρ·A) + μ_B;
- clip_grad below ‖v‖: the optimizer's main grads are v·clip/(‖v‖ + 1e-6) and its grad norm is ‖v‖.
Float32 equalities hold within tests/float_bounds.py's bound: 4× the float32 reference's rounding,
measured against the same reference in float64 (a float64 model loaded with the same θ_t or θ̃, ρ
from its float64 log-probs; the norm and clip references from v in float32 and in float64).
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.megatron.forward_backward import rl_forward_backward
from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
from megatron_rpg.optim.svrpg import rl_grad_fn
from megatron_rpg.optim.svrpg_config import SVRPGConfig
from megatron_rpg.megatron.compat import sub_optimizers
from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound
from tests.megatron import rl_step_fixtures as fx
from tests.optim import svrpg_training as T

pytestmark = pytest.mark.distributed
CLIP = 0.05
CONFIG = SVRPGConfig(enabled=True, inner_steps=3, anchor_batch_size=8)


def _grads(ddp) -> dict:
    return {n: p.main_grad.detach().clone() for n, p in ddp[0].module.named_parameters()}


def _plain_grad(ddp, micro_batches) -> dict:
    rl_forward_backward(ddp, micro_batches, T.RL_LOSS)
    return _grads(ddp)


def _main_grads(ddp, optimizer) -> dict:
    """The fp32 main grads the wrapped optimizer stepped with (DP=1: whole parameters)."""
    names = {id(p): n for n, p in ddp[0].module.named_parameters()}
    out = {}
    for opt in sub_optimizers(optimizer):
        for model_group, main_group in zip(opt.model_fp32_groups, opt.shard_fp32_groups):
            for model_param, main in zip(model_group, main_group):
                out[names[id(model_param)]] = main.grad.detach().clone().view(model_param.shape)
    return out


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1).double() for n in sorted(grads)])


def _combine(a: dict, b: dict, c: dict) -> dict:
    return {n: a[n] - b[n] + c[n] for n in a}


def _ground_truth(current_ddp, snapshot_ddp, batch, mu, model64=None) -> dict:
    """g(θ_t) − g(θ̃; ρ·A) + μ and its terms' size; model64: in float64, loaded with each θ."""
    if model64 is None:
        current = _plain_grad(current_ddp, batch)
        weighted = _plain_grad(snapshot_ddp, T.rho_weighted(snapshot_ddp, batch))
    else:
        T.load_weights(model64, current_ddp)
        current = _plain_grad(model64, fx.as_float64(batch))
        T.load_weights(model64, snapshot_ddp)
        weighted = _plain_grad(model64, T.rho_weighted(model64, batch, float64=True))
    terms = [_flat(current), _flat(weighted), _flat(mu)]
    return {"v": _flat(_combine(current, weighted, mu)),
            "terms_size": float(torch.cat(terms).norm())}


def _body(rank, world_size):
    initialize_parallel(seed=1234)
    try:
        ddp, optimizer, svrpg = T.build(True, CONFIG, clip_grad=CLIP)
        snapshot_ddp, _, _ = T.build(True, CONFIG)  # holds θ̃ = the initial weights throughout
        model64, _, _ = T.build(True, CONFIG, float64=True)  # the float64 reference, reloaded per pass
        same_start = all(torch.equal(p, q) for p, q in zip(ddp[0].module.parameters(),
                                                           snapshot_ddp[0].module.parameters()))
        captured = {}
        wrapped_prepare, wrapped_update = optimizer.prepare_grads, optimizer.step_with_ready_grads

        def spy_prepare():  # the first stage of the (guarded) optimizer step: v as handed to it
            captured["v"] = _grads(ddp)
            return wrapped_prepare()

        def spy_update():  # the last stage: the clipped main grads Adam stepped with
            result = wrapped_update()
            captured["clipped"] = _main_grads(ddp, optimizer)
            return result

        optimizer.prepare_grads, optimizer.step_with_ready_grads = spy_prepare, spy_update
        grad_fn = rl_grad_fn(ddp, T.RL_LOSS)
        anchor_batch = T.rl_batch(ddp, 0)
        svrpg.anchor(grad_fn, [anchor_batch])
        mu = _plain_grad(snapshot_ddp, anchor_batch)
        T.load_weights(model64, snapshot_ddp)
        mu64 = _plain_grad(model64, fx.as_float64(anchor_batch))
        names = {id(p): n for n, p in ddp[0].module.named_parameters()}
        mu_wrapper = {names[id(s.model_param)]: m.view(s.model_param.shape).clone()
                      for s, m in zip(svrpg.slots, svrpg.anchor_mean)}  # DP=1: whole parameters
        steps = []
        for step in range(3):
            batch = anchor_batch if step == 0 else T.rl_batch(ddp, step)
            expected = _ground_truth(ddp, snapshot_ddp, batch, mu)
            expected64 = _ground_truth(ddp, snapshot_ddp, batch, mu64, model64)
            ok, grad_norm, _, metrics = svrpg.step(grad_fn, batch)
            steps.append({"ok": ok, "grad_norm": float(grad_norm), "metrics": metrics,
                          "v": _flat(captured["v"]), "clipped": _flat(captured["clipped"]),
                          "expected": expected["v"], "expected64": expected64["v"],
                          "terms_size": expected64["terms_size"]})
        return {"same_start": same_start, "mu": _flat(mu), "mu64": _flat(mu64),
                "mu_wrapper": _flat(mu_wrapper), "steps": steps}
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def run():
    return run_on_ranks(_body, world_size=1)[0]


def test_anchor_mean_is_the_plain_gradient_of_the_snapshot_on_the_anchor_batch(run):
    assert run["same_start"]
    bound = float32_bound(run["mu"], run["mu64"])
    print(f"mu: bound {bound:.3g}, difference {float((run['mu_wrapper'] - run['mu']).norm()):.3g}")
    assert_float32_equal(run["mu_wrapper"], run["mu"], bound, "mu")


def test_first_inner_step_on_the_anchor_batch_gives_v_equal_to_mu_exactly(run):
    first = run["steps"][0]
    assert first["metrics"]["svrpg/log_rho_min"] == first["metrics"]["svrpg/log_rho_max"] == 0.0
    assert torch.equal(first["v"], run["mu_wrapper"])


def test_later_inner_steps_give_current_minus_rho_weighted_snapshot_plus_mu(run):
    for step in run["steps"][1:]:
        spread = step["metrics"]["svrpg/log_rho_max"] - step["metrics"]["svrpg/log_rho_min"]
        assert spread > 1e-3  # θ_t has left θ̃: ρ ≠ 1, the weighting is exercised
        # ... and the control variate ρ̄·g(θ̃) − μ is a large part of v, not a rounding-level term
        assert step["metrics"]["svrpg/control_variate_norm"] > 0.5 * float(step["v"].norm())
        # the terms g(θ_t), ρ·g(θ̃), μ are each ~‖v‖: the floor's scale is their size
        bound = float32_bound(step["expected"], step["expected64"], step["terms_size"])
        error = float((step["v"] - step["expected"]).norm())
        print(f"v vs ground truth: difference {error:.3g}, bound {bound:.3g}, log rho spread {spread:.3f}")
        assert_float32_equal(step["v"], step["expected"], bound, "v")


def test_gradient_clipping_acts_on_v(run):
    for step in run["steps"]:
        v32, v64 = step["v"].float(), step["v"]  # the same float32 values; computed on in each dtype
        norm = float(v64.norm())
        assert step["ok"] and norm > CLIP  # the clip is active
        norm_bound = float32_bound(float(v32.norm()), norm)
        for name in ("grad_norm", "svrpg/direction_norm"):
            got = step["grad_norm"] if name == "grad_norm" else step["metrics"][name]
            assert_float32_equal(got, float(v32.norm()), norm_bound, name)
        clipped32 = v32 * (CLIP / (v32.norm() + 1e-6))
        clipped_bound = float32_bound(clipped32, v64 * (CLIP / (norm + 1e-6)))
        assert_float32_equal(step["clipped"], clipped32, clipped_bound, "clipped grads")
