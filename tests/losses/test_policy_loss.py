"""The loss objects: each one's loss_sum / count is its function's aggregated loss, bit for bit, with
the same gradient (float64); LossConfig builds them with each loss's own default clip; LOSS_FIELDS
lists exactly the fields a loss reads; wrong arguments are named."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_rpg.losses import (R2VPOConfig, RPGClip, aggregate, dapo, grpo, grpo_is_kl, ppo_clip,
                                 r2vpo_per_token_loss, reinforce_pp, rpg_loss)
from megatron_rpg.losses.baselines import DAPO_CLIP, PPO_CLIP
from megatron_rpg.losses.policy_loss import (LOSS_FIELDS, POLICY_LOSSES, RPG_DEFAULT_CLIP, DAPOLoss, GRPOLoss,
                                             LossConfig, LossInputs, PolicyLoss, PPOClipLoss, R2VPOLoss,
                                             ReinforcePPLoss, RPGLoss, build_policy_loss)

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
R2VPO = R2VPOConfig(level="sequence", delta=0.05, lambda_init=0.7)
CASES = {  # name -> (the object, LossConfig fields building the same object, the function)
    "rpg": (RPGLoss(divergence="rkl", style="reinforce", beta=0.1, clip=CLIP, aggregation="seq-mean-token-sum"),
            dict(divergence="rkl", style="reinforce", beta=0.1, clip=CLIP, aggregation="seq-mean-token-sum"),
            lambda l, o, r, a, m: rpg_loss(l, o, a, ref_logp=r, mask=m, divergence="rkl", style="reinforce",
                                           beta=0.1, clip=CLIP, aggregation="seq-mean-token-sum")[0]),
    "grpo": (GRPOLoss(beta=0.1, clip=CLIP), dict(beta=0.1, clip=CLIP, aggregation="seq-mean-token-mean"),
             lambda l, o, r, a, m: grpo(l, o, r, a, mask=m, beta=0.1, clip=CLIP)[0]),
    "grpo_is_kl": (GRPOLoss(beta=0.1, clip=CLIP, kl_level="sequence", importance_weighted_kl=True),
                   dict(beta=0.1, clip=CLIP, kl_level="sequence", aggregation="seq-mean-token-mean"),
                   lambda l, o, r, a, m: grpo_is_kl(l, o, r, a, mask=m, beta=0.1, clip=CLIP,
                                                    kl_level="sequence")[0]),
    "dapo": (DAPOLoss(), {}, lambda l, o, r, a, m: dapo(l, o, a, mask=m)[0]),
    "ppo_clip": (PPOClipLoss(clip=CLIP, aggregation="seq-mean-token-mean"),
                 dict(clip=CLIP, aggregation="seq-mean-token-mean"),
                 lambda l, o, r, a, m: ppo_clip(l, o, a, mask=m, clip=CLIP, aggregation="seq-mean-token-mean")[0]),
    "reinforce_pp": (ReinforcePPLoss(), {}, lambda l, o, r, a, m: reinforce_pp(l, o, a, mask=m)[0]),
    "r2vpo": (R2VPOLoss(config=R2VPO, aggregation="seq-mean-token-sum"), dict(r2vpo=R2VPO, aggregation="seq-mean-token-sum"),
              lambda l, o, r, a, m: aggregate(r2vpo_per_token_loss(l, o, a, multiplier=0.7, config=R2VPO, mask=m)[0],
                                              m, "seq-mean-token-sum")),
}


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_each_object_is_its_function_bit_for_bit_with_the_same_gradient(name):
    loss, config_fields, function = CASES[name]
    assert build_policy_loss(LossConfig(name=name, **config_fields)) == loss and loss.name == name
    logp, old, ref, adv, mask = _inputs(token_advantages=name == "reinforce_pp")
    loss_sum, count, metrics = loss(LossInputs(logp, old, adv, mask, ref_logp=ref))
    ours = loss_sum / count
    (ours_grad,) = torch.autograd.grad(ours, logp)
    expected = function(logp, old, ref, adv, mask)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert torch.equal(ours, expected) and torch.equal(ours_grad, expected_grad)
    assert float(expected_grad.abs().sum()) > 0 and metrics


def test_metric_units_follow_the_importance_sampling_unit():
    assert RPGLoss(is_level="sequence").metric_units == "sequence"
    assert RPGLoss().metric_units == "token" and GRPOLoss().metric_units == "token"


def test_a_clip_of_none_in_the_config_is_the_losses_own_default_and_no_clip_is_rpg_only():
    assert build_policy_loss(LossConfig()).clip == RPG_DEFAULT_CLIP
    assert build_policy_loss(LossConfig(no_clip=True)).clip is None
    for name, default in (("grpo", PPO_CLIP), ("grpo_is_kl", PPO_CLIP), ("ppo_clip", PPO_CLIP),
                          ("reinforce_pp", PPO_CLIP), ("dapo", DAPO_CLIP)):
        assert build_policy_loss(LossConfig(name=name)).clip == default
        assert build_policy_loss(LossConfig(name=name, clip=CLIP)).clip == CLIP
        with pytest.raises(ValueError, match=r"does not read \['no_clip'\]"):
            build_policy_loss(LossConfig(name=name, no_clip=True))
    with pytest.raises(ValueError, match="no_clip=True with clip="):
        build_policy_loss(LossConfig(no_clip=True, clip=CLIP))


NON_DEFAULT = dict(divergence="fkl", style="reinforce", beta=0.5, aggregation="seq-mean-token-sum",
                   is_level="sequence", clip=CLIP, no_clip=True, kl_in_advantage=False, kl_clamp=5.0,
                   kl_level="sequence", r2vpo=R2VPOConfig(delta=0.2))


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_loss_fields_are_exactly_the_fields_that_change_the_built_loss(name):
    """A field in LOSS_FIELDS[name] changes the object (or is refused for its value, dapo's
    aggregation); any other field set away from its default is refused, naming it."""
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(LossConfig)} - {"name"}
    default = build_policy_loss(LossConfig(name=name))
    for field, value in NON_DEFAULT.items():
        config = LossConfig(name=name, **{field: value})
        if field not in LOSS_FIELDS[name]:
            with pytest.raises(ValueError, match=rf"does not read \['{field}'\]"):
                build_policy_loss(config)
        elif name == "dapo" and field == "aggregation":
            with pytest.raises(ValueError, match="token-mean"):
                build_policy_loss(config)
        else:
            assert build_policy_loss(config) != default, field


@pytest.mark.parametrize("make, named", [
    (lambda: build_policy_loss(LossConfig(name="nope")), "accepted values"),
    (lambda: build_policy_loss({"loss": "rpg"}), "takes a LossConfig"),
    (lambda: RPGLoss(divergence="kl"), "divergence='kl'"),
    (lambda: RPGLoss(aggregation="mean"), "aggregation='mean'"),
    (lambda: RPGLoss(beta=-1.0), "beta=-1.0"),
    (lambda: RPGLoss(clip=(0.2, 0.2)), "must be an RPGClip"),
    (lambda: GRPOLoss(clip=None), "grpo: clip=None must be an RPGClip"),
    (lambda: PPOClipLoss(aggregation="sum"), "aggregation='sum'"),
])
def test_bad_values_are_named_when_the_loss_is_built(make, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_reinforce_pp_needs_per_token_advantages():
    logp, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"per-token advantages \[batch, seq\]"):
        ReinforcePPLoss()(LossInputs(logp, old, adv, mask))


def test_the_stateless_losses_keep_no_state_and_refuse_someone_elses():
    loss = RPGLoss()
    assert loss.after_step({"loss": 1.0}) == {} and loss.state_dict() == {}
    loss.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        loss.load_state_dict({"multiplier": 1.0})
    with pytest.raises(NotImplementedError, match="per_token_loss"):
        PolicyLoss()(LossInputs(*_inputs()[:2], torch.zeros(B)))
