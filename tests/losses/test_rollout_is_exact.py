"""The rollout IS correction (losses/rollout_is.py) proved by enumeration, float64.

Setting: a TabularPolicy p = π_old (vocab 3, length 3: 27 responses), an engine q ≠ p (p perturbed:
the train/rollout mismatch, sequence weights w = p/q spanning about [0.26, 5.7]), the gradient taken at
θ ≠ θ_old (any θ), with a separate π_ref and large β so every KL/penalty term counts. For a loss object
with per-token loss l_t(x) (its public per_token_loss, the weight from LossInputs.rollout_is_weight)
and ℓ(x) = Σ_t l_t(x) the loss of one response (every response has 3 tokens, so any aggregation of one
response is ℓ times a constant), expectations are finite sums E_q[f] = Σ_x q(x)·f(x), and since q
and w carry no gradient E_q[∇ℓ_w] = ∇ Σ_x q(x)·ℓ_w(x).

Proved, for every loss (rpg in its three forms, grpo, grpo_is_kl, dapo, ppo_clip, reinforce_pp,
r2vpo at both levels) and for SVRPG's snapshot pass:
- sequence level, no bound: E_q[w·∇ℓ] = E_p[∇ℓ] (and without the weight it is not);
- tis: E_q[min(w, C)·∇ℓ] = E_p[min(1, C/w)·∇ℓ]; mis: E_q[ŵ·∇ℓ] = E_p[1[low ≤ w ≤ C]·∇ℓ];
- token level: exact for one-token responses; in general E_q[Σ_t ŵ_t·∇l_t] = Σ_t E_{m_t}[(ŵ_t/w_t)·∇l_t]
  with m_t(x) = q(x_<t)·p(x_t|x_<t)·q(x_>t|x_≤t) (built here from the policies' own per-position
  log-probs, not from the implementation's weights), which differs from E_p (the gap is printed).
"""
import pytest
import torch

from megatron_rpg.losses import LossConfig, LossInputs, R2VPOConfig, build_policy_loss
from megatron_rpg.losses.exact import TabularPolicy, flat_grad, relative_error
from megatron_rpg.losses.rollout_is import RolloutISConfig, rollout_is_weights
from megatron_rpg.losses.svrpg import SnapshotLoss
from megatron_rpg.optim.svrpg_passes import SVRPGPass

TOLERANCE = 1e-10
BETA = 0.5
UNBOUNDED = 1e12  # a threshold no weight of this setting reaches: the plain importance weight
LOSSES = {
    "rpg": LossConfig(name="rpg", beta=BETA),
    "rpg_sequence_no_clip": LossConfig(name="rpg", beta=BETA, is_level="sequence", no_clip=True),
    "rpg_reinforce": LossConfig(name="rpg", beta=BETA, style="reinforce", aggregation="seq-mean-token-sum"),
    "grpo": LossConfig(name="grpo", beta=BETA),
    "grpo_is_kl": LossConfig(name="grpo_is_kl", beta=BETA, kl_level="sequence"),
    "dapo": LossConfig(name="dapo"),
    "ppo_clip": LossConfig(name="ppo_clip"),
    "reinforce_pp": LossConfig(name="reinforce_pp"),
    "r2vpo_token": LossConfig(name="r2vpo", r2vpo=R2VPOConfig(level="token", lambda_init=2.0)),
    "r2vpo_sequence": LossConfig(name="r2vpo", r2vpo=R2VPOConfig(level="sequence", lambda_init=2.0)),
}


class Setting:
    def __init__(self, vocab: int, length: int):
        self.old = TabularPolicy(vocab, length, seed=0)
        self.engine = self.old.perturbed(0.5, seed=5)
        self.theta = self.old.perturbed(0.3, seed=1)
        self.ref = self.old.perturbed(0.4, seed=2)
        n = vocab ** length
        self.reward = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        self.old_logp = self.old.token_logp().detach()
        self.engine_logp = self.engine.token_logp().detach()
        self.p = self.old_logp.sum(-1).exp()
        self.q = self.engine_logp.sum(-1).exp()
        self.mask = torch.ones_like(self.old_logp)

    def inputs(self, loss, weight=None) -> LossInputs:
        advantages = self.reward
        if loss.name == "reinforce_pp":  # per-token advantages [batch, seq]: the reward-to-go of a 0/R tail
            advantages = self.reward[:, None].expand_as(self.old_logp).clone()
        return LossInputs(logp=self.theta.token_logp(), old_logp=self.old_logp, advantages=advantages,
                          mask=self.mask, ref_logp=self.ref.token_logp().detach(), engine_logp=self.engine_logp,
                          rollout_is_weight=weight)

    def expected_grad(self, loss, probability, weight=None, token_factor=None) -> torch.Tensor:
        """∇ Σ_x probability(x)·Σ_t factor_t(x)·l_t(x) with the loss's own per-token loss (weight: the
        rollout IS weight handed to the loss; token_factor: a factor applied here, outside the loss)."""
        per_token, _ = loss.per_token_loss(self.inputs(loss, weight))
        if token_factor is not None:
            per_token = per_token * token_factor
        return flat_grad((probability[:, None] * per_token).sum(), self.theta.params)

    def weights(self, correction: str, level: str, threshold: float, low=None):
        config = RolloutISConfig(correction=correction, level=level, threshold=threshold, threshold_low=low)
        return rollout_is_weights(self.old_logp, self.engine_logp, self.mask, config)


@pytest.fixture(scope="module")
def long():
    return Setting(3, 3)


@pytest.fixture(scope="module")
def single_token():
    return Setting(5, 1)


def _loss(name):
    return build_policy_loss(LOSSES[name])


@pytest.mark.parametrize("name", LOSSES)
def test_sequence_weight_makes_the_engine_expectation_that_of_pi_old(long, name):
    loss = _loss(name)
    weight, outside, _ = long.weights("tis", "sequence", UNBOUNDED)
    assert not bool(outside.any())
    target = long.expected_grad(loss, long.p)
    corrected = long.expected_grad(loss, long.q, weight)
    uncorrected = long.expected_grad(loss, long.q)
    assert relative_error(corrected, target) < TOLERANCE
    assert relative_error(uncorrected, target) > 1e-2  # the mismatch matters in this setting


@pytest.mark.parametrize("name", LOSSES)
def test_token_weight_is_exact_for_one_token_responses(single_token, name):
    loss = _loss(name)
    weight, _, _ = single_token.weights("tis", "token", UNBOUNDED)
    target = single_token.expected_grad(loss, single_token.p)
    assert relative_error(single_token.expected_grad(loss, single_token.q, weight), target) < TOLERANCE


def _bounded(setting, correction, level):
    """ŵ and the factor b(x) with E_q[ŵ·f] = E_p[b·f], b built from the policies' sequence or token
    log-probs: tis min(1, C/w), mis 1[low ≤ w ≤ C]; C, low chosen so both sides of each bound occur."""
    log_w = setting.old_logp - setting.engine_logp  # [N, T] per token
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    w = log_w.exp()
    threshold, low = (1.5, 0.6) if correction == "mis" else (1.5, None)
    weight, outside, _ = setting.weights(correction, level, threshold, low)
    if correction == "tis":
        factor, expected_outside = torch.clamp(threshold / w, max=1.0), w > threshold
    else:
        expected_outside = (w < low) | (w > threshold)
        factor = (~expected_outside).double()
    assert torch.equal(outside, expected_outside)
    assert 0.1 < float(outside.double().mean()) < 0.9, "the bound must cut some weights and keep others"
    return weight, factor, w


@pytest.mark.parametrize("correction", ["tis", "mis"])
@pytest.mark.parametrize("name", LOSSES)
def test_bounded_sequence_weight_has_the_stated_biased_expectation(long, name, correction):
    loss = _loss(name)
    weight, factor, _ = _bounded(long, correction, "sequence")
    biased = long.expected_grad(loss, long.p, token_factor=factor)  # E_p[b·∇ℓ]
    assert relative_error(long.expected_grad(loss, long.q, weight), biased) < TOLERANCE
    assert relative_error(biased, long.expected_grad(loss, long.p)) > 1e-3  # the bound has a cost


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
@pytest.mark.parametrize("name", ["rpg", "grpo", "r2vpo_token"])
def test_token_weight_expectation_is_that_of_the_per_token_mixture(long, name, correction):
    """E_q[Σ_t ŵ_t·l_t] = Σ_t E_{m_t}[b_t·l_t], m_t: the prefix and suffix from q, token t from p."""
    loss = _loss(name)
    if correction == "none":
        weight, _, _ = long.weights("tis", "token", UNBOUNDED)
        factor = torch.ones_like(weight)
    else:
        weight, factor, _ = _bounded(long, correction, "token")
    # m_t(x) = exp(Σ_{s≠t} log q(x_s|x_<s) + log p(x_t|x_<t)), one column per position t
    mixture = (long.engine_logp.sum(-1, keepdim=True) - long.engine_logp + long.old_logp).exp()
    per_token, _ = loss.per_token_loss(long.inputs(loss))
    want = flat_grad((mixture * factor * per_token).sum(), long.theta.params)
    assert relative_error(long.expected_grad(loss, long.q, weight), want) < TOLERANCE
    if correction == "none":  # the token weight leaves the prefix/suffix distribution q: not E_p
        gap = relative_error(want, long.expected_grad(loss, long.p))
        print(f"token-level IS, {name}: relative gap to E_p[∇ℓ] {gap:.3f}")
        assert gap > 1e-2


def test_svrpg_snapshot_pass_takes_the_weight_once(long):
    """The snapshot pass on engine samples: E_q[w·ρ·∇l(θ̃)] = E_{π_θt}[ρ·∇l(θ̃)] = μ's integrand
    (the batch's sampler θ_t = π_old here, the model at θ̃ = θ)."""
    inner = build_policy_loss(LossConfig(name="rpg", beta=BETA, aggregation="seq-mean-token-sum"))
    snapshot = SnapshotLoss(inner, SVRPGPass("snapshot"))
    weight, _, _ = long.weights("tis", "sequence", UNBOUNDED)
    target = long.expected_grad(snapshot, long.p)
    assert relative_error(long.expected_grad(snapshot, long.q, weight), target) < TOLERANCE
    assert relative_error(long.expected_grad(snapshot, long.q), target) > 1e-2


def test_weights_saturate_in_log_space_and_refuse_non_finite_log_probs():
    old = torch.tensor([[0.0, -1.0, -2.0]], dtype=torch.float64)
    engine = torch.tensor([[0.0, -900.0, -2.0]], dtype=torch.float64)  # log w = 899 on one token: exp overflows
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    weight, outside, log_w = rollout_is_weights(old, engine, mask, RolloutISConfig("tis", "sequence", 2.0))
    assert weight.tolist() == [[1.0, 2.0, 2.0]] and outside.tolist() == [[False, True, True]]
    assert log_w.tolist() == [[0.0, 899.0, 899.0]]
    weight, _, _ = rollout_is_weights(old, engine, mask, RolloutISConfig("mis", "token", 2.0))
    assert weight.tolist() == [[1.0, 0.0, 1.0]]  # padding: 1
    with pytest.raises(ValueError, match="not finite"):
        rollout_is_weights(old, torch.tensor([[0.0, float("nan"), -2.0]]), mask, RolloutISConfig("tis"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(correction="tis", threshold=0.5), "--rollout-is-threshold=0.5 must be a finite number >= 1"),
    (dict(correction="mis", threshold=float("inf")), "--rollout-is-threshold=inf"),
    (dict(correction="tis", threshold_low=0.5), "--rollout-is-threshold-low=0.5 is read only with"),
    (dict(correction="mis", threshold=2.0, threshold_low=1.5), r"must lie in \[0, 1\]"),
    (dict(correction="mis", threshold=1.0, threshold_low=1.0), "below --rollout-is-threshold 1.0"),
    (dict(correction="clip"), "--rollout-is-correction='clip' is not supported"),
    (dict(correction="tis", level="geometric"), "--rollout-is-level='geometric' is not supported"),
])
def test_bad_settings_are_refused_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutISConfig(**kwargs)


def test_mis_lower_bound_defaults_to_one_over_the_threshold():
    assert RolloutISConfig("mis", threshold=4.0).low == 0.25
    assert RolloutISConfig("mis", threshold=4.0, threshold_low=0.0).low == 0.0
