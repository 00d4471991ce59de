"""Baseline losses: the GRPO KL mismatch and its correction by enumeration (float64), and the clip
regions of PPO-clip / DAPO token by token, against direct formulas."""
import pytest
import torch

from megatron_rpg.losses.baselines import (DAPO_CLIP, PPO_CLIP, dapo, grpo, grpo_is_kl,
                                           grpo_per_token_loss, ppo_clip, ppo_clip_per_token_loss,
                                           reinforce_pp)
from megatron_rpg.losses.advantages import reinforce_pp_advantages
from megatron_rpg.losses.clip import RPGClip
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error

BETA = 0.7
TOL = 1e-9
NEVER_BINDS = RPGClip(eps_low=0.999, eps_high=1e6, dual_clip=None)


def policies(vocab, length, on_policy):
    """(θ, π_old, π_ref): θ = θ_old on-policy, else a perturbation of it; π_ref another perturbation."""
    old = TabularPolicy(vocab, length, seed=11, scale=0.8)
    theta = old if on_policy else old.perturbed(0.5, seed=12)
    ref = old.perturbed(0.9, seed=13)
    return theta, old, ref


def expected_kl_term_gradient(loss_fn, theta, old, ref, kl_level):
    """Σ_x π_old(x)·∇L_KL(x), each x a batch of one response, advantage 0 (no policy-term gradient),
    seq-mean-token-sum: L_KL(x) is the response's whole KL term, β·Σ_t k3_t or the sequence one."""
    logp, old_logp, ref_logp = theta.token_logp(), old.token_logp().detach(), ref.token_logp().detach()
    old_prob = old.sequence_logp().detach().exp()
    total = 0.0
    for i in range(len(old_prob)):
        loss, _ = loss_fn(logp[i:i + 1], old_logp[i:i + 1], ref_logp[i:i + 1], torch.zeros(1, dtype=logp.dtype),
                          beta=BETA, kl_level=kl_level, aggregation="seq-mean-token-sum")
        total = total + old_prob[i] * loss
    return flat_grad(total, theta.params)


def sequence_kl(p, q):
    """KL(p‖q) of the enumerated sequence distributions (policies), differentiable in both."""
    log_p, log_q = p.sequence_logp(), q.sequence_logp()
    return (log_p.exp() * (log_p - log_q)).sum()


def per_position_kl(theta, old, ref, forward):
    """Σ_t E_{x_<t ∼ π_old}[KL(·|x_<t)] with the prefix distribution held at π_old (no gradient there):
    forward=True: KL(π_ref‖π_θ), else KL(π_θ‖π_ref), computed from the whole conditionals."""
    log_theta, log_ref = theta.next_token_logp(), ref.next_token_logp().detach()  # [N, T, V]
    p, log_p, log_q = ((log_ref.exp(), log_ref, log_theta) if forward else (log_theta.exp(), log_theta, log_ref))
    kl_per_position = (p * (log_p - log_q)).sum(dim=-1)  # [N, T], depends on x_<t only
    old_prob = old.sequence_logp().detach().exp()
    return (old_prob[:, None] * kl_per_position).sum()


@pytest.mark.parametrize("vocab, length, kl_level", [(5, 1, "token"), (3, 3, "sequence")])
def test_grpo_kl_targets_the_forward_kl_on_policy_not_the_reverse_one(vocab, length, kl_level):
    theta, old, ref = policies(vocab, length, on_policy=True)
    got = expected_kl_term_gradient(grpo, theta, old, ref, kl_level)
    forward = BETA * flat_grad(sequence_kl(ref, theta), theta.params)
    reverse = BETA * flat_grad(sequence_kl(theta, ref), theta.params)
    assert relative_error(got, forward) <= TOL
    assert relative_error(got, reverse) >= 0.1


@pytest.mark.parametrize("vocab, length, kl_level", [(5, 1, "token"), (3, 3, "sequence")])
def test_grpo_forward_kl_claim_holds_only_at_the_on_policy_point(vocab, length, kl_level):
    theta, old, ref = policies(vocab, length, on_policy=False)
    got = expected_kl_term_gradient(grpo, theta, old, ref, kl_level)
    forward = BETA * flat_grad(sequence_kl(ref, theta), theta.params)
    assert relative_error(got, forward) >= 0.05


@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("vocab, length, kl_level", [(5, 1, "token"), (3, 3, "sequence")])
def test_importance_weighted_kl_gives_the_reverse_kl_gradient_exactly_at_any_theta(vocab, length, kl_level,
                                                                                  on_policy):
    theta, old, ref = policies(vocab, length, on_policy=on_policy)
    got = expected_kl_term_gradient(grpo_is_kl, theta, old, ref, kl_level)
    reverse = BETA * flat_grad(sequence_kl(theta, ref), theta.params)
    assert relative_error(got, reverse) <= TOL


def test_token_level_grpo_kl_is_the_per_position_forward_kl_with_prefixes_from_the_policy_on_policy():
    theta, old, ref = policies(3, 3, on_policy=True)
    got = expected_kl_term_gradient(grpo, theta, old, ref, "token")
    per_position = BETA * flat_grad(per_position_kl(theta, old, ref, forward=True), theta.params)
    assert relative_error(got, per_position) <= TOL
    # …which for ≥ 2 tokens is neither sequence KL gradient
    assert relative_error(got, BETA * flat_grad(sequence_kl(ref, theta), theta.params)) >= 0.05
    assert relative_error(got, BETA * flat_grad(sequence_kl(theta, ref), theta.params)) >= 0.05


@pytest.mark.parametrize("on_policy", [True, False])
def test_token_level_weighted_kl_is_exact_per_position_at_any_theta_but_not_the_sequence_kl(on_policy):
    theta, old, ref = policies(3, 3, on_policy=on_policy)
    got = expected_kl_term_gradient(grpo_is_kl, theta, old, ref, "token")
    per_position = BETA * flat_grad(per_position_kl(theta, old, ref, forward=False), theta.params)
    assert relative_error(got, per_position) <= TOL
    # a per-token term misses the effect of x_t on the later tokens' KL, even on-policy
    assert relative_error(got, BETA * flat_grad(sequence_kl(theta, ref), theta.params)) >= 0.05


def test_corrected_grpo_with_sequence_kl_is_on_policy_exact_for_reward_minus_reverse_kl():
    theta, old, ref = policies(3, 3, on_policy=True)
    reward = torch.linspace(-1.0, 2.0, len(theta.sequences), dtype=torch.float64)
    logp, old_logp, ref_logp = theta.token_logp(), old.token_logp().detach(), ref.token_logp().detach()
    old_prob = old.sequence_logp().detach().exp()
    expectation = {}
    for name, loss_fn in (("grpo", grpo), ("grpo_is_kl", grpo_is_kl)):
        total = 0.0
        for i in range(len(reward)):
            loss, _ = loss_fn(logp[i:i + 1], old_logp[i:i + 1], ref_logp[i:i + 1], reward[i:i + 1], beta=BETA,
                              clip=NEVER_BINDS, kl_level="sequence", aggregation="seq-mean-token-sum")
            total = total + old_prob[i] * loss
        expectation[name] = flat_grad(total, theta.params)
    objective = (theta.sequence_logp().exp() * reward).sum() - BETA * sequence_kl(theta, ref)
    minus_true_gradient = -flat_grad(objective, theta.params)
    assert relative_error(expectation["grpo_is_kl"], minus_true_gradient) <= TOL
    assert relative_error(expectation["grpo"], minus_true_gradient) >= 0.05


def direct_clipped_loss(adv, ratio, eps_low, eps_high, dual_clip):
    """(loss, gradient flows) of the PPO(-dual)-clip surrogate, region by region."""
    if adv >= 0:
        if ratio > 1 + eps_high:
            return -adv * (1 + eps_high), False
        return -adv * ratio, True
    if ratio < 1 - eps_low:
        return -adv * (1 - eps_low), False
    if dual_clip is not None and ratio > dual_clip:
        return -dual_clip * adv, False
    return -adv * ratio, True


RATIOS = [0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 4.0]  # below low, inside, between ε_high's, above, above c


@pytest.mark.parametrize("clip", [PPO_CLIP, DAPO_CLIP, RPGClip(0.2, 0.2, 3.0)], ids=["ppo", "dapo", "dual"])
def test_clipped_surrogate_values_and_gradient_masks_in_every_region_for_both_advantage_signs(clip):
    ratios = torch.tensor(RATIOS, dtype=torch.float64)
    old_logp = -torch.linspace(0.5, 2.0, len(RATIOS), dtype=torch.float64).repeat(2, 1)
    logp = (old_logp + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([[1.5] * len(RATIOS), [-0.7] * len(RATIOS)], dtype=torch.float64)
    per_token, metrics = ppo_clip_per_token_loss(logp, old_logp, advantages, clip=clip)
    grad, = torch.autograd.grad(per_token.sum(), logp)
    flows_count = {"low": 0, "high": 0, "dual": 0}
    for b in range(2):
        for t, ratio in enumerate(RATIOS):
            adv = float(advantages[b, t])
            value, flows = direct_clipped_loss(adv, ratio, clip.eps_low, clip.eps_high, clip.dual_clip)
            assert float(per_token[b, t].detach()) == pytest.approx(value, rel=1e-13)
            # d(−A·w)/dℓ = −A·w where the gradient flows, exactly 0 where a bound binds
            assert float(grad[b, t]) == (pytest.approx(-adv * ratio, rel=1e-13) if flows else 0.0)
            flows_count["low"] += adv < 0 and ratio < 1 - clip.eps_low
            flows_count["high"] += adv >= 0 and ratio > 1 + clip.eps_high
            flows_count["dual"] += adv < 0 and clip.dual_clip is not None and ratio > clip.dual_clip
    for name, count in flows_count.items():
        assert float(metrics[f"clip_frac_{name}"]) == pytest.approx(count / (2 * len(RATIOS)))


def test_dapo_clips_higher_than_ppo_for_positive_advantages_and_the_same_below():
    old_logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    logp = (old_logp + torch.tensor([[1.25, 0.75]], dtype=torch.float64).log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    dapo_grad, = torch.autograd.grad(dapo(logp, old_logp, advantages)[0], logp)
    ppo_grad, = torch.autograd.grad(ppo_clip(logp, old_logp, advantages)[0], logp)
    assert float(dapo_grad[0, 0]) != 0.0 and float(ppo_grad[0, 0]) == 0.0  # 1.2 < w = 1.25 < 1.28
    assert float(dapo_grad[0, 1]) == 0.0 and float(ppo_grad[0, 1]) == 0.0  # w = 0.75 < 0.8: both clip


def test_dapo_is_a_global_token_mean_with_no_kl_term():
    gen = torch.Generator().manual_seed(7)
    old_logp = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    logp = (old_logp + 0.1 * torch.randn(4, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    loss, metrics = dapo(logp, old_logp, advantages, mask=mask)
    per_token, _ = ppo_clip_per_token_loss(logp, old_logp, advantages, mask=mask, clip=DAPO_CLIP)
    loss, per_token = loss.detach(), per_token.detach()
    assert float(loss) == pytest.approx(float(per_token.sum() / mask.sum()), rel=1e-14)
    seq_mean = ppo_clip(logp, old_logp, advantages, mask=mask, clip=DAPO_CLIP,
                        aggregation="seq-mean-token-mean")[0].detach()
    assert abs(float(seq_mean) - float(loss)) > 1e-3  # unequal lengths: token-mean is a different mean
    # split into two micro-batches with the global token count: the sum is the whole-batch loss
    total = int(mask.sum())
    halves = [dapo(logp[s], old_logp[s], advantages[s], mask=mask[s], num_global_tokens=total)[0]
              for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(halves).detach()) == pytest.approx(float(loss), rel=1e-14)
    # no KL: with zero advantages nothing pulls θ anywhere; GRPO's KL term does
    zero = torch.zeros(4, dtype=torch.float64)
    dapo_grad, = torch.autograd.grad(dapo(logp, old_logp, zero, mask=mask)[0], logp)
    grpo_grad, = torch.autograd.grad(grpo(logp, old_logp, old_logp - 0.3, zero, mask=mask)[0], logp)
    assert torch.equal(dapo_grad, torch.zeros_like(dapo_grad)) and bool((grpo_grad != 0).any())
    assert "kl_k3" not in metrics


def test_grpo_without_a_reference_uses_the_old_policy_as_reference():
    gen = torch.Generator().manual_seed(9)
    old_logp = -torch.rand(2, 3, generator=gen, dtype=torch.float64)
    logp = (old_logp + 0.3 * torch.randn(2, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for loss_fn in (grpo, grpo_is_kl):
        assert torch.equal(loss_fn(logp, old_logp, None, advantages)[0],
                           loss_fn(logp, old_logp, old_logp, advantages)[0])


def test_reinforce_pp_loss_is_ppo_clip_on_kl_shaped_token_advantages():
    gen = torch.Generator().manual_seed(8)
    old_logp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    ref_logp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    logp = (old_logp + 0.2 * torch.randn(3, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    advantages = reinforce_pp_advantages(torch.tensor([1.0, -1.0, 1.0]), old_logp, ref_logp, mask, beta=0.1)
    loss, _ = reinforce_pp(logp, old_logp, advantages, mask=mask)
    assert torch.equal(loss, ppo_clip(logp, old_logp, advantages, mask=mask)[0])
    with pytest.raises(ValueError, match="token_advantages"):
        reinforce_pp(logp, old_logp, advantages[:, 0], mask=mask)


@pytest.mark.parametrize("call, argument", [
    (lambda x: grpo(x, x, x, x[:, 0], kl_level="prefix"), "kl_level"),
    (lambda x: grpo(x, x, x, x[:, 0], beta=-1.0), "beta"),
    (lambda x: grpo_is_kl(x, x, x[:, :2], x[:, 0]), "ref_logp"),
    (lambda x: ppo_clip(x, x, x[:, 0], clip=0.2), "clip"),
    (lambda x: ppo_clip(x, x, x[0], aggregation="token-mean"), "advantages"),
    (lambda x: ppo_clip(x, x, x[:, 0], aggregation="sum"), "aggregation"),
    (lambda x: dapo(x, x.clone().fill_(float("nan")), x[:, 0]), "old_logp"),
    (lambda x: dapo(x, x[:1], x[:, 0]), "old_logp"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call(torch.zeros(2, 3, dtype=torch.float64))
