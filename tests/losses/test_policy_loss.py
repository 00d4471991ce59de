"""policy_loss_sum: each name is its function in the (loss_sum, count) form — loss_sum / count equals
the function's aggregated loss, and the gradients agree — and wrong arguments are named."""
from __future__ import annotations

import pytest
import torch

from megatron_rpg.losses import RPGClip, dapo, grpo, grpo_is_kl, ppo_clip, reinforce_pp, rpg_loss
from megatron_rpg.losses.policy_loss import POLICY_LOSSES, policy_loss_sum

B, S = 4, 6


def _inputs(token_advantages=False):
    g = torch.Generator().manual_seed(0)
    logp = (-1.5 + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(B, S, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(B, S, generator=g, dtype=torch.float64)
    adv = torch.randn((B, S) if token_advantages else (B,), generator=g, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :2] = False
    return logp, old, ref, adv, mask


CLIP = RPGClip(0.2, 0.25, 3.0)
CASES = {
    "rpg": (dict(divergence="rkl", style="reinforce", beta=0.1, clip=CLIP),
            lambda l, o, r, a, m: rpg_loss(l, o, a, ref_logp=r, mask=m, divergence="rkl", style="reinforce",
                                           beta=0.1, clip=CLIP)[0]),
    "grpo": (dict(beta=0.1, clip=CLIP), lambda l, o, r, a, m: grpo(l, o, r, a, mask=m, beta=0.1, clip=CLIP)[0]),
    "grpo_is_kl": (dict(beta=0.1, clip=CLIP, kl_level="sequence"),
                   lambda l, o, r, a, m: grpo_is_kl(l, o, r, a, mask=m, beta=0.1, clip=CLIP, kl_level="sequence")[0]),
    "dapo": ({}, lambda l, o, r, a, m: dapo(l, o, a, mask=m)[0]),
    "ppo_clip": (dict(clip=CLIP, aggregation="seq-mean-token-mean"),
                 lambda l, o, r, a, m: ppo_clip(l, o, a, mask=m, clip=CLIP, aggregation="seq-mean-token-mean")[0]),
    "reinforce_pp": ({}, lambda l, o, r, a, m: reinforce_pp(l, o, a, mask=m)[0]),
}


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_loss_sum_over_count_is_the_functions_loss_with_the_same_gradient(name):
    kwargs, function = CASES[name]
    logp, old, ref, adv, mask = _inputs(token_advantages=name == "reinforce_pp")
    loss_sum, count, _ = policy_loss_sum(logp, old, adv, loss=name, ref_logp=ref, mask=mask, **kwargs)
    (ours,) = torch.autograd.grad(loss_sum / count, logp)
    expected_loss = function(logp, old, ref, adv, mask)
    (expected,) = torch.autograd.grad(expected_loss, logp)
    assert float(loss_sum / count) == pytest.approx(float(expected_loss), rel=1e-12)
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-15) and float(expected.abs().sum()) > 0


@pytest.mark.parametrize("name, kwargs, named", [
    ("grpo", dict(divergence="rkl"), "does not take ['divergence']"),
    ("dapo", dict(aggregation="seq-mean-token-sum"), "token-mean"),
    ("nope", {}, "accepted values"),
])
def test_wrong_arguments_are_named(name, kwargs, named):
    logp, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        policy_loss_sum(logp, old, adv, loss=name, ref_logp=ref, mask=mask, **kwargs)


def test_reinforce_pp_needs_per_token_advantages():
    logp, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"per-token advantages \[batch, seq\]"):
        policy_loss_sum(logp, old, adv, loss="reinforce_pp", mask=mask)
