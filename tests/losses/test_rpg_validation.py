"""Bad input to rpg_loss raises ValueError naming the argument (and what is accepted) before any work;
the optional KL value clamp; and `python -m megatron_rpg.losses.verify` passing (and able to fail)."""
import math

import pytest
import torch

from megatron_rpg.losses import RPGClip, rpg_loss
from megatron_rpg.losses import verify


def inputs(batch=2, seq=3):
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand(batch, seq, generator=generator, dtype=torch.float64)
    return logp.requires_grad_(True), logp.detach() - 0.1, torch.tensor([1.0, -1.0], dtype=torch.float64)


BASE = dict(divergence="urkl", style="reinforce", beta=0.1)


@pytest.mark.parametrize("change, message", [
    (dict(divergence="kl"), r"divergence='kl'.*'fkl', 'rkl', 'ufkl', 'urkl'"),
    (dict(style="ppo"), r"style='ppo'.*'differentiable', 'reinforce'"),
    (dict(aggregation="mean"), r"aggregation='mean'.*'seq-mean-token-mean'"),
    (dict(is_level="prompt"), r"is_level='prompt'.*'sequence', 'token'"),
    (dict(beta=-0.1), r"beta=-0.1"),
    (dict(clip=(0.2, 0.28)), r"clip=\(0.2, 0.28\) must be an RPGClip"),
    (dict(kl_clamp=0.0), r"kl_clamp=0.0"),
])
def test_bad_options_raise_value_error_naming_the_argument_and_accepted_values(change, message):
    logp, old_logp, adv = inputs()
    with pytest.raises(ValueError, match=message):
        rpg_loss(logp, old_logp, adv, **{**BASE, **change})


def test_bad_tensors_raise_value_error_naming_the_tensor():
    logp, old_logp, adv = inputs()
    with pytest.raises(ValueError, match="old_logp has shape"):
        rpg_loss(logp, old_logp[:, :2], adv, **BASE)
    with pytest.raises(ValueError, match="ref_logp has shape"):
        rpg_loss(logp, old_logp, adv, ref_logp=old_logp.T, **BASE)
    with pytest.raises(ValueError, match="advantages has shape"):
        rpg_loss(logp, old_logp, adv[:1], **BASE)
    with pytest.raises(ValueError, match="mask has shape"):
        rpg_loss(logp, old_logp, adv, mask=torch.ones(2, 2, dtype=torch.bool), **BASE)
    with pytest.raises(ValueError, match="logp must be per-token"):
        rpg_loss(logp[0], old_logp[0], adv, **BASE)
    with pytest.raises(ValueError, match="advantages varies"):
        rpg_loss(logp, old_logp, torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64),
                 is_level="sequence", **BASE)


def test_nan_in_old_logp_is_an_error_at_response_tokens_and_ignored_at_padding():
    logp, old_logp, adv = inputs()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    old_logp[0, 2] = float("nan")  # padding: must not leak into loss or gradient
    for level in ("token", "sequence"):
        loss, _ = rpg_loss(logp, old_logp, adv, mask=mask, is_level=level, clip=RPGClip(), **BASE)
        (grad,) = torch.autograd.grad(loss, logp)
        assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(grad).all()) and float(grad[0, 2]) == 0.0
    old_logp[1, 1] = float("nan")
    with pytest.raises(ValueError, match="old_logp contains 1 non-finite"):
        rpg_loss(logp, old_logp, adv, mask=mask, **BASE)


@pytest.mark.parametrize("clip", [None, RPGClip(eps_low=0.9, eps_high=100.0, dual_clip=200.0)])
def test_kl_clamp_drops_the_kl_gradient_where_the_kl_value_exceeds_it_in_both_styles(clip):
    # per-token log ρ = log w: 0.5 (rkl term w·log w ≈ 0.82, inside ±5) and 3.0 (≈ 60, outside)
    logp = torch.tensor([[0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    old_logp, adv = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    grads = {}
    for style in ("differentiable", "reinforce"):
        for clamp in (None, 5.0):
            loss, _ = rpg_loss(logp, old_logp, adv, divergence="rkl", style=style, beta=1.0, clip=clip,
                               kl_clamp=clamp, aggregation="seq-mean-token-sum")
            (grads[style, clamp],) = torch.autograd.grad(loss, logp)
    for style in ("differentiable", "reinforce"):
        unclamped, clamped = grads[style, None][0], grads[style, 5.0][0]
        # inside: unchanged, = β·w·(log w + 1); outside: zero (the unclamped one is not)
        assert float(clamped[0]) == pytest.approx(math.exp(0.5) * 1.5, rel=1e-14) == float(unclamped[0])
        assert float(clamped[1]) == 0.0 and float(unclamped[1]) > 1.0
    assert torch.equal(grads["differentiable", 5.0], grads["reinforce", 5.0])


def test_verify_main_passes_and_reports_a_failing_check(monkeypatch, capsys):
    assert verify.main([]) == 0
    out = capsys.readouterr().out
    assert ", 0 above 1e-09" in out
    assert out.count(" yes") >= 61
    broken = lambda: [verify.VerifyRow("deliberately wrong", "1 = 2", 0.5),
                      verify.VerifyRow("not a number", "NaN is a failure", float("nan"))]
    monkeypatch.setattr(verify, "CHECKS", [broken])
    assert verify.main([]) == 1
    assert "2 above 1e-09" in capsys.readouterr().out


def test_half_precision_log_probs_are_computed_in_float32():
    logp32, old_logp, adv = inputs()
    logp16 = logp32.detach().to(torch.bfloat16).requires_grad_(True)
    exact = logp16.detach().to(torch.float32).requires_grad_(True)  # the same values, already float32
    kwargs = dict(divergence="rkl", style="differentiable", beta=0.1, clip=RPGClip())
    loss16, _ = rpg_loss(logp16, old_logp.float(), adv.float(), **kwargs)
    loss32, _ = rpg_loss(exact, old_logp.float(), adv.float(), **kwargs)
    assert loss16.dtype == torch.float32 and torch.equal(loss16.detach(), loss32.detach())
