"""Bad input to rpg_loss raises ValueError naming the argument (and what is accepted) before any work;
`python -m megatron_rpg.losses.verify` passing (and able to fail). The KL clamp: test_rpg_kl_clamp.py."""
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


def test_verify_main_passes_and_reports_a_failing_check(monkeypatch, capsys):
    assert verify.main([]) == 0
    out = capsys.readouterr().out
    assert ", 0 above 1e-09" in out
    # every row the checks produce is printed and passes (72 today: docs/correctness.md)
    rows = [row for check in verify.CHECKS for row in check()]
    assert len(rows) >= 72 and out.count(" yes") == len(rows)
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
