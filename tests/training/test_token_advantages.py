"""REINFORCE++ in the trainer: training/rollouts.attach_token_advantages builds the per-token
advantages from the rewards and the old/reference log-probs, normalised over the GLOBAL batch.

Proved: at DP=2 (each rank its own micro-batches) every rank's advantages equal
losses.advantages.reinforce_pp_advantages on the union of both ranks' batches (float64 rounding);
filler groups get 0 and stay out of the statistics; π_ref = π_old without ref_logp (k1 = 0), with
ref_logp the k1 shapes the rewards; the trainer trains with --loss reinforce_pp.
"""
from __future__ import annotations

import types

import pytest
import torch

from megatron_rpg.losses import reinforce_pp_advantages
from tests.distributed.harness import run_on_ranks

BETA = 0.05


def _micro_batches(rank: int, *, with_ref: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(2):
        lengths = torch.randint(1, 5, (3,), generator=generator)
        mask = (torch.arange(7)[None, :] >= 2) & (torch.arange(7)[None, :] < 2 + lengths[:, None])
        batch = {"loss_mask": mask.float(), "old_logp": -torch.rand(3, 7, generator=generator, dtype=torch.float64),
                 "scores": torch.randn(3, generator=generator, dtype=torch.float64),
                 "counted": torch.tensor([True, True, rank == 0])}  # rank 1's last row: a filler
        if with_ref:
            batch["ref_logp"] = -torch.rand(3, 7, generator=generator, dtype=torch.float64)
        batches.append(batch)
    return batches


def _config():
    return types.SimpleNamespace(loss=types.SimpleNamespace(beta=BETA))


def dp2_body(rank, world_size, with_ref):
    from megatron_rpg.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rpg.training.rollouts import attach_token_advantages

    initialize_parallel(1, 1, seed=0)
    batches = _micro_batches(rank, with_ref=with_ref)
    attach_token_advantages(_config(), batches)
    destroy_parallel()
    return [batch["advantages"] for batch in batches]


@pytest.mark.distributed
@pytest.mark.parametrize("with_ref", [False, True])
def test_dp2_token_advantages_are_those_of_the_whole_global_batch(with_ref):
    got = run_on_ranks(dp2_body, world_size=2, args=(with_ref,))
    rows = [batch for rank in (0, 1) for batch in _micro_batches(rank, with_ref=with_ref)]
    counted = torch.cat([b["counted"] for b in rows])
    mask = torch.cat([b["loss_mask"] for b in rows]).bool() & counted[:, None]
    old = torch.cat([b["old_logp"] for b in rows])
    ref = torch.cat([b["ref_logp"] for b in rows]) if with_ref else old
    scores = torch.cat([b["scores"] for b in rows])
    want = reinforce_pp_advantages(scores[counted], old[counted], ref[counted], mask[counted], beta=BETA)
    got_all = torch.cat([a for rank in got for a in rank]).double()
    assert torch.equal(got_all[~counted], torch.zeros_like(got_all[~counted]))  # the filler row
    # float32 storage of float64 values: the bound is float32's relative rounding of each value
    assert torch.allclose(got_all[counted], want, rtol=float(torch.finfo(torch.float32).eps), atol=0)
    if with_ref:  # the KL shapes the rewards: without it the advantages differ
        plain = reinforce_pp_advantages(scores[counted], old[counted], old[counted], mask[counted], beta=BETA)
        assert not torch.allclose(plain, want)


def test_the_trainer_refuses_an_advantage_estimator_with_reinforce_pp(capsys):
    from megatron_rpg.training.config import parse_train_config

    with pytest.raises(SystemExit):
        parse_train_config(["--model-preset", "tiny", "--loss", "reinforce_pp", "--advantage-estimator", "grpo"])
    assert "--advantage-estimator has no effect with --loss reinforce_pp" in capsys.readouterr().err
