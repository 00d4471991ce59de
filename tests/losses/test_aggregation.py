"""Aggregations against a direct computation, exact splitting over micro-batches with a global count,
and the sequence-level layout over tokens."""
import pytest
import torch

from megatron_rpg.losses import RPGClip, aggregate, aggregate_sum, rpg_loss, rpg_loss_sum
from megatron_rpg.losses.exact import flat_grad, relative_error


def ragged_batch(seed=0, batch=6, seq=7):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])[:batch]  # row 2 is an all-padding row
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    loss = torch.randn(batch, seq, generator=generator, dtype=torch.float64)
    loss[~mask] = float("nan")  # padding may hold anything; it must not leak into the result
    return loss, mask, lengths


def test_each_aggregation_equals_a_direct_computation():
    loss, mask, lengths = ragged_batch()
    rows = [loss[i, :n] for i, n in enumerate(lengths.tolist()) if n > 0]
    direct = {"token-mean": torch.cat(rows).sum() / lengths.sum(),
              "seq-mean-token-mean": sum(r.mean() for r in rows) / len(rows),
              "seq-mean-token-sum": sum(r.sum() for r in rows) / len(rows)}
    for mode, expected in direct.items():
        assert abs(float(aggregate(loss, mask, mode) - expected)) <= 1e-14 * max(1.0, abs(float(expected)))
    total, count = aggregate_sum(loss, mask, "token-mean")
    assert int(count) == 22 and count.dtype == torch.int64


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_global_count_over_micro_batches_reproduces_the_whole_batch_loss(mode):
    loss, mask, _ = ragged_batch()
    leaf = torch.where(mask, loss, 0.0).requires_grad_(True)
    whole = aggregate(leaf, mask, mode)
    micro = [(leaf[:2], mask[:2]), (leaf[2:3], mask[2:3]), (leaf[3:], mask[3:])]
    # what the forward-backward wrapper does: sum the counts first, then pass the global count
    global_count = sum(int(aggregate_sum(l, m, mode)[1]) for l, m in micro)
    key = "num_global_tokens" if mode == "token-mean" else "num_global_sequences"
    split = sum(aggregate(l, m, mode, **{key: global_count}) for l, m in micro)
    assert abs(float((split - whole).detach())) <= 1e-14
    (grad_whole,) = torch.autograd.grad(whole, leaf)
    (grad_split,) = torch.autograd.grad(split, leaf)
    assert torch.equal(grad_whole, grad_split) or relative_error(grad_split, grad_whole) <= 1e-14
    # the sum form (Megatron's per-token-loss contract): Σ loss_sum / Σ count is the same number
    sums = [aggregate_sum(l, m, mode) for l, m in micro]
    assert abs(float((sum(s for s, _ in sums) / sum(int(c) for _, c in sums) - whole).detach())) <= 1e-14


def test_per_micro_batch_token_mean_is_not_the_global_token_mean():
    # the public code's per-micro-batch token mean; ours must not reduce to it
    loss, mask, _ = ragged_batch()
    whole = aggregate(loss, mask, "token-mean")
    local = (aggregate(loss[:2], mask[:2], "token-mean") + aggregate(loss[3:], mask[3:], "token-mean")) / 2
    assert abs(float(local - whole)) > 1e-3


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_rpg_loss_split_over_micro_batches_with_global_token_count_equals_whole_batch(style):
    generator = torch.Generator().manual_seed(1)
    _, mask, _ = ragged_batch()
    logp = (-torch.rand(6, 7, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    old_logp = logp.detach() + 0.2 * torch.randn(6, 7, generator=generator, dtype=torch.float64)
    adv = torch.randn(6, generator=generator, dtype=torch.float64)
    kwargs = dict(divergence="urkl", style=style, beta=0.1, clip=RPGClip())
    whole, _ = rpg_loss(logp, old_logp, adv, mask=mask, **kwargs)
    parts = [slice(0, 2), slice(2, 4), slice(4, 6)]
    num_tokens = sum(int(rpg_loss_sum(logp[p], old_logp[p], adv[p], mask=mask[p], **kwargs)[1]) for p in parts)
    split = sum(rpg_loss(logp[p], old_logp[p], adv[p], mask=mask[p], num_global_tokens=num_tokens, **kwargs)[0]
                for p in parts)
    assert abs(float((split - whole).detach())) <= 1e-13
    assert relative_error(flat_grad(split, [logp]), flat_grad(whole, [logp])) <= 1e-13


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_sequence_level_loss_is_spread_evenly_over_response_tokens(style):
    generator = torch.Generator().manual_seed(2)
    _, mask, lengths = ragged_batch()
    logp = -torch.rand(6, 7, generator=generator, dtype=torch.float64) * 0.3
    old_logp = logp + 0.05 * torch.randn(6, 7, generator=generator, dtype=torch.float64)
    adv = torch.randn(6, generator=generator, dtype=torch.float64)
    kwargs = dict(divergence="rkl", style=style, beta=0.2, is_level="sequence")
    # L_i of each sequence alone (the one-sequence contract), then the three aggregations
    per_sequence = torch.stack([rpg_loss(logp[i:i + 1], old_logp[i:i + 1], adv[i:i + 1], mask=mask[i:i + 1],
                                         aggregation="seq-mean-token-sum", **kwargs)[0] for i in range(6)])
    nonempty = lengths > 0
    expected = {"seq-mean-token-sum": per_sequence[nonempty].mean(),
                "seq-mean-token-mean": (per_sequence[nonempty] / lengths[nonempty]).mean(),
                "token-mean": per_sequence.sum() / lengths.sum()}
    for mode, value in expected.items():
        loss, _ = rpg_loss(logp, old_logp, adv, mask=mask, aggregation=mode, **kwargs)
        assert abs(float((loss - value).detach())) <= 1e-14 * max(1.0, abs(float(value))), mode


def test_global_count_of_the_wrong_kind_or_unknown_mode_raises_value_error():
    loss, mask, _ = ragged_batch()
    with pytest.raises(ValueError, match="num_global_sequences"):
        aggregate(loss, mask, "token-mean", num_global_sequences=3)
    with pytest.raises(ValueError, match="num_global_tokens"):
        aggregate(loss, mask, "seq-mean-token-sum", num_global_tokens=3)
    with pytest.raises(ValueError, match="num_global_tokens"):
        aggregate(loss, mask, "token-mean", num_global_tokens=0)
    with pytest.raises(ValueError, match="aggregation='sum'.*token-mean"):
        aggregate(loss, mask, "sum")
