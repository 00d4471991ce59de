"""CAPO's last-layer model proved against autograd, float64 (losses/capo.py; docs/algorithms.md, CAPO).

A random LM head W [V, H] and hidden states h [T, H] (two sequences); each token's top-K rows of
z = W·h, a sampled token (one outside its top-K). Truth side: the objective J(W) = Σ_t w_t·A_t·π_a(W)/π_a(W₀)
(the top-K softmax, a's logit held where it lies outside), differentiated by autograd: the second-order
Taylor change along ΔW is ∇J·ΔW + ½·ΔWᵀ∇²J·ΔW, the Hessian-vector product by double backward.

Properties proved:
- token level, SGD and Adam models: m_H = that Taylor change of J_t for ΔW = η·G_eff;
- the Adam model's ΔW is torch.optim.Adam's own step on those rows from the same moments;
- m_F = the Taylor change of ½(log π_a(W+ΔW) − log π_a(W))², and for a direction that does not
  depend on the sampled token, Σ_a π_a·m_F(a) = the Taylor change of KL(π_W ‖ π_{W+ΔW}) (also by HVP);
- sequence and batch levels: Ḡ is the per-row mean of a loop written out by hand; each group's
  m_H is the Taylor change of its mean objective along η·G_eff(Ḡ);
- masks: thresholds between measured values reject exactly the tokens outside them, levels in order;
  a rejected token contributes no gradient to the GRPO loss; the Adam moments move once per optimizer
  step, only on kept rows, and not on a skipped step.
"""
import pytest
import torch

from megatron_rpg.losses import LossConfig, LossInputs, build_policy_loss
from megatron_rpg.losses.capo import (CAPOAdamMoments, CAPOConfig, CAPOTokens, SGDModel, capo_masks,
                                      curvature_terms, group_level_terms, row_mean_gradient, token_gradient_rows,
                                      token_level_terms)

V, H, K, LR = 9, 4, 4, 0.3
SEQUENCE = torch.tensor([0, 0, 0, 1, 1, 1])
TOLERANCE = 1e-12


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    hidden = torch.randn(len(SEQUENCE), H, generator=gen, dtype=torch.float64)
    logits = hidden @ weight.T
    topk_logits, topk_ids = logits.topk(K, dim=-1)
    pick = torch.randint(0, K, (len(SEQUENCE),), generator=gen)
    sampled = topk_ids[torch.arange(len(SEQUENCE)), pick]
    outside = [i for i in range(V) if i not in topk_ids[2].tolist()]
    sampled[2] = outside[0]  # one token sampled outside its top-K: e_a = 0
    advantages = torch.randn(len(SEQUENCE), generator=gen, dtype=torch.float64)
    tokens = CAPOTokens(hidden, topk_logits, topk_ids, sampled, advantages,
                        torch.ones(len(SEQUENCE), dtype=torch.bool), SEQUENCE)
    return weight, tokens


def _adam(seed=1, step=3):
    gen = torch.Generator().manual_seed(seed)
    m = 0.1 * torch.randn(V, H, generator=gen, dtype=torch.float64)
    v = 0.05 * torch.rand(V, H, generator=gen, dtype=torch.float64)
    return CAPOAdamMoments(m, v, beta1=0.8, beta2=0.95, eps=1e-3, step=step)


def _log_ratio(weight, weight0, tokens, t):
    """ℓ_t(W) − ℓ_t(W₀), ℓ = e_aᵀz − logsumexp(z) over the top-K logits (a outside: only −logsumexp)."""
    def ell(w):
        z = w[tokens.topk_ids[t]] @ tokens.hidden[t]
        own = (tokens.topk_ids[t] == tokens.sampled[t]).to(z.dtype)
        return (own * z).sum() - torch.logsumexp(z, 0)
    return ell(weight) - ell(weight0)


def _objective(weights_per_token, weight0, tokens):
    def objective(weight):
        return sum(w * tokens.advantages[t] * torch.exp(_log_ratio(weight, weight0, tokens, t))
                   for t, w in weights_per_token.items())
    return objective


def _taylor(fn, weight0, delta):
    """∇f·Δ + ½·Δᵀ(∇²f)Δ at weight0, the Hessian-vector product by double backward."""
    weight = weight0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(weight), weight, create_graph=True)
    first = (grad * delta).sum()
    (hvp,) = torch.autograd.grad(first, weight)
    return float(first.detach()) + 0.5 * float((hvp * delta).sum())


def _dense(rows, ids):
    out = torch.zeros(V, H, dtype=torch.float64)
    out[ids] = rows
    return out


@pytest.mark.parametrize("model_name", ["sgd", "adam"])
def test_token_level_m_h_is_the_second_order_taylor_change(model_name):
    weight, tokens = _case()
    model = SGDModel() if model_name == "sgd" else _adam()
    m_h, m_f = token_level_terms(tokens, model, LR, local_vocab=V)
    grads = token_gradient_rows(tokens)
    for t in range(len(SEQUENCE)):
        delta = LR * _dense(model.effective(grads[t], tokens.topk_ids[t]), tokens.topk_ids[t])
        expected = _taylor(_objective({t: 1.0}, weight, tokens), weight, delta)
        assert abs(float(m_h[t]) - expected) <= TOLERANCE * max(1.0, abs(expected))
        k2 = _taylor(lambda w: 0.5 * _log_ratio(w, weight, tokens, t) ** 2, weight, delta)
        assert abs(float(m_f[t]) - k2) <= TOLERANCE
        assert float(m_f[t]) > 0


def test_adam_model_step_is_torch_adam_step():
    _, tokens = _case()
    model = _adam()
    grads = token_gradient_rows(tokens)
    rows = tokens.topk_ids[0]
    param = torch.nn.Parameter(torch.zeros(K, H, dtype=torch.float64))
    adam = torch.optim.Adam([param], lr=LR, betas=(model.beta1, model.beta2), eps=model.eps)
    param.grad = -grads[0]  # torch minimises −J
    adam.step()  # initialises the state; overwrite with ours and step again from zero
    with torch.no_grad():
        param.zero_()
    state = adam.state[param]
    state["exp_avg"].copy_(-model.m[rows]); state["exp_avg_sq"].copy_(model.v[rows])  # noqa: E702
    state["step"].fill_(model.step)
    adam.step()
    torch.testing.assert_close(param.detach(), LR * model.effective(grads[0], rows), rtol=1e-13, atol=1e-15)


def test_m_f_is_an_unbiased_estimate_of_the_kl_taylor_change():
    weight, tokens = _case()
    model = _adam()
    for t in (0, 3):
        ids = tokens.topk_ids[t]
        delta = LR * _dense(model.effective(token_gradient_rows(tokens)[t], ids), ids)  # fixed direction
        u = (delta[ids] @ tokens.hidden[t] / LR)[None]
        probs = tokens.probs[t:t + 1]
        terms = [curvature_terms(probs, torch.eye(K, dtype=torch.float64)[a:a + 1] - probs, u,
                                 tokens.advantages[t:t + 1], LR)[1] for a in range(K)]
        expected_m_f = float(sum(probs[0, a] * terms[a][0] for a in range(K)))

        def kl(w, t=t, ids=ids):
            log_p = torch.log_softmax(weight[ids] @ tokens.hidden[t], 0)
            log_q = torch.log_softmax(w[ids] @ tokens.hidden[t], 0)
            return (log_p.exp() * (log_p - log_q)).sum()
        assert abs(expected_m_f - _taylor(kl, weight, delta)) <= TOLERANCE


def _hand_row_means(tokens, keep, groups):
    """The per-(group, row) mean of A·v_k·h by explicit loops."""
    sums, counts = {}, {}
    for t in range(len(tokens.sampled)):
        if not keep[t]:
            continue
        v = tokens.score[t]
        for j in range(K):
            key = (int(groups[t]), int(tokens.topk_ids[t, j]))
            sums[key] = sums.get(key, 0) + tokens.advantages[t] * v[j] * tokens.hidden[t]
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


@pytest.mark.parametrize("level", ["sequence", "batch"])
@pytest.mark.parametrize("model_name", ["sgd", "adam"])
def test_group_levels_average_per_row_and_are_taylor_exact(level, model_name):
    weight, tokens = _case(seed=2)
    keep = torch.tensor([True, False, True, True, True, True])
    groups = SEQUENCE if level == "sequence" else torch.zeros_like(SEQUENCE)
    keys, mean, _ = row_mean_gradient(tokens, keep, groups, local_vocab=V,
                                   dp_sum=None if level == "sequence" else (lambda x: x))
    hand = _hand_row_means(tokens, keep, groups)
    assert sorted(hand) == [(int(k) // V, int(k) % V) for k in keys]
    for key, row in zip(keys.tolist(), mean):
        torch.testing.assert_close(row, hand[(key // V, key % V)], rtol=0, atol=1e-15)
    model = SGDModel() if model_name == "sgd" else _adam()
    m_h, _ = group_level_terms(tokens, keep, groups, model, LR, local_vocab=V,
                               dp_sum=None if level == "sequence" else (lambda x: x))
    for g in groups.unique().tolist():
        members = [t for t in range(len(SEQUENCE)) if keep[t] and groups[t] == g]
        delta = torch.zeros(V, H, dtype=torch.float64)
        for (group, row), grad in hand.items():
            if group == g:
                delta[row] = LR * model.effective(grad[None], torch.tensor([row]))[0]
        expected = _taylor(_objective({t: 1.0 / len(members) for t in members}, weight, tokens), weight, delta)
        assert abs(float(m_h[members].mean()) - expected) <= TOLERANCE * max(1.0, abs(expected))


@pytest.mark.parametrize("model_name", ["sgd", "adam"])
def test_chunked_terms_equal_one_chunk(model_name):
    _, tokens = _case(seed=6)
    keep = torch.tensor([True, True, False, True, True, True])
    model = SGDModel() if model_name == "sgd" else _adam()
    for chunk in (1, 4):
        for whole, part in zip(token_level_terms(tokens, model, LR, local_vocab=V, chunk=100),
                               token_level_terms(tokens, model, LR, local_vocab=V, chunk=chunk)):
            torch.testing.assert_close(part, whole, rtol=1e-14, atol=1e-16)
        for whole, part in zip(group_level_terms(tokens, keep, SEQUENCE, model, LR, local_vocab=V, chunk=100),
                               group_level_terms(tokens, keep, SEQUENCE, model, LR, local_vocab=V, chunk=chunk)):
            torch.testing.assert_close(part, whole, rtol=1e-14, atol=1e-16)


def test_masks_follow_the_thresholds_level_by_level():
    _, tokens = _case(seed=3)
    m_h, m_f = token_level_terms(tokens, SGDModel(), LR, local_vocab=V)
    tau_h = float(m_h.abs().median())
    tau_f = float(m_f.max()) * 2
    config = CAPOConfig(enabled=True, tau_f=tau_f, tau_h=tau_h, levels=("token", "sequence"),
                        hessian_symmetric=True, optimizer_model="sgd", top_k=K)
    masks = capo_masks(tokens, config, SGDModel(), LR, num_sequences=2, local_vocab=V)
    after_token = (m_h.abs() <= tau_h) & (m_f <= tau_f)
    assert 0 < int(after_token.sum()) < len(SEQUENCE)
    assert masks.rejected["token"] == int((~after_token).sum())
    seq_h, seq_f = masks.terms["sequence"]
    seq_ok = (seq_h.abs() <= tau_h) & (seq_f <= tau_f)
    torch.testing.assert_close(masks.keep, after_token & seq_ok[SEQUENCE])
    token_m_h, _ = group_level_terms(tokens, after_token, SEQUENCE, SGDModel(), LR, local_vocab=V)
    for s in range(2):
        members = after_token & (SEQUENCE == s)
        if members.any():
            assert abs(float(seq_h[s]) - float(token_m_h[members].mean())) <= TOLERANCE
    one_sided = capo_masks(tokens, CAPOConfig(enabled=True, tau_f=tau_f, tau_h=tau_h, optimizer_model="sgd"),
                           SGDModel(), LR, num_sequences=2, local_vocab=V)
    torch.testing.assert_close(one_sided.keep, (m_h >= 0) & (m_h <= tau_h) & (m_f <= tau_f))


def test_adam_moments_move_only_on_the_kept_rows():
    _, tokens = _case(seed=4)
    model = _adam(step=0)
    before_m, before_v = model.m.clone(), model.v.clone()
    m_h, _ = token_level_terms(tokens, model, LR, local_vocab=V)
    config = CAPOConfig(enabled=True, tau_f=1e9, tau_h=float(m_h.abs().median()), hessian_symmetric=True, top_k=K)
    masks = capo_masks(tokens, config, model, LR, num_sequences=2, local_vocab=V)
    assert model.step == 0 and torch.equal(model.m, before_m)  # nothing moves before the optimizer step
    model.finish_step()
    rows, mean, _ = row_mean_gradient(tokens, masks.keep, torch.zeros_like(SEQUENCE), local_vocab=V,
                                      dp_sum=lambda x: x)
    assert model.step == 1 and 0 < len(rows) < V
    expected_m = before_m.clone()
    expected_m[rows] = 0.8 * before_m[rows] + 0.2 * mean
    torch.testing.assert_close(model.m, expected_m, rtol=0, atol=1e-15)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(model.v[untouched], before_v[untouched])
    capo_masks(tokens, config, model, LR, num_sequences=2, local_vocab=V)
    model.finish_step(applied=False)  # a skipped optimizer step: the moments stay
    assert model.step == 1
    torch.testing.assert_close(model.m, expected_m, rtol=0, atol=1e-15)


def test_a_rejected_token_contributes_no_gradient():
    _, tokens = _case(seed=5)
    m_h, _ = token_level_terms(tokens, SGDModel(), LR, local_vocab=V)
    config = CAPOConfig(enabled=True, tau_f=1e9, tau_h=float(m_h.abs().median()), hessian_symmetric=True,
                        optimizer_model="sgd", top_k=K)
    keep = capo_masks(tokens, config, SGDModel(), LR, num_sequences=2, local_vocab=V).keep.reshape(2, 3)
    assert keep.any() and not keep.all()
    gen = torch.Generator().manual_seed(5)
    logp = -torch.rand(2, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    old_logp = logp.detach().clone()  # ratio 1: inside the clip, so every kept token has a gradient
    loss = build_policy_loss(LossConfig(name="grpo", beta=0.0))
    loss_sum, _, _ = loss(LossInputs(logp, old_logp, torch.tensor([0.7, -1.3], dtype=torch.float64), mask=keep))
    (grad,) = torch.autograd.grad(loss_sum, logp)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    assert bool((grad[keep] != 0).all())


def test_config_errors_name_the_flag():
    for kwargs, flag in [(dict(preset="x"), "--capo-preset"), (dict(tau_h=-1.0), "--capo-tau-h"),
                         (dict(top_k=1), "--capo-top-k"), (dict(levels=("token", "token")), "--capo-levels"),
                         (dict(levels=("sentence",)), "--capo-levels"), (dict(optimizer_model="sgdm"),
                                                                         "--capo-optimizer-model")]:
        with pytest.raises(ValueError, match=flag):
            CAPOConfig(**kwargs)
    assert CAPOConfig(preset="drcapo").thresholds == (1e-3, 5e-4)
    assert CAPOConfig(preset="reincapo", tau_h=0.5).thresholds == (1e-5, 0.5)
