"""CAPO's megatron glue (megatron/capo_masks.py): TP=2 × DP=2 masks equal the single-process masks.

Float64, a random LM head over a padded vocabulary (ids ≥ VOCAB are megatron's padding and must never
enter the top-K); the 4 gloo ranks build megatron's groups (TP=2, DP=2), each holds its vocabulary
shard of W and of the Adam moments and its DP half of the batch. The reference is one process with
the whole W and the whole batch. Properties: the top-K (found per shard, all-gathered, re-selected)
equals the full top-K; every level's (m_H, m_F) agrees to 1e-12; the keep masks are equal; the Adam
moment tables after the update, shards put together, equal the reference table; rejection rates
summed over DP equal the reference's.
"""
import pytest
import torch

from megatron_rpg.losses.capo import CAPOAdamMoments, CAPOConfig
from megatron_rpg.megatron.capo_masks import capo_token_masks, rejection_rates, vocab_parallel_topk
from tests.distributed.harness import run_on_ranks

VOCAB, PADDED, H, K, B, S, LR = 21, 24, 5, 6, 4, 5, 0.2


def _data():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(PADDED, H, generator=gen, dtype=torch.float64)
    weight[VOCAB:] = 0  # padding rows: logit 0 would beat the negative ones without the padding mask
    hidden = torch.randn(B, S, H, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (B, S), generator=gen)
    advantages = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 3:] = False
    moments = (0.1 * torch.randn(PADDED, H, generator=gen, dtype=torch.float64),
               0.05 * torch.rand(PADDED, H, generator=gen, dtype=torch.float64))
    return weight, hidden, targets, advantages, mask, moments


def _config(tau_f, tau_h, levels):
    return CAPOConfig(enabled=True, tau_f=tau_f, tau_h=tau_h, top_k=K, levels=levels, hessian_symmetric=True)


def _run(weight, hidden, targets, advantages, mask, moments, config, **groups):
    adam = CAPOAdamMoments(moments[0].clone(), moments[1].clone(), beta1=0.8, beta2=0.95, eps=1e-3, step=2)
    keep, masks = capo_token_masks(hidden, weight, targets, advantages, mask, config, adam, LR,
                                   vocab_size=VOCAB, **groups)
    adam.finish_step()
    return keep, masks, adam


def _ranks_body(rank, world_size, data, configs):
    from megatron.core import parallel_state

    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    initialize_parallel(tensor_model_parallel_size=2)
    try:
        tp, dp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()
        weight, hidden, targets, advantages, mask, moments = data
        rows = slice(tp * PADDED // 2, (tp + 1) * PADDED // 2)
        half = slice(dp * B // 2, (dp + 1) * B // 2)
        groups = dict(tp_group=parallel_state.get_tensor_model_parallel_group(),
                      dp_group=parallel_state.get_data_parallel_group())
        topk = vocab_parallel_topk(hidden.reshape(-1, H), weight[rows], K, tp_group=groups["tp_group"],
                                   vocab_size=VOCAB)
        results = []
        for config in configs:
            keep, masks, adam = _run(weight[rows], hidden[half], targets[half], advantages[half], mask[half],
                                     (moments[0][rows], moments[1][rows]), config, **groups)
            results.append(dict(tp=tp, dp=dp, topk=topk, keep=keep, terms=masks.terms, m=adam.m, v=adam.v,
                                step=adam.step, rates=rejection_rates(masks, groups["dp_group"])))
        return results
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def thresholds():
    """τ_H midway between two middle |m_H| of the reference's token level, τ_F above every m_F."""
    data = _data()
    _, masks, _ = _run(*data, _config(1e9, 1e9, ("token",)))
    m_h, m_f = masks.terms["token"]  # over the response tokens only
    values = m_h.abs().sort().values
    middle = len(values) // 2
    return 2 * float(m_f.max()), float(values[middle - 1] + values[middle]) / 2


def _half_of_tokens(values, mask, half):
    """The response-token values of the rows `half`, from values over all response tokens in row order."""
    full = torch.zeros(B * S, dtype=values.dtype)
    full[mask.reshape(-1)] = values
    return full.reshape(B, S)[half][mask[half]]


LEVELS = [("token", "sequence"), ("sequence", "batch")]


@pytest.fixture(scope="module")
def distributed(thresholds):
    """Per level choice, the 4 ranks' results (one spawn for both)."""
    per_rank = run_on_ranks(_ranks_body, world_size=4, args=(_data(), [_config(*thresholds, lv) for lv in LEVELS]))
    return {levels: [rank[i] for rank in per_rank] for i, levels in enumerate(LEVELS)}


@pytest.mark.parametrize("levels", LEVELS)
def test_tp2_dp2_masks_equal_single_process_masks(thresholds, distributed, levels):
    data = _data()
    keep, masks, adam = _run(*data, _config(*thresholds, levels))
    results = distributed[levels]
    full_topk = torch.topk(data[1].reshape(-1, H) @ data[0][:VOCAB].T, K, dim=-1)
    for result in results:
        torch.testing.assert_close(result["topk"][0], full_topk.values, rtol=0, atol=1e-12)
        assert torch.equal(result["topk"][1], full_topk.indices)
        half = slice(result["dp"] * B // 2, (result["dp"] + 1) * B // 2)
        assert torch.equal(result["keep"], keep[half]) and not result["keep"][~data[4][half]].any()
        for level in levels:
            for ours, reference in zip(result["terms"][level], masks.terms[level]):
                expected = _half_of_tokens(reference, data[4], half) if level == "token" else \
                    reference[half] if level == "sequence" else reference
                torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
        assert result["rates"] == pytest.approx(rejection_rates(masks), abs=1e-15)
        assert result["step"] == adam.step == 3
    for tp in (0, 1):
        shard = next(r for r in results if r["tp"] == tp and r["dp"] == 0)
        rows = slice(tp * PADDED // 2, (tp + 1) * PADDED // 2)
        torch.testing.assert_close(shard["m"], adam.m[rows], rtol=0, atol=1e-14)
        torch.testing.assert_close(shard["v"], adam.v[rows], rtol=0, atol=1e-14)
    if levels[0] == "token":
        assert 0 < masks.rejected["token"] < masks.valid  # the thresholds cut the tokens in two
