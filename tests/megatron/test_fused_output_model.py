"""The training step with the fused output layer (rl_forward_backward / compute_logprobs with
output_layer="fused", the default) equals the unfused one (megatron's output layer, then the
log-probs of its logits), on the tiny megatron model, untied and tied embeddings, temperature 0.7.

One RL step per case: compute_logprobs (with entropy), rl_forward_backward (RPG loss with clip,
token-mean), megatron's Adam step. In float64: log-probs, entropies and loss to 1e-12, every
parameter's gradient (main_grad: the tied embedding's gradient carries both its input and its output
use, so it lands in the same parameter) and update to 1e-10 relative. In float32: within
tests/float_bounds.py's bound (4× the unfused step's own rounding, measured against it in float64).
Each run counts its calls of fused_output_logprobs, so the two paths are shown to differ in code.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, float32_bound
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed

FAMILIES = ("qwen2", "qwen2-tied")
TEMPERATURE = 0.7


def _loss():
    from megatron_rpg.losses import RPGClip, RPGLoss
    return RPGLoss(divergence="urkl", style="differentiable", beta=0.1, aggregation="token-mean",
                   clip=RPGClip(eps_low=0.2, eps_high=0.28, dual_clip=3.0))


def _step(family, dtype, output_layer):
    from megatron_rpg.megatron import fused_output
    from megatron_rpg.megatron.forward_backward import compute_logprobs, rl_forward_backward
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer

    gpt = build_gpt_model(fx.hf_config(family), params_dtype=dtype, pipeline_dtype=dtype)
    fx.load_full_weights(gpt, {name: tensor.to(dtype) for name, tensor in
                               fx.full_megatron_weights(gpt.vocab_size, family).items()})
    float64 = dtype == torch.float64
    # no clipping (megatron clips float32 grads only): the float32 update is measured against float64;
    # Adam's large eps keeps the first step a smooth function of the gradient
    model, optimizer = setup_model_and_optimizer([gpt], lr=1e-2, adam_eps=1e-3, clip_grad=0.0,
                                                 grad_reduce_in_fp32=not float64)
    vocab_size = fx.hf_config(family).vocab_size
    batches = fx.global_micro_batches(vocab_size, family=family)
    batches = fx.as_float64(batches) if float64 else batches
    before = {name: p.detach().clone() for name, p in gpt.named_parameters()}

    calls = []
    original = fused_output.fused_output_logprobs
    fused_output.fused_output_logprobs = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        logps, entropies = compute_logprobs(model, batches, temperature=TEMPERATURE, with_entropy=True,
                                            vocab_size=vocab_size, output_layer=output_layer)
        loss, _ = rl_forward_backward(model, batches, _loss(), temperature=TEMPERATURE,
                                      vocab_size=vocab_size, output_layer=output_layer)
    finally:
        fused_output.fused_output_logprobs = original
    grads = {name: p.main_grad.detach().clone() for name, p in gpt.named_parameters()}
    optimizer.step()
    return dict(logp=torch.cat(logps), entropy=torch.cat(entropies), loss=float(loss), grads=grads,
                update={name: p.detach() - before[name] for name, p in gpt.named_parameters()},
                fused_calls=len(calls))


def body(rank, world_size):
    from megatron_rpg.megatron.parallel import initialize_parallel
    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=7)
    return {(family, str(dtype), output_layer): _step(family, dtype, output_layer)
            for family in FAMILIES for dtype in (torch.float64, torch.float32)
            for output_layer in ("fused", "unfused")}


@pytest.fixture(scope="module")
def steps():
    return run_on_ranks(body, world_size=1)[0]


def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_unfused_run_different_code(steps, family):
    for dtype in ("torch.float64", "torch.float32"):
        # 4 micro-batches: compute_logprobs and rl_forward_backward once each
        assert steps[family, dtype, "fused"]["fused_calls"] == 8
        assert steps[family, dtype, "unfused"]["fused_calls"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_step_with_the_fused_output_layer_equals_the_unfused_step(steps, family):
    got, want = steps[family, "torch.float64", "fused"], steps[family, "torch.float64", "unfused"]
    assert float(want["logp"][:, 1:].std()) > 0.1 and float(want["entropy"].std()) > 0.01
    assert (got["logp"] - want["logp"]).abs().max() <= 1e-12
    assert (got["entropy"] - want["entropy"]).abs().max() <= 1e-12
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    assert set(got["grads"]) == set(want["grads"])
    if family == "qwen2-tied":  # one shared parameter: no separate output layer weight
        assert not any(name.startswith("output_layer") for name in want["grads"])
    else:
        assert float(want["grads"]["output_layer.weight"].norm()) > 0
    for name, grad in want["grads"].items():
        assert _relative(got["grads"][name], grad) <= 1e-10, name
        assert _relative(got["update"][name], want["update"][name]) <= 1e-10, name


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_step_with_the_fused_output_layer_equals_the_unfused_step(steps, family):
    got, want = steps[family, "torch.float32", "fused"], steps[family, "torch.float32", "unfused"]
    want64 = steps[family, "torch.float64", "unfused"]
    for key in ("logp", "entropy"):
        assert_float32_equal(got[key], want[key], float32_bound(want[key], want64[key]), key)
    assert_float32_equal(got["loss"], want["loss"], float32_bound(want["loss"], want64["loss"]), "loss")
    for name, grad in want["grads"].items():
        assert_float32_equal(got["grads"][name], grad, float32_bound(grad, want64["grads"][name]), name)
        update, update64 = want["update"][name], want64["update"][name]
        assert_float32_equal(got["update"][name], update, float32_bound(update, update64),
                             name + " update")
