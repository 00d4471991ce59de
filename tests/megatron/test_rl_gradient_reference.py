"""rl_forward_backward's gradient against an independent reference (real megatron GPTModel, CPU).

Reference: a second GPTModel with the same weights, called directly (no DDP, no pipeline schedule,
no vocab-parallel log-prob kernel): log_softmax of its logits over the unpadded vocabulary, the
token log-probs gathered with the shift by hand, `megatron_rpg.losses.rpg_loss` on the whole global
batch at once, autograd. rl_forward_backward runs the same batch as 4 micro-batches of unequal
token and sequence counts (tests/megatron/rl_step_fixtures.py), so its global normalisation has to
be exact for the gradients to agree. Property, per aggregation, in float32: ‖g − g_ref‖ within
tests/float_bounds.py's bound (4× g_ref's float32 rounding, measured against the same reference on
a float64 copy of the model); the aggregations' reference gradients differ from one another by far more, so a wrong
normaliser would fail. The baselines (built by build_policy_loss(LossConfig(name=...)) for "grpo",
"grpo_is_kl", "dapo", "ppo_clip") are held to the same standard against their own functions, and
SVRPG's snapshot pass (SnapshotLoss around RPGLoss, old log-probs moved off the model's so ρ̄ ≠ 1)
against autograd of the same loss object on the plain forward.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.float_bounds import assert_float32_equal, distance, float32_bound
from tests.megatron import rl_step_fixtures as fx

pytestmark = pytest.mark.distributed
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LOSS = dict(divergence="urkl", style="differentiable", beta=0.1)


def _reference_token_logp(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, s] log π(tokens[:, t] | tokens[:, <t]) from the logits at t − 1; 0 at t = 0 (model's dtype)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, positions, None)[..., :vocab_size]
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    logp = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def _baselines() -> dict:
    """loss name -> (its LossConfig fields, the baseline function on the whole batch)."""
    from megatron_rpg.losses import RPGClip, dapo, grpo, grpo_is_kl, ppo_clip

    clip = RPGClip(0.2, 0.2, None)
    return {
        "grpo": (dict(beta=0.1, clip=clip, aggregation="seq-mean-token-mean"), lambda logp, b: grpo(
            logp, b["old_logp"], b["ref_logp"], b["advantages"], mask=b["loss_mask"], beta=0.1, clip=clip)),
        "grpo_is_kl": (dict(beta=0.1, clip=clip, kl_level="sequence", aggregation="seq-mean-token-mean"),
                       lambda logp, b: grpo_is_kl(logp, b["old_logp"], b["ref_logp"], b["advantages"],
                                                  mask=b["loss_mask"], beta=0.1, clip=clip, kl_level="sequence")),
        "dapo": ({}, lambda logp, b: dapo(logp, b["old_logp"], b["advantages"], mask=b["loss_mask"])),
        "ppo_clip": (dict(clip=clip, aggregation="seq-mean-token-sum"), lambda logp, b: ppo_clip(
            logp, b["old_logp"], b["advantages"], mask=b["loss_mask"], clip=clip, aggregation="seq-mean-token-sum")),
    }


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[name].reshape(-1).double() for name in sorted(grads)])


def _autograd_gradient(model, batch: dict, vocab: int, loss_of) -> torch.Tensor:
    """The flat gradient of loss_of(token log-probs, batch) on a plain forward of `model`."""
    model.zero_grad()
    loss_of(_reference_token_logp(model, batch["tokens"], vocab), batch).backward()
    return _flat({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def _body(rank, world_size):
    from megatron_rpg.losses import LossConfig, LossInputs, RPGLoss, build_policy_loss, rpg_loss
    from megatron_rpg.losses.svrpg import SnapshotLoss
    from megatron_rpg.megatron.forward_backward import rl_forward_backward
    from megatron_rpg.optim.svrpg_passes import SVRPGPass
    from megatron_rpg.megatron.models import build_gpt_model
    from megatron_rpg.megatron.optimizer_setup import setup_model_and_optimizer
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(seed=7)
    try:
        config = fx.hf_config()
        vocab = config.vocab_size
        trained, reference = build_gpt_model(config), build_gpt_model(config)
        # the reference's float64 twin measures the float32 reference's rounding
        reference64 = build_gpt_model(config, params_dtype=torch.float64, pipeline_dtype=torch.float64)
        for model in (trained, reference, reference64):
            full = fx.full_megatron_weights(model.vocab_size)
            fx.load_full_weights(model, {n: t.to(next(model.parameters()).dtype) for n, t in full.items()})
        ddp, _ = setup_model_and_optimizer([trained], lr=1e-3)
        micro_batches = fx.global_micro_batches(vocab)
        whole = fx.concatenate(micro_batches)

        def compared(loss, loss_of, batches=micro_batches, batch=whole):
            rl_forward_backward(ddp, batches, loss, vocab_size=vocab)
            got = {n: p.main_grad.detach().clone() for n, p in ddp[0].module.named_parameters()}
            assert set(got) == {n for n, _ in reference.named_parameters()}
            return {"got": _flat(got), "want": _autograd_gradient(reference, batch, vocab, loss_of),
                    "want64": _autograd_gradient(reference64, fx.as_float64([batch])[0], vocab, loss_of)}

        out = {}
        for aggregation in AGGREGATIONS:
            loss_config = dict(LOSS, aggregation=aggregation)
            out[aggregation] = compared(RPGLoss(**loss_config), lambda logp, b: rpg_loss(
                logp, b["old_logp"], b["advantages"], ref_logp=b["ref_logp"], mask=b["loss_mask"],
                **loss_config)[0])
        for name, (config, reference_loss) in _baselines().items():  # the same through loss=<name>
            out[name] = compared(build_policy_loss(LossConfig(name=name, **config)),
                                 lambda logp, b: reference_loss(logp, b)[0])
        # SVRPG's snapshot pass: the batch "was drawn" by a policy whose log-probs are old_logp − 0.1·t
        inner = RPGLoss(**LOSS, is_level="sequence", aggregation="seq-mean-token-sum")
        shifted = [dict(mb, old_logp=mb["old_logp"] - 0.1 * torch.arange(mb["tokens"].shape[1]))
                   for mb in micro_batches]
        rho_means = []

        def snapshot_loss(logp, b):
            snapshot_pass = SVRPGPass("snapshot")
            loss_sum, count, _ = SnapshotLoss(inner, snapshot_pass)(LossInputs(
                logp, b["old_logp"], b["advantages"], b["loss_mask"], ref_logp=b["ref_logp"]))
            rho_means.append(snapshot_pass.ratio_stats[0][1]["rho_mean"])
            return loss_sum / count

        out["snapshot"] = compared(SnapshotLoss(inner, SVRPGPass("snapshot")), snapshot_loss,
                                   batches=shifted, batch=fx.concatenate(shifted))
        out["snapshot"]["rho_mean"] = rho_means[0]
        return out
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def run():
    return run_on_ranks(_body, world_size=1)[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_equal_gradient(result, name):
    assert result["want"].norm() > 0
    bound = float32_bound(result["want"], result["want64"])
    print(f"{name}: ‖g − g_ref‖ {distance(result['got'], result['want']):.3g}, bound {bound:.3g}, "
          f"‖g_ref‖ {float(result['want64'].norm()):.3g}")
    assert_float32_equal(result["got"], result["want"], bound, f"{name} gradient")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_rl_forward_backward_gradient_equals_autograd_of_rpg_loss_on_a_plain_forward(run, aggregation):
    _assert_equal_gradient(run[aggregation], aggregation)


def test_the_aggregations_give_gradients_far_apart_so_the_comparison_tells_them_apart(run):
    for a in AGGREGATIONS:
        for b in AGGREGATIONS:
            if a != b:
                assert _relative(run[a]["want"], run[b]["want"]) > 1e-2, (a, b)


@pytest.mark.parametrize("name", ["grpo", "grpo_is_kl", "dapo", "ppo_clip"])
def test_baseline_losses_through_rl_forward_backward_equal_autograd_of_the_baseline(run, name):
    _assert_equal_gradient(run[name], name)


def test_svrpg_snapshot_loss_through_rl_forward_backward_equals_autograd_of_the_loss_object(run):
    result = run["snapshot"]
    assert result["rho_mean"] > 1.5  # ρ̄ far from 1: the weighting is in the comparison
    _assert_equal_gradient(result, "snapshot")
