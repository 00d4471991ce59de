"""Exact-gradient proofs of the RPG losses by enumeration, float64 (docs/algorithms.md: 1. RPG surrogates;
How a loss is proved).

Truth: J(θ) = E_{π_θ}[R] − β·D(π_θ, π_ref) computed in closed form from the enumerated distribution
of a TabularPolicy (vocab 3, length 3: 27 sequences) and differentiated by autograd. Surrogate:
Σ_x π_old(x)·∇L(x), the exact expectation of the loss gradient under the behaviour policy.
"""
import pytest
import torch

from megatron_rpg.losses import rpg_loss, rpg_per_token_loss
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error

DIVERGENCES = ("fkl", "ufkl", "rkl", "urkl")
STYLES = ("differentiable", "reinforce")
BETA = 0.7  # large, so the KL part of the gradient is of the same order as the reward part
TOLERANCE = 1e-9


def divergence(name: str, log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """D(p, q) over `dim` from log-probabilities, per the docs/algorithms.md table (1. RPG surrogates) (q = π_ref)."""
    p, q = log_p.exp(), log_q.exp()
    if name == "fkl":
        return (q * (log_q - log_p)).sum(dim)
    if name == "ufkl":
        return (q * (log_q - log_p)).sum(dim) + (p - q).sum(dim)
    if name == "rkl":
        return (p * (log_p - log_q)).sum(dim)
    return (p * (log_p - log_q)).sum(dim) + (q - p).sum(dim)


@pytest.fixture(scope="module")
def setting():
    old = TabularPolicy(3, 3, seed=0)
    theta = old.perturbed(0.6, seed=1)
    separate_ref = old.perturbed(0.6, seed=2)
    reward = torch.randn(27, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return old, theta, separate_ref, reward


def sequence_objective(theta, ref_seq_logp, reward, name):
    log_p = theta.sequence_logp()
    return (log_p.exp() * reward).sum() - BETA * divergence(name, log_p, ref_seq_logp, dim=0)


def token_objective(theta, old, ref, reward, name):
    """J_tok(θ) = E_{π_θ}[R] − β·Σ_t E_{x_<t∼π_old}[D(π_θ(·|x_<t), π_ref(·|x_<t))]."""
    prefix_weight = old.sequence_logp().detach().exp()  # Σ_x π_old(x)·f(x_<t) = E_{x_<t∼π_old}[f]
    per_position = divergence(name, theta.next_token_logp(), ref.next_token_logp().detach())  # [N, T]
    kl = (prefix_weight[:, None] * per_position).sum()
    return (theta.sequence_logp().exp() * reward).sum() - BETA * kl


@pytest.mark.parametrize("reference", ["old", "separate"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_sequence_level_loss_of_one_sequence_has_exact_expected_gradient_at_any_theta(setting, name, style,
                                                                                      reference):
    old, theta, separate_ref, reward = setting
    ref = old if reference == "old" else separate_ref
    logp, old_logp = theta.token_logp(), old.token_logp().detach()
    ref_logp = None if reference == "old" else ref.token_logp().detach()
    old_prob = old.sequence_logp().detach().exp()
    expected_surrogate = 0.0
    for i in range(27):  # the contract: a batch of ONE sequence gives L(x) of the table
        loss, _ = rpg_loss(logp[i:i + 1], old_logp[i:i + 1], reward[i:i + 1], divergence=name, style=style,
                           beta=BETA, ref_logp=None if ref_logp is None else ref_logp[i:i + 1],
                           is_level="sequence", aggregation="seq-mean-token-sum")
        expected_surrogate = expected_surrogate + old_prob[i] * loss
    surrogate_grad = flat_grad(expected_surrogate, theta.params)
    true_grad = flat_grad(sequence_objective(theta, ref.sequence_logp().detach(), reward, name), theta.params)
    assert relative_error(surrogate_grad, -true_grad) <= TOLERANCE


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_one_sequence_loss_value_is_the_table_formula(setting, name, style):
    old, theta, _, reward = setting
    logp, old_logp = theta.token_logp(), old.token_logp().detach()
    i = 5
    loss, _ = rpg_loss(logp[i:i + 1], old_logp[i:i + 1], reward[i:i + 1], divergence=name, style=style,
                       beta=BETA, is_level="sequence", aggregation="seq-mean-token-sum")
    ell = logp[i].sum().detach()
    w, r = (ell - old_logp[i].sum()).exp(), reward[i]
    # docs/algorithms.md, 1. RPG surrogates: (fully differentiable L, REINFORCE weight ψ with L = −ψ·ℓ)
    table = {
        "fkl": (-w * r - BETA * ell, w * r + BETA),
        "ufkl": (-w * r + BETA * (w - w.log() - 1), w * r - BETA * (w - 1)),
        "rkl": (w * (-r + BETA * w.log()), w * (r - BETA * (w.log() + 1))),
        "urkl": (-w * r + BETA * (w * w.log() - w), w * (r - BETA * w.log())),
    }[name]
    expected = table[0] if style == "differentiable" else -table[1] * ell
    assert abs(float(loss.detach() - expected)) <= 1e-12 * max(1.0, abs(float(expected)))


@pytest.mark.parametrize("reference", ["old", "separate"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_token_level_loss_has_exact_expected_gradient_at_theta_old(setting, name, style, reference):
    old, _, separate_ref, reward = setting
    ref = old if reference == "old" else separate_ref
    logp = old.token_logp()  # θ = θ_old: the gradient is taken at the behaviour policy itself
    per_token, _ = rpg_per_token_loss(logp, logp.detach(), reward, divergence=name, style=style, beta=BETA,
                                      ref_logp=None if reference == "old" else ref.token_logp().detach())
    old_prob = logp.detach().sum(dim=1).exp()
    surrogate_grad = flat_grad((old_prob * per_token.sum(dim=1)).sum(), old.params)
    true_grad = flat_grad(token_objective(old, old, ref, reward, name), old.params)
    assert relative_error(surrogate_grad, -true_grad) <= TOLERANCE


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_token_level_kl_part_is_exact_at_any_theta_but_the_reward_part_is_not(setting, name, style):
    old, theta, separate_ref, reward = setting
    logp, old_logp, ref_logp = theta.token_logp(), old.token_logp().detach(), separate_ref.token_logp().detach()
    old_prob = old_logp.sum(dim=1).exp()

    def errors(r):
        per_token, _ = rpg_per_token_loss(logp, old_logp, r, divergence=name, style=style, beta=BETA,
                                          ref_logp=ref_logp)
        surrogate_grad = flat_grad((old_prob * per_token.sum(dim=1)).sum(), theta.params)
        true_grad = flat_grad(token_objective(theta, old, separate_ref, r, name), theta.params)
        return relative_error(surrogate_grad, -true_grad)

    assert errors(torch.zeros_like(reward)) <= TOLERANCE
    # away from θ_old per-token weights are biased for the reward term: the check can fail
    assert errors(reward) > 1e-3


@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_on_policy_kl_gradient_vanishes_per_sample_for_ufkl_urkl_and_only_in_expectation_for_rkl_fkl(
        setting, name, style, is_level):
    """π_ref = π_old, θ = θ_old (w ≡ 1), R = 0. Per sample ∇L = β·K·∇ℓ with K = −1 (fkl), 0 (ufkl),
    +1 (rkl: the +1 of the normalised reverse KL's score), 0 (urkl). So ufkl/urkl vanish per sample;
    rkl (+β·∇ℓ) and fkl (−β·∇ℓ, an NLL term on the model's own samples) are nonzero per sample and
    vanish only in expectation (E_{π_old}[∇ℓ] = 0), as rpg.py's docstring states.
    (The RPG paper lists rkl among the vanishing ones; its own table gives K = w·(log w + 1) = 1.)"""
    old, _, _, _ = setting
    logp = old.token_logp()
    zero_advantage = torch.zeros(27, dtype=torch.float64)
    per_sample_weight = {"fkl": -BETA, "ufkl": 0.0, "rkl": BETA, "urkl": 0.0}[name]
    old_prob = logp.detach().sum(dim=1).exp()
    expected_grad = 0.0
    for i in range(27):  # per sample: each sequence alone
        loss, _ = rpg_loss(logp[i:i + 1], logp[i:i + 1].detach(), zero_advantage[i:i + 1], divergence=name,
                           style=style, beta=BETA, is_level=is_level, aggregation="seq-mean-token-sum")
        grad = flat_grad(loss, old.params)
        score = flat_grad(logp[i].sum(), old.params)  # ∇ℓ(x) = Σ_t ∇ℓ_t at w ≡ 1 for both levels
        if per_sample_weight == 0.0:  # ufkl, urkl: exactly zero for every single sample
            assert float(grad.norm()) == 0.0
        else:  # rkl, fkl: NOT zero per sample, but exactly ±β·∇ℓ(x)
            assert float(grad.norm()) > 1e-3
            assert relative_error(grad, per_sample_weight * score) <= TOLERANCE
        expected_grad = expected_grad + old_prob[i] * grad
    assert float(expected_grad.norm()) <= 1e-12  # E_{π_old}[∇ℓ] = 0: the expectation vanishes for all four
